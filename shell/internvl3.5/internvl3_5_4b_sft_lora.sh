#!/usr/bin/env sh
# InternVL3.5-4B (InternViT-300M-448px-V2_5 + Qwen3-4B), LoRA fine-tuning of the released InternVL3_5-4B: the reference's SFT settings
# with everything frozen but rank-16 LLM adapters, one epoch (environment in _internvl3_5.sh).
# Launch: NPROC_PER_NODE=2 sh shell/internvl3.5/internvl3_5_4b_sft_lora.sh [extra train flags, e.g. --thinking_mode on]

PROJECT_NAME=internvl3_5_4b_sft_lora
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
BATCH_SIZE=${BATCH_SIZE:-16}
MODEL=${MODEL:-./pretrained/InternVL3_5-4B}
. "$(dirname "$0")/_internvl3_5.sh"

launch_sft_lora "$@"
