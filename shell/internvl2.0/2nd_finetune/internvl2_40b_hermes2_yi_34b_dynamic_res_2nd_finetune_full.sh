#!/usr/bin/env sh
# InternVL2-40B (InternViT-6B + Nous-Hermes-2-Yi-34B), full fine-tune with dynamic resolution (reference hyper-parameters).
# Launch: GPUS=16 PER_DEVICE_BATCH_SIZE=2 sh shell/internvl2.0/2nd_finetune/internvl2_40b_hermes2_yi_34b_dynamic_res_2nd_finetune_full.sh [extra train flags]
# Multi-node by default: PARTITION=<your partition> GPUS=16 sh shell/internvl2.0/2nd_finetune/internvl2_40b_hermes2_yi_34b_dynamic_res_2nd_finetune_full.sh

PARTITION=${PARTITION:-INTERN2}
GPUS=${GPUS:-16}
BATCH_SIZE=${BATCH_SIZE:-128}
PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE:-2}
MODEL=${MODEL:-./pretrained/InternVL2-40B}
OUTPUT_DIR=${OUTPUT_DIR:-work_dirs/internvl_chat_v2_0/internvl2_40b_hermes2_yi_34b_dynamic_res_2nd_finetune_full}
. "$(dirname "$0")/../../internvl_chat_launch.sh"

launch --conv_style "Hermes-2" --drop_path_rate 0.4 --freeze_llm False --freeze_mlp False \
  --learning_rate 2e-5 --weight_decay 0.05 "$@"
