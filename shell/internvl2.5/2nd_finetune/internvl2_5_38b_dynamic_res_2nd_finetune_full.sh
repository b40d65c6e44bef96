#!/usr/bin/env sh
# InternVL2.5-38B (InternViT-6B-448px-V2_5 + Qwen2.5-32B-Instruct), full fine-tune with dynamic resolution (reference hyper-parameters).
# Launch: GPUS=16 PER_DEVICE_BATCH_SIZE=2 sh shell/internvl2.5/2nd_finetune/internvl2_5_38b_dynamic_res_2nd_finetune_full.sh [extra train flags]
# Multi-node by default: PARTITION=<your partition> GPUS=16 sh shell/internvl2.5/2nd_finetune/internvl2_5_38b_dynamic_res_2nd_finetune_full.sh

PARTITION=${PARTITION:-VC5}
GPUS=${GPUS:-16}
BATCH_SIZE=${BATCH_SIZE:-128}
PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE:-2}
MAX_SEQ_LENGTH=${MAX_SEQ_LENGTH:-8192}
MODEL=${MODEL:-./pretrained/InternVL2_5-38B}
OUTPUT_DIR=${OUTPUT_DIR:-work_dirs/internvl_chat_v2_5/internvl2_5_38b_dynamic_res_2nd_finetune_full}
. "$(dirname "$0")/../../internvl_chat_launch.sh"

launch --conv_style "internvl2_5" --drop_path_rate 0.4 --freeze_llm False --freeze_mlp False \
  --learning_rate 2e-5 --weight_decay 0.05 "$@"
