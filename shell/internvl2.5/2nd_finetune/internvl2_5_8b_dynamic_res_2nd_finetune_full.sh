#!/usr/bin/env sh
# InternVL2.5-8B (InternViT-300M-448px-V2_5 + internlm2_5-7b-chat), full fine-tune with dynamic resolution (reference hyper-parameters).
# Launch: GPUS=8 PER_DEVICE_BATCH_SIZE=4 sh shell/internvl2.5/2nd_finetune/internvl2_5_8b_dynamic_res_2nd_finetune_full.sh [extra train flags]

GPUS=${GPUS:-8}
BATCH_SIZE=${BATCH_SIZE:-128}
PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE:-4}
MAX_SEQ_LENGTH=${MAX_SEQ_LENGTH:-8192}
MODEL=${MODEL:-./pretrained/InternVL2_5-8B}
OUTPUT_DIR=${OUTPUT_DIR:-work_dirs/internvl_chat_v2_5/internvl2_5_8b_dynamic_res_2nd_finetune_full}
. "$(dirname "$0")/../../internvl_chat_launch.sh"

launch --conv_style "internvl2_5" --drop_path_rate 0.1 --freeze_llm False --freeze_mlp False \
  --learning_rate 4e-5 --weight_decay 0.05 "$@"
