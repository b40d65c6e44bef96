#!/usr/bin/env sh
# InternVL2-26B (InternViT-6B + InternLM2-20B), lora fine-tune with dynamic resolution (reference hyper-parameters).
# Launch: GPUS=2 PER_DEVICE_BATCH_SIZE=2 sh shell/internvl2.0/2nd_finetune/internvl2_26b_internlm2_20b_dynamic_res_2nd_finetune_lora.sh [extra train flags]

GPUS=${GPUS:-2}
BATCH_SIZE=${BATCH_SIZE:-16}
PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE:-2}
MODEL=${MODEL:-./pretrained/InternVL2-26B}
OUTPUT_DIR=${OUTPUT_DIR:-work_dirs/internvl_chat_v2_0/internvl2_26b_internlm2_20b_dynamic_res_2nd_finetune_lora}
. "$(dirname "$0")/../../internvl_chat_launch.sh"

launch --conv_style "internlm2-chat" --drop_path_rate 0.0 --freeze_llm True --freeze_mlp True --use_llm_lora 16 \
  --learning_rate 2e-5 --weight_decay 0.05 "$@"
