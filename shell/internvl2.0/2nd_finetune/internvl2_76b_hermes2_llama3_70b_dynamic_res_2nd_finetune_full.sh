#!/usr/bin/env sh
# InternVL2-Llama3-76B (InternViT-6B + Hermes-2-Theta-Llama-3-70B), full fine-tune with dynamic resolution (reference hyper-parameters).
# Launch: GPUS=32 PER_DEVICE_BATCH_SIZE=1 sh shell/internvl2.0/2nd_finetune/internvl2_76b_hermes2_llama3_70b_dynamic_res_2nd_finetune_full.sh [extra train flags]
# Multi-node by default: PARTITION=<your partition> GPUS=32 sh shell/internvl2.0/2nd_finetune/internvl2_76b_hermes2_llama3_70b_dynamic_res_2nd_finetune_full.sh

PARTITION=${PARTITION:-INTERN2}
GPUS=${GPUS:-32}
BATCH_SIZE=${BATCH_SIZE:-128}
PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE:-1}
MODEL=${MODEL:-./pretrained/InternVL2-Llama3-76B}
OUTPUT_DIR=${OUTPUT_DIR:-work_dirs/internvl_chat_v2_0/internvl2_76b_hermes2_llama3_70b_dynamic_res_2nd_finetune_full}
. "$(dirname "$0")/../../internvl_chat_launch.sh"

launch --conv_style "internlm2-chat" --drop_path_rate 0.4 --freeze_llm False --freeze_mlp False \
  --learning_rate 2e-5 --weight_decay 0.05 "$@"
