# Shared launcher for the InternVL-C/G retrieval fine-tuning scripts in shell/finetune, shell/head_finetune and
# shell/lora_finetune (sourced, not run).
#
# The calling script sets the defaults of GPUS, BATCH_SIZE, LAUNCHER and OUTPUT_DIR, then calls
# `launch <recipe flags> "$@"`. Environment (the reference's names where it has them):
#   GPUS             total GPUs (processes)                 BATCH_SIZE      samples per GPU (no accumulation)
#   MODEL            base checkpoint (./pretrained/InternVL-14B-224px)
#   DATA_ROOT        folder holding flickr30k/ and coco/ (./data); DATA_ROOT=examples/sample runs on the bundled sample
#   OUTPUT_DIR       run directory (the reference's work_dirs/... name)
#   LAUNCHER         slurm: srun, one task per GPU (PARTITION, GPUS_PER_NODE, CPUS_PER_TASK, QUOTA_TYPE, SRUN_ARGS
#                    as in the reference; --quotatype is passed only when QUOTA_TYPE is set, since it exists only on
#                    some clusters); pytorch: torchrun on this node (MASTER_PORT, default 34229)
#   PYTHON           interpreter (python3)
# Extra arguments to the script are passed to `internvl-tune retrieval-train` as they are and win over the defaults
# (e.g. --max_steps 10, --resume_from_checkpoint auto). No user string is evaluated by the shell.

MODEL=${MODEL:-./pretrained/InternVL-14B-224px}
DATA_ROOT=${DATA_ROOT:-./data}
MASTER_PORT=${MASTER_PORT:-34229}
PARTITION=${PARTITION:-VC2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-10}
QUOTA_TYPE=${QUOTA_TYPE:-}
PYTHON=${PYTHON:-python3}
export TF_CPP_MIN_LOG_LEVEL=3
mkdir -p "$OUTPUT_DIR"

echo "launcher: $LAUNCHER, gpus: $GPUS, batch per gpu: $BATCH_SIZE, global batch: $((GPUS * BATCH_SIZE))"

launch() {
  set -- \
    --model_name_or_path "$MODEL" \
    --data_root "$DATA_ROOT" \
    --output_dir "$OUTPUT_DIR" \
    --overwrite_output_dir True \
    --dataloader_num_workers 2 \
    --pad_to_max_length True \
    --bf16 True \
    --per_device_train_batch_size "$BATCH_SIZE" \
    --gradient_accumulation_steps 1 \
    --evaluation_strategy no \
    --save_strategy steps \
    --save_steps 100 \
    --save_total_limit 5 \
    --learning_rate 1e-6 \
    --weight_decay 0.05 \
    --warmup_steps 100 \
    --lr_scheduler_type cosine \
    --logging_steps 1 \
    --max_seq_length 80 \
    --do_train True \
    --optim adamw_torch \
    --report_to tensorboard \
    "$@"
  # the log goes to the terminal and to training_log.txt; the exit status is the trainer's, not tee's
  status_file="$OUTPUT_DIR/.exit_status"
  {
    if [ "$LAUNCHER" = "slurm" ]; then
      NODES=$(( (GPUS + GPUS_PER_NODE - 1) / GPUS_PER_NODE ))
      # shellcheck disable=SC2086  # SRUN_ARGS is the reference's free-form hook for extra srun options
      srun -p "$PARTITION" --gres=gpu:"$GPUS_PER_NODE" --nodes="$NODES" --ntasks="$GPUS" \
        --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 \
        ${QUOTA_TYPE:+--quotatype="$QUOTA_TYPE"} ${SRUN_ARGS:-} \
        "$PYTHON" -u -m internvl_tune.cli retrieval-train "$@"
    else
      "$PYTHON" -m torch.distributed.run --nnodes=1 --node_rank=0 --master_addr=127.0.0.1 \
        --nproc_per_node="$GPUS" --master_port="$MASTER_PORT" \
        -m internvl_tune.cli retrieval-train "$@"
    fi
    echo $? > "$status_file"
  } 2>&1 | tee -a "$OUTPUT_DIR/training_log.txt"
  status=$(cat "$status_file"); rm -f "$status_file"
  return "$status"
}
