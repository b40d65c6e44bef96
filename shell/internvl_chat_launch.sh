# Shared launcher for the InternVL chat 2nd-finetune scripts in shell/internvl2.0/2nd_finetune and
# shell/internvl2.5/2nd_finetune, the MPO scripts and the InternVL3.5 scripts (sourced, not run).
#
# The calling script sets MODEL (empty: it names the model's parts, --vision_path / --llm_path, instead), OUTPUT_DIR
# and the GPUS / BATCH_SIZE / PER_DEVICE_BATCH_SIZE (and MAX_SEQ_LENGTH) defaults, then calls `launch <model-specific flags> "$@"`. Environment (same names as the reference):
#   GPUS                    total GPUs (processes)              BATCH_SIZE           global batch
#   PER_DEVICE_BATCH_SIZE   samples per GPU per micro-step      MASTER_PORT          rendezvous port (34229)
#   MAX_SEQ_LENGTH          tokens per sample (4096, InternVL2's; the InternVL2.5 scripts set 8192)
#   NNODES, NODE_RANK       torchrun over several nodes (default 1, 0): GPUS counts all of them, this node runs
#   MASTER_ADDR             GPUS / NNODES processes and meets the others at MASTER_ADDR (127.0.0.1)
#   PARTITION               set it to launch through Slurm srun (multi-node; LAUNCHER=pytorch forces torchrun,
#                           e.g. to smoke-test the largest full scripts on one machine); GPUS_PER_NODE, CPUS_PER_TASK,
#                           QUOTA_TYPE (passed only when set: plain Slurm has no --quotatype) and SRUN_ARGS
#   META_PATH               meta JSON (default: shell/data/internvl_1_2_finetune_custom.json, the bundled sample)
# Extra arguments to the script are passed to `internvl-tune train` as they are (e.g. --max_steps 10).
# No user string is evaluated by the shell: values are passed as quoted arguments.

META_PATH=${META_PATH:-./shell/data/internvl_1_2_finetune_custom.json}
MASTER_PORT=${MASTER_PORT:-34229}
MAX_SEQ_LENGTH=${MAX_SEQ_LENGTH:-4096}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
CPUS_PER_TASK=${CPUS_PER_TASK:-10}
PYTHON=${PYTHON:-python3}
GRADIENT_ACC=$((BATCH_SIZE / PER_DEVICE_BATCH_SIZE / GPUS))
if [ "$GRADIENT_ACC" -lt 1 ]; then GRADIENT_ACC=1; fi
export TF_CPP_MIN_LOG_LEVEL=3
mkdir -p "$OUTPUT_DIR"

echo "gpus: $GPUS, per-device batch: $PER_DEVICE_BATCH_SIZE, accumulation: $GRADIENT_ACC, global batch: $((GPUS * PER_DEVICE_BATCH_SIZE * GRADIENT_ACC))"

launch() {
  set -- \
    ${MODEL:+--model_name_or_path "$MODEL"} \
    --output_dir "$OUTPUT_DIR" \
    --meta_path "$META_PATH" \
    --overwrite_output_dir True \
    --force_image_size 448 \
    --max_dynamic_patch 6 \
    --down_sample_ratio 0.5 \
    --freeze_backbone True \
    --vision_select_layer -1 \
    --dataloader_num_workers 4 \
    --bf16 True \
    --num_train_epochs 1 \
    --per_device_train_batch_size "$PER_DEVICE_BATCH_SIZE" \
    --gradient_accumulation_steps "$GRADIENT_ACC" \
    --save_strategy steps \
    --save_steps 200 \
    --save_total_limit 1 \
    --warmup_ratio 0.03 \
    --lr_scheduler_type cosine \
    --logging_steps 1 \
    --max_seq_length "$MAX_SEQ_LENGTH" \
    --grad_checkpoint True \
    --group_by_length True \
    --dynamic_image_size True \
    --use_thumbnail True \
    --ps_version v2 \
    --report_to tensorboard \
    "$@"
  # the log goes to the terminal and to training_log.txt; the exit status is the trainer's, not tee's
  status_file="$OUTPUT_DIR/.exit_status"
  {
    if [ -n "${PARTITION:-}" ] && [ "${LAUNCHER:-slurm}" != pytorch ]; then
      NODES=$(( (GPUS + GPUS_PER_NODE - 1) / GPUS_PER_NODE ))
      # shellcheck disable=SC2086  # SRUN_ARGS is the reference's free-form hook for extra srun options
      srun -p "$PARTITION" --gres=gpu:"$GPUS_PER_NODE" --nodes="$NODES" --ntasks="$GPUS" \
        --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 \
        ${QUOTA_TYPE:+--quotatype="$QUOTA_TYPE"} ${SRUN_ARGS:-} \
        "$PYTHON" -u -m internvl_tune.cli train "$@"
    else
      "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
        --nproc_per_node="$((GPUS / NNODES))" --master_port="$MASTER_PORT" \
        -m internvl_tune.cli train "$@"
    fi
    echo $? > "$status_file"
  } 2>&1 | tee -a "$OUTPUT_DIR/training_log.txt"
  status=$(cat "$status_file"); rm -f "$status_file"
  return "$status"
}
