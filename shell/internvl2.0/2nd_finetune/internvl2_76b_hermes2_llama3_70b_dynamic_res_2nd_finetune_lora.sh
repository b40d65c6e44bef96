#!/usr/bin/env sh
# InternVL2-Llama3-76B (InternViT-6B + Hermes-2-Theta-Llama-3-70B), lora fine-tune with dynamic resolution (reference hyper-parameters).
# Launch: GPUS=8 PER_DEVICE_BATCH_SIZE=1 sh shell/internvl2.0/2nd_finetune/internvl2_76b_hermes2_llama3_70b_dynamic_res_2nd_finetune_lora.sh [extra train flags]

GPUS=${GPUS:-8}
BATCH_SIZE=${BATCH_SIZE:-16}
PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE:-1}
MODEL=${MODEL:-./pretrained/InternVL2-Llama3-76B}
OUTPUT_DIR=${OUTPUT_DIR:-work_dirs/internvl_chat_v2_0/internvl2_76b_hermes2_llama3_70b_dynamic_res_2nd_finetune_lora}
. "$(dirname "$0")/../../internvl_chat_launch.sh"

launch --conv_style "internlm2-chat" --drop_path_rate 0.0 --freeze_llm True --freeze_mlp True --use_llm_lora 16 \
  --learning_rate 2e-5 --weight_decay 0.05 "$@"
