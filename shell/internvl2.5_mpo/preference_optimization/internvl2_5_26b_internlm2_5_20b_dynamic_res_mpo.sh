#!/usr/bin/env sh
# InternVL2.5-26B (InternViT-6B + InternLM2.5-20B), MPO (mixed preference optimization) on MMPR-v1.1 (reference hyper-parameters).
# Launch: PARTITION=<your partition> GPUS=256 sh shell/internvl2.5_mpo/preference_optimization/internvl2_5_26b_internlm2_5_20b_dynamic_res_mpo.sh [extra train flags]
# One node: LAUNCHER=pytorch GPUS=8 BATCH_SIZE=256 sh shell/internvl2.5_mpo/preference_optimization/internvl2_5_26b_internlm2_5_20b_dynamic_res_mpo.sh

PARTITION=${PARTITION:-Intern5}
GPUS=${GPUS:-256}
BATCH_SIZE=${BATCH_SIZE:-256}
PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE:-1}
MODEL=${MODEL:-./pretrained/InternVL2_5-26B}
META_PATH=${META_PATH:-MMPR-v1.1/meta.json}
OUTPUT_DIR=${OUTPUT_DIR:-work_dirs/internvl_chat_v2_5_mpo/Internvl2_5-26B-MPO}
. "$(dirname "$0")/_mpo.sh"

launch_mpo --conv_style "internvl2_5" --drop_path_rate 0.4 "$@"
