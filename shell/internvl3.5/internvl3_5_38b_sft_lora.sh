#!/usr/bin/env sh
# InternVL3.5-38B (InternViT-6B-448px-V2_5 + Qwen3-32B), LoRA fine-tuning of the released InternVL3_5-38B: the reference's SFT settings
# with everything frozen but rank-16 LLM adapters, one epoch (environment in _internvl3_5.sh).
# Launch: NPROC_PER_NODE=2 sh shell/internvl3.5/internvl3_5_38b_sft_lora.sh [extra train flags, e.g. --thinking_mode on]

PROJECT_NAME=internvl3_5_38b_sft_lora
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
BATCH_SIZE=${BATCH_SIZE:-16}
MODEL=${MODEL:-./pretrained/InternVL3_5-38B}
. "$(dirname "$0")/_internvl3_5.sh"

launch_sft_lora "$@"
