#!/bin/sh
# Zero-shot caption evaluation, with the command line of the InternVL evaluate.sh scripts:
#
#   sh evaluate.sh pretrained/InternVL-14B-224px caption-coco          # InternVL-G: 'English caption:', 5 beams
#   GPUS=8 sh evaluate.sh pretrained/InternVL2-8B caption --dynamic_image_size   # an InternVL2 chat model, all three sets
#
# TASK: caption (COCO + Flickr30K + NoCaps) | caption-coco | caption-flickr30k | caption-nocaps.
# Flags after TASK go to `internvl-tune eval caption` (--data_root data --output_dir results --batch_size N ...).
# GPUS: processes to start (default: the number of visible GPUs, 1 without any); MASTER_PORT (default 63667);
# PYTHON: the interpreter that has internvl-tune installed (default: python).
set -eu

usage() {
    echo "usage: [GPUS=N] sh evaluate.sh MODEL caption|caption-coco|caption-flickr30k|caption-nocaps [FLAGS...]" >&2
    exit 2
}
[ $# -ge 2 ] || usage
MODEL=$1
TASK=$2
shift 2
case "$TASK" in
    caption) DATASETS=coco,flickr30k,nocaps ;;
    caption-coco) DATASETS=coco ;;
    caption-flickr30k) DATASETS=flickr30k ;;
    caption-nocaps) DATASETS=nocaps ;;
    *) echo "evaluate.sh: unknown task '$TASK'" >&2; usage ;;
esac

PYTHON=${PYTHON:-python}
if [ -z "${GPUS:-}" ]; then
    GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)' 2>/dev/null || echo 1)
fi
MASTER_PORT=${MASTER_PORT:-63667}
echo "evaluate.sh: $TASK on $MODEL with $GPUS process(es)"

# `python -m torch.distributed.run` is torchrun, run by the interpreter that has this package.
exec "$PYTHON" -m torch.distributed.run --nnodes=1 --node_rank=0 --master_addr=127.0.0.1 \
    --nproc_per_node="$GPUS" --master_port="$MASTER_PORT" \
    -m internvl_tune.cli eval caption --model_name_or_path "$MODEL" --datasets "$DATASETS" "$@"
