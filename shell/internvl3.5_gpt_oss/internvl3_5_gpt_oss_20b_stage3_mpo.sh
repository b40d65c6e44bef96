#!/usr/bin/env sh
# InternVL3.5-GPT-OSS-20B-A4B, stage 3 (MPO, mixed preference optimization) from the stage-2 model (the reference's
# internvl3_5_gpt_oss_20b_stage3_mpo.sh). MODEL defaults to stage 2's output directory (the reference's script names
# work_dirs/internvl3_5_gpt_oss_20b_pretrain/internvl3_5_gpt_oss_20b_stage2_sft, where its stage 2 does not write);
# environment in ../internvl3.5/_internvl3_5.sh.
# Launch on each node: NPROC_PER_NODE=8 WORLD_SIZE=<nodes> RANK=<node> MASTER_ADDR=<first node> sh shell/internvl3.5_gpt_oss/internvl3_5_gpt_oss_20b_stage3_mpo.sh [extra train flags]

PROJECT_NAME=internvl3_5_gpt_oss_20b_mpo
BATCH_SIZE=${BATCH_SIZE:-256}
MODEL=${MODEL:-work_dirs/internvl3_5_gpt_oss_20b_sft/internvl3_5_gpt_oss_20b_stage2_sft}
META_PATH=${META_PATH:-MMPR-v1.2/meta.json}
. "$(dirname "$0")/../internvl3.5/_internvl3_5.sh"

launch_mpo \
  --conv_style internvl3_5_gpt_oss \
  --use_custom_flash_attn True \
  --drop_path_rate 0.1 \
  "$@"
