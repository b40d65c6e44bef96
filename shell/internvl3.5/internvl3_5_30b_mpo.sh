#!/usr/bin/env sh
# InternVL3.5-30B-A3B (InternViT-300M-448px-V2_5 + Qwen3-30B-A3B, 128 experts, 8 per token), MPO (mixed preference optimization) from InternVL3_5-30B-A3B-Instruct
# (the reference's internvl3_5_30b_mpo.sh; environment in _internvl3_5.sh).
# Launch on each node: NPROC_PER_NODE=8 WORLD_SIZE=<nodes> RANK=<node> MASTER_ADDR=<first node> sh shell/internvl3.5/internvl3_5_30b_mpo.sh [extra train flags]

PROJECT_NAME=internvl3_5_30b_mpo
BATCH_SIZE=${BATCH_SIZE:-256}
MODEL=${MODEL:-./pretrained/InternVL3_5-30B-A3B-Instruct}
META_PATH=${META_PATH:-MMPR-v1.2/meta.json}
. "$(dirname "$0")/_internvl3_5.sh"

launch_mpo --drop_path_rate 0.1 "$@"
