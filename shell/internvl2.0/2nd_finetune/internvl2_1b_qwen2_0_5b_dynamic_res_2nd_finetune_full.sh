#!/usr/bin/env sh
# InternVL2-1B (InternViT-300M + Qwen2-0.5B), full fine-tune with dynamic resolution (reference hyper-parameters).
# Launch: GPUS=8 PER_DEVICE_BATCH_SIZE=4 sh shell/internvl2.0/2nd_finetune/internvl2_1b_qwen2_0_5b_dynamic_res_2nd_finetune_full.sh [extra train flags]

GPUS=${GPUS:-8}
BATCH_SIZE=${BATCH_SIZE:-128}
PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE:-4}
MODEL=${MODEL:-./pretrained/InternVL2-1B}
OUTPUT_DIR=${OUTPUT_DIR:-work_dirs/internvl_chat_v2_0/internvl2_1b_qwen2_0_5b_dynamic_res_2nd_finetune_full}
. "$(dirname "$0")/../../internvl_chat_launch.sh"

launch --conv_style "Hermes-2" --drop_path_rate 0.1 --freeze_llm False --freeze_mlp False \
  --learning_rate 4e-5 --weight_decay 0.01 "$@"
