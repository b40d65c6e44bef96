#!/usr/bin/env sh
# InternVL2.5-2B (InternViT-300M-448px-V2_5 + internlm2_5-1_8b-chat), lora fine-tune with dynamic resolution (reference hyper-parameters).
# Launch: GPUS=2 PER_DEVICE_BATCH_SIZE=4 sh shell/internvl2.5/2nd_finetune/internvl2_5_2b_dynamic_res_2nd_finetune_lora.sh [extra train flags]

GPUS=${GPUS:-2}
BATCH_SIZE=${BATCH_SIZE:-16}
PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE:-4}
MAX_SEQ_LENGTH=${MAX_SEQ_LENGTH:-8192}
MODEL=${MODEL:-./pretrained/InternVL2_5-2B}
OUTPUT_DIR=${OUTPUT_DIR:-work_dirs/internvl_chat_v2_5/internvl2_5_2b_dynamic_res_2nd_finetune_lora}
. "$(dirname "$0")/../../internvl_chat_launch.sh"

launch --conv_style "internvl2_5" --drop_path_rate 0.0 --freeze_llm True --freeze_mlp True --use_llm_lora 16 \
  --learning_rate 4e-5 --weight_decay 0.01 "$@"
