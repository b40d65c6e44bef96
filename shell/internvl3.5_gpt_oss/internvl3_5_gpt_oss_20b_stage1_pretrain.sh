#!/usr/bin/env sh
# InternVL3.5-GPT-OSS-20B-A4B, stage 1 (pretraining): everything trains from the stage-0 model (the reference's
# internvl3_5_gpt_oss_20b_stage1_pretrain.sh: 15000 steps at 2e-5, 32k-token packed rows, square loss; the
# load-balancing loss x 0.9, as the reference's GPT-OSS training always adds it). Environment in
# ../internvl3.5/_internvl3_5.sh; MODEL defaults to stage 0's output directory.
# Launch on each node: NPROC_PER_NODE=8 WORLD_SIZE=<nodes> RANK=<node> MASTER_ADDR=<first node> sh shell/internvl3.5_gpt_oss/internvl3_5_gpt_oss_20b_stage1_pretrain.sh [extra train flags]

PROJECT_NAME=internvl3_5_gpt_oss_20b_pretrain
BATCH_SIZE=${BATCH_SIZE:-512}
MODEL=${MODEL:-work_dirs/internvl3_5_gpt_oss_20b_pretrain/internvl3_5_gpt_oss_20b_stage0_mlp_warmup}
. "$(dirname "$0")/../internvl3.5/_internvl3_5.sh"

launch_sft \
  --conv_style internvl3_5_gpt_oss \
  --use_custom_flash_attn True \
  --drop_path_rate 0.1 \
  --max_steps 15000 \
  --learning_rate 2e-5 \
  "$@"
