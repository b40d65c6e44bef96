#!/usr/bin/env sh
# InternVL2-1B (InternViT-300M + Qwen2-0.5B), lora fine-tune with dynamic resolution (reference hyper-parameters).
# Launch: GPUS=2 PER_DEVICE_BATCH_SIZE=4 sh shell/internvl2.0/2nd_finetune/internvl2_1b_qwen2_0_5b_dynamic_res_2nd_finetune_lora.sh [extra train flags]

GPUS=${GPUS:-2}
BATCH_SIZE=${BATCH_SIZE:-16}
PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE:-4}
MODEL=${MODEL:-./pretrained/InternVL2-1B}
OUTPUT_DIR=${OUTPUT_DIR:-work_dirs/internvl_chat_v2_0/internvl2_1b_qwen2_0_5b_dynamic_res_2nd_finetune_lora}
. "$(dirname "$0")/../../internvl_chat_launch.sh"

launch --conv_style "Hermes-2" --drop_path_rate 0.0 --freeze_llm True --freeze_mlp True --use_llm_lora 16 \
  --learning_rate 4e-5 --weight_decay 0.01 "$@"
