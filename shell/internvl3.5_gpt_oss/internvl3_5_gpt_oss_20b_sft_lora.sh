#!/usr/bin/env sh
# InternVL3.5-GPT-OSS-20B-A4B, LoRA fine-tuning of the released InternVL3_5-GPT-OSS-20B-A4B-Preview (the reference
# ships no LoRA script): the stage-2 SFT settings with everything frozen but rank-16 adapters on the LLM's attention
# and on its experts (--moe_experts lora, the default with --use_llm_lora; routers frozen), one epoch. Environment in
# ../internvl3.5/_internvl3_5.sh.
# Launch: NPROC_PER_NODE=8 sh shell/internvl3.5_gpt_oss/internvl3_5_gpt_oss_20b_sft_lora.sh [extra train flags, e.g. --moe_experts frozen]

PROJECT_NAME=internvl3_5_gpt_oss_20b_sft_lora
BATCH_SIZE=${BATCH_SIZE:-16}
MODEL=${MODEL:-./pretrained/InternVL3_5-GPT-OSS-20B-A4B-Preview}
. "$(dirname "$0")/../internvl3.5/_internvl3_5.sh"

launch_sft_lora \
  --conv_style internvl3_5_gpt_oss \
  --use_custom_flash_attn True \
  "$@"
