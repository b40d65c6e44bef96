# Shared part of the MPO (mixed preference optimization) scripts (sourced, not run): the 2nd-finetune launcher
# (shell/internvl_chat_launch.sh: GPUS, BATCH_SIZE, PER_DEVICE_BATCH_SIZE, PARTITION, LAUNCHER,
# META_PATH, MASTER_PORT ...) with the hyper-parameters every reference MPO script shares. The calling script sets
# MODEL, OUTPUT_DIR, META_PATH and the GPU defaults, then calls `launch_mpo <model-specific flags> "$@"`.
# The reference also passes --deepspeed zero_stage3_config.json (ZeRO-3: FSDP2's default sharding here, so left out;
# `internvl-tune train --deepspeed FILE` translates a file), --use_liger and --evaluation_strategy (accepted and
# ignored by `internvl-tune train`, so left out).

. "$(dirname "$0")/../../internvl_chat_launch.sh"

launch_mpo() {
  launch \
    --objective mpo \
    --force_image_size 448 \
    --max_dynamic_patch 12 \
    --down_sample_ratio 0.5 \
    --pad2square False \
    --freeze_llm False \
    --freeze_mlp False \
    --freeze_backbone False \
    --vision_select_layer -1 \
    --dataloader_num_workers 8 \
    --bf16 True \
    --num_train_epochs 1 \
    --save_strategy no \
    --save_steps 100 \
    --save_total_limit 100 \
    --learning_rate 1e-6 \
    --weight_decay 0.05 \
    --warmup_ratio 0.03 \
    --lr_scheduler_type cosine \
    --logging_steps 1 \
    --max_seq_length 8192 \
    --grad_checkpoint True \
    --group_by_length False \
    --dynamic_image_size True \
    --use_thumbnail True \
    --ps_version v2 \
    --report_to tensorboard \
    --loss_type sigmoid,bco_pair \
    --sigmoid_loss_weight 0.8 \
    --bco_pair_loss_weight 0.2 \
    --rpo_alpha 1 \
    "$@"
}
