#!/usr/bin/env sh
# InternVL3.5-38B (InternViT-6B-448px-V2_5 + Qwen3-32B), supervised fine-tuning from InternVL3_5-38B-Pretrained (the reference's
# internvl3_5_38b_sft.sh: 32k-token packed rows, square loss, 8000 steps; environment in _internvl3_5.sh).
# Launch on each node: NPROC_PER_NODE=8 WORLD_SIZE=<nodes> RANK=<node> MASTER_ADDR=<first node> sh shell/internvl3.5/internvl3_5_38b_sft.sh [extra train flags]

PROJECT_NAME=internvl3_5_38b_sft
BATCH_SIZE=${BATCH_SIZE:-512}
MODEL=${MODEL:-./pretrained/InternVL3_5-38B-Pretrained}
. "$(dirname "$0")/_internvl3_5.sh"

launch_sft --drop_path_rate 0.4 "$@"
