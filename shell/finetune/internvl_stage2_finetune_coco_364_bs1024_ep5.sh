#!/usr/bin/env sh
# InternVL-14B COCO: full fine-tune at 364 px with layer-wise lr decay 0.9
# (reference recipe: 32 GPUs x 32 = 1024, 5 epochs, drop path 0.3).
# Slurm srun by default; LAUNCHER=pytorch GPUS=8 runs torchrun on one node instead.
# Launch: PARTITION=<partition> GPUS=32 sh shell/finetune/internvl_stage2_finetune_coco_364_bs1024_ep5.sh [flags]

GPUS=${GPUS:-32}
BATCH_SIZE=${BATCH_SIZE:-32}
LAUNCHER=${LAUNCHER:-slurm}
OUTPUT_DIR=${OUTPUT_DIR:-./work_dirs/internvl_stage2_finetune_coco_364_bs1024_ep5}
export VIT_LAYER_DECAY_RATE=${VIT_LAYER_DECAY_RATE:-0.9}
export QLLAMA_LAYER_DECAY_RATE=${QLLAMA_LAYER_DECAY_RATE:-0.9}
. "$(dirname "$0")/../internvl_g_launch.sh"

launch --dataset_name coco_karpathy_train --force_image_size 364 --drop_path_rate 0.3 --use_custom_trainer \
  --num_train_epochs 5 "$@"
