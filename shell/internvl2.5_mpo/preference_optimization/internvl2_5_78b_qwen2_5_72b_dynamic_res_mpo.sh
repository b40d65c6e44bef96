#!/usr/bin/env sh
# InternVL2.5-78B (InternViT-6B + Qwen2.5-72B), MPO (mixed preference optimization) on MMPR-v1.1 (reference hyper-parameters).
# Launch: PARTITION=<your partition> GPUS=512 sh shell/internvl2.5_mpo/preference_optimization/internvl2_5_78b_qwen2_5_72b_dynamic_res_mpo.sh [extra train flags]
# One node: LAUNCHER=pytorch GPUS=8 BATCH_SIZE=512 sh shell/internvl2.5_mpo/preference_optimization/internvl2_5_78b_qwen2_5_72b_dynamic_res_mpo.sh

PARTITION=${PARTITION:-Intern5}
GPUS=${GPUS:-512}
BATCH_SIZE=${BATCH_SIZE:-512}
PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE:-1}
MODEL=${MODEL:-./pretrained/InternVL2_5-78B}
META_PATH=${META_PATH:-MMPR-v1.1/meta.json}
OUTPUT_DIR=${OUTPUT_DIR:-work_dirs/internvl_chat_v2_5_mpo/Internvl2_5-78B-MPO}
. "$(dirname "$0")/_mpo.sh"

launch_mpo --conv_style "internvl2_5" --drop_path_rate 0.4 --save_strategy steps --save_steps 200 "$@"
