#!/usr/bin/env sh
# InternVL3.5-GPT-OSS-20B-A4B, stage 0 (MLP warm-up): a new InternVL model built from InternViT-300M-448px-V2_5 and
# gpt-oss-20b (its MXFP4 experts dequantized to bf16), of which only the new projector trains (the reference's
# internvl_chat_gpt_oss/shell/internvl3_5_gpt_oss/internvl3_5_gpt_oss_20b_stage0_mlp_warmup.sh: 5000 steps at 1e-3,
# 16k-token samples in 32k-token packed rows, square loss). The model is first written to OUTPUT_DIR/initial_model;
# environment in ../internvl3.5/_internvl3_5.sh, plus VISION_PATH and LLM_PATH (the two checkpoints' folders).
# Launch on each node: NPROC_PER_NODE=8 WORLD_SIZE=<nodes> RANK=<node> MASTER_ADDR=<first node> sh shell/internvl3.5_gpt_oss/internvl3_5_gpt_oss_20b_stage0_mlp_warmup.sh [extra train flags]

PROJECT_NAME=internvl3_5_gpt_oss_20b_pretrain
BATCH_SIZE=${BATCH_SIZE:-256}
VISION_PATH=${VISION_PATH:-./pretrained/InternViT-300M-448px-V2_5}
LLM_PATH=${LLM_PATH:-./pretrained/gpt-oss-20b}
MODEL=  # no InternVL checkpoint yet: built from VISION_PATH and LLM_PATH
. "$(dirname "$0")/../internvl3.5/_internvl3_5.sh"

launch_sft \
  --vision_path "$VISION_PATH" \
  --llm_path "$LLM_PATH" \
  --conv_style internvl3_5_gpt_oss \
  --use_custom_flash_attn True \
  --freeze_llm True \
  --freeze_mlp False \
  --freeze_backbone True \
  --drop_path_rate 0.1 \
  --num_train_epochs 1 \
  --max_steps 5000 \
  --save_total_limit 20 \
  --learning_rate 1e-3 \
  --warmup_ratio 0.01 \
  --max_seq_length 16384 \
  --seed 22110 \
  "$@"
