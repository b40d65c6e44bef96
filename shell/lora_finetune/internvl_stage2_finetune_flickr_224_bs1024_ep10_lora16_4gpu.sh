#!/usr/bin/env sh
# InternVL-14B Flickr30K: LoRA rank 16 (ViT + QLLaMA) + head fine-tune at 224 px.
# Reference recipe: 4 GPUs x 32 = 128 per step (despite "bs1024" in the name), 10 epochs.
# torchrun on this node by default; LAUNCHER=slurm uses srun.
# Launch: GPUS=4 BATCH_SIZE=32 sh shell/lora_finetune/internvl_stage2_finetune_flickr_224_bs1024_ep10_lora16_4gpu.sh [flags]

GPUS=${GPUS:-4}
BATCH_SIZE=${BATCH_SIZE:-32}
LAUNCHER=${LAUNCHER:-pytorch}
OUTPUT_DIR=${OUTPUT_DIR:-work_dirs/internvl_stage2_finetune_flickr_364_bs1024_ep10_lora_4gpu}
. "$(dirname "$0")/../internvl_g_launch.sh"

launch --dataset_name flickr30k_en_train --freeze_model --freeze_vision_model --freeze_qllama --unfreeze_qllama_head \
  --use_backbone_lora 16 --use_qllama_lora 16 --force_image_size 224 --drop_path_rate 0.0 --num_train_epochs 10 "$@"
