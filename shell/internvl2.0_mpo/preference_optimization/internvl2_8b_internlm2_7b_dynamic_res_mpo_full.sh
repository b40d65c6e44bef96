#!/usr/bin/env sh
# InternVL2-8B (InternViT-300M + InternLM2.5-7B), MPO (mixed preference optimization) on MMPR, full fine-tune
# (reference hyper-parameters: those of the InternVL2.5 MPO scripts but lr 5e-6, 6144 tokens, internlm2-chat).
# Launch: PARTITION=<your partition> GPUS=256 sh shell/internvl2.0_mpo/preference_optimization/internvl2_8b_internlm2_7b_dynamic_res_mpo_full.sh
# One node: LAUNCHER=pytorch GPUS=8 BATCH_SIZE=256 sh shell/internvl2.0_mpo/preference_optimization/internvl2_8b_internlm2_7b_dynamic_res_mpo_full.sh

PARTITION=${PARTITION:-Intern5}
GPUS=${GPUS:-256}
BATCH_SIZE=${BATCH_SIZE:-256}
PER_DEVICE_BATCH_SIZE=${PER_DEVICE_BATCH_SIZE:-1}
MODEL=${MODEL:-./pretrained/InternVL2-8B}
META_PATH=${META_PATH:-MMPR/meta.json}
OUTPUT_DIR=${OUTPUT_DIR:-work_dirs/internvl_chat_v2_0/internvl2_8b_internlm2_7b_dynamic_res_mpo_full}
. "$(dirname "$0")/../../internvl2.5_mpo/preference_optimization/_mpo.sh"

launch_mpo --conv_style "internlm2-chat" --drop_path_rate 0.1 --learning_rate 5e-6 --max_seq_length 6144 "$@"
