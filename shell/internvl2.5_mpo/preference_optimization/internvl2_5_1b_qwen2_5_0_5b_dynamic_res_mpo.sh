#!/usr/bin/env sh
# InternVL2.5-1B (InternViT-300M + Qwen2.5-0.5B), MPO (mixed preference optimization) on MMPR-v1.1 (reference hyper-parameters).
# Launch: PARTITION=<your partition> GPUS=256 sh shell/internvl2.5_mpo/preference_optimization/internvl2_5_1b_qwen2_5_0_5b_dynamic_res_mpo.sh [extra train flags]
# One node: LAUNCHER=pytorch GPUS=8 BATCH_SIZE=256 sh shell/internvl2.5_mpo/preference_optimization/internvl2_5_1b_qwen2_5_0_5b_dynamic_res_mpo.sh

PARTITION=${PARTITION:-Intern5}
GPUS=${GPUS:-256}
BATCH_SIZE=${BATCH_SIZE:-256}
PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE:-1}
MODEL=${MODEL:-./pretrained/InternVL2_5-1B}
META_PATH=${META_PATH:-MMPR-v1.1/meta.json}
OUTPUT_DIR=${OUTPUT_DIR:-work_dirs/internvl_chat_v2_5_mpo/Internvl2_5-1B-MPO}
. "$(dirname "$0")/_mpo.sh"

launch_mpo --conv_style "internvl2_5" --drop_path_rate 0.1 "$@"
