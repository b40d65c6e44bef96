#!/usr/bin/env sh
# InternVL3.5-241B-A28B (InternViT-6B-448px-V2_5 + Qwen3-235B-A22B, 128 experts, 8 per token), LoRA fine-tuning of the released InternVL3_5-241B-A28B: the reference's SFT
# settings with everything frozen but rank-16 adapters on the LLM's attention and on its experts (--moe_experts lora,
# the default with --use_llm_lora; routers frozen), one epoch (environment in _internvl3_5.sh).
# Launch: NPROC_PER_NODE=8 sh shell/internvl3.5/internvl3_5_241b_sft_lora.sh [extra train flags, e.g. --moe_experts frozen]

PROJECT_NAME=internvl3_5_241b_sft_lora
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
BATCH_SIZE=${BATCH_SIZE:-16}
MODEL=${MODEL:-./pretrained/InternVL3_5-241B-A28B}
. "$(dirname "$0")/_internvl3_5.sh"

launch_sft_lora "$@"
