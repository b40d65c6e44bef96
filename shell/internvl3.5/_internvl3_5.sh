# Shared part of the InternVL3.5 scripts in this folder (sourced, not run). They are the reference's
# internvl_chat_gpt_oss/shell/internvl3_5_qwen3/internvl3_5_*_{sft,mpo}.sh with internvl-tune underneath: the same
# environment and the same flags (those internvl-tune has no use for, such as --deepspeed or the packed dataset's
# buffer settings, are accepted and ignored; `internvl-tune train --help` lists them), plus LoRA variants.
#
# Environment (the reference's names):
#   NPROC_PER_NODE          GPUs per node (8)                   WORLD_SIZE    nodes (1)
#   RANK                    this node's rank (0)                MASTER_ADDR   the first node's address (127.0.0.1)
#   BATCH_SIZE              global batch                        PER_DEVICE_BATCH_SIZE   samples (packed rows) per GPU (1)
#   MASTER_PORT             rendezvous port (34229)             META_PATH     meta JSON (default: the bundled sample)
#   MODEL                   checkpoint directory (default ./pretrained/<the release the reference starts from>)
# Every node runs the script (torchrun, as the reference); extra arguments go to `internvl-tune train`.
# The calling script sets PROJECT_NAME, MODEL and the BATCH_SIZE default, then calls launch_sft or launch_mpo.

NPROC_PER_NODE=${NPROC_PER_NODE:-8}
NNODES=${WORLD_SIZE:-1}
NODE_RANK=${RANK:-0}
GPUS=$((NPROC_PER_NODE * NNODES))
PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE:-1}
TASK_NAME=$(basename "$0")
TASK_NAME=${TASK_NAME%.*}
OUTPUT_DIR=${OUTPUT_DIR:-work_dirs/$PROJECT_NAME/$TASK_NAME}
LAUNCHER=pytorch  # torchrun on every node, as the reference's scripts (no srun)
. "$(dirname "$0")/../internvl_chat_launch.sh"

# The flags every reference InternVL3.5 script passes.
launch_internvl3_5() {
  launch \
    --conv_style internvl2_5 \
    --use_fast_tokenizer False \
    --force_image_size 448 \
    --max_dynamic_patch 12 \
    --down_sample_ratio 0.5 \
    --min_num_frame 8 \
    --max_num_frame 32 \
    --freeze_llm False \
    --freeze_mlp False \
    --freeze_backbone False \
    --vision_select_layer -1 \
    --dataloader_num_workers 16 \
    --bf16 True \
    --save_strategy steps \
    --weight_decay 0.05 \
    --warmup_ratio 0.03 \
    --lr_scheduler_type cosine \
    --logging_steps 1 \
    --do_train True \
    --grad_checkpoint True \
    --gradient_checkpointing True \
    --group_by_length False \
    --dynamic_image_size True \
    --use_thumbnail True \
    --ps_version v2 \
    --use_custom_flash_attn False \
    --report_to tensorboard \
    --deepspeed zero_stage3_config.json \
    --seed 42 \
    "$@"
}

# The reference's SFT settings (32k-token packed rows, square loss reduction, 8000 steps from the -Pretrained model).
launch_sft() {
  launch_internvl3_5 \
    --max_steps 8000 \
    --save_steps 500 \
    --save_total_limit 100 \
    --learning_rate 8e-5 \
    --max_seq_length 32768 \
    --split_annotations True \
    --use_packed_ds True \
    --num_images_expected 96 \
    --max_packed_tokens 32768 \
    --max_buffer_size 20 \
    --log_freq 1000 \
    --strict_mode False \
    --replacement True \
    --allow_overflow False \
    --remove_unused_columns False \
    --loss_reduction square \
    "$@"
}

# The reference's MPO settings (from the -Instruct model: 0.8 x sigmoid + 0.2 x bco_pair + 1 x NLL, which the
# reference sets in its code and --objective mpo defaults to).
launch_mpo() {
  launch_internvl3_5 \
    --objective mpo \
    --num_train_epochs 1 \
    --save_steps 200 \
    --save_total_limit 50 \
    --learning_rate 2e-7 \
    --max_seq_length 16384 \
    --split_annotations False \
    "$@"
}

# LoRA on the released model (the reference ships no LoRA script for InternVL3.5): the SFT settings with the ViT,
# projector and LLM frozen, rank-16 adapters on every LLM attention and MLP linear, one epoch instead of 8000 steps.
launch_sft_lora() {
  launch_sft --freeze_llm True --freeze_mlp True --freeze_backbone True --use_llm_lora 16 --drop_path_rate 0.0 \
    --learning_rate 4e-5 --max_steps -1 --num_train_epochs 1 "$@"
}
