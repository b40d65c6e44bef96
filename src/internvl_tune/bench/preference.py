"""Preference tuning (DPO, MPO) on a random-weight shape: our trainer's step against the plain peft DPO loop.

Synthetic pairs: 1-4 tiles of 448 px (256 tokens each), a question of 32-256 text tokens, and chosen and rejected
answers of 32-512 tokens each (supervised). Ours is ``internvl-tune train --objective dpo|mpo --use_llm_lora 16
--use_packed_ds True --grad_checkpoint True``: both rows of every pair in packed rows of ``packed_tokens``, one
computation of a pair's image features for both rows, the reference pass = the policy with its adapters disabled,
under ``no_grad``. The baseline is ``bench/plain.py``'s ``PlainDPOLoop`` on the same pairs, one pair per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from internvl_tune.bench.common import TOKENS_PER_TILE
from internvl_tune.bench.compare import MemoryWatch
from internvl_tune.bench.ours import StepLoop, build_chat, prepare_step
from internvl_tune.constants import IGNORE_INDEX
from internvl_tune.data.batching import PackedBatchSampler


@dataclass
class SyntheticPair:
    tiles: int
    question: int
    chosen: int
    rejected: int

    @property
    def tokens(self) -> int:
        """Both rows: each holds the image tokens, the question and its answer."""
        prompt = self.tiles * TOKENS_PER_TILE + self.question
        return 2 * prompt + self.chosen + self.rejected


def synthetic_pairs(n: int, seed: int = 0, tiles=(1, 4), question=(32, 256), answer=(32, 512)) -> list[SyntheticPair]:
    """``n`` pairs with sizes uniform in the given inclusive ranges."""
    g = torch.Generator().manual_seed(seed)

    def draw(lo_hi):
        return torch.randint(lo_hi[0], lo_hi[1] + 1, (n,), generator=g).tolist()

    return [SyntheticPair(*sizes) for sizes in zip(draw(tiles), draw(question), draw(answer), draw(answer))]


def materialize_pair(pair: SyntheticPair, image_token_id: int, vocab: int, seed: int, image_size: int = 448) -> dict:
    """The tensors of one pair, as ``data.preference.PreferenceDataset`` returns them."""
    g = torch.Generator().manual_seed(seed)
    high = min(vocab, image_token_id) - 1
    prompt = torch.cat([torch.full((pair.tiles * TOKENS_PER_TILE,), image_token_id),
                        torch.randint(0, high, (pair.question,), generator=g)])
    out = {"pixel_values": torch.randn(pair.tiles, 3, image_size, image_size, generator=g),
           "image_flags": torch.ones(pair.tiles, dtype=torch.long), "sample_id": str(seed)}
    for side, length in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        ids = torch.cat([prompt, torch.randint(0, high, (length,), generator=g)])
        labels = ids.clone()
        labels[: len(prompt)] = IGNORE_INDEX
        out[f"{side}_input_ids"], out[f"{side}_labels"] = ids, labels
    return out


def pair_packs(pairs: list[SyntheticPair], packed_tokens: int) -> list[list[int]]:
    """Packs of pairs (both rows of a pair in one pack), by the trainer's packer."""
    packer = PackedBatchSampler([p.tokens for p in pairs], packed_tokens, 1, 0, 1, seed=0,
                                tiles=[p.tiles for p in pairs], max_tiles=64)
    return [p for _, micros in packer.epoch_steps(0) for p in micros]


def build_ours_preference(objective: str, shape: str, pairs: list[SyntheticPair], device: torch.device,
                          packed_tokens: int, compile: bool, lora_rank: int = 16, grad_checkpoint: str = "True",
                          data: dict | None = None) -> StepLoop:
    """Our DPO or MPO step on packs of ``pairs`` (see the module docstring); ``data``: materialized pairs to share."""
    from internvl_tune.data.preference import PreferenceCollator
    from internvl_tune.dist import all_reduce_sum
    from internvl_tune.dist.parallelize import parse_grad_checkpoint
    from internvl_tune.models.internvl_chat.lora import add_lora
    from internvl_tune.models.internvl_chat.objectives.preference import PreferenceTrainModule
    from internvl_tune.models.internvl_chat.objectives.preference_loss import PreferenceArgs

    memory = MemoryWatch(device)
    with memory.holding():
        chat = build_chat(shape, "sdpa", device)
        chat.model.requires_grad_(False)
        add_lora(chat, llm_rank=lora_rank)
        module = PreferenceTrainModule(chat, PreferenceArgs(objective=objective).resolve(), all_reduce_sum)
        stepper, estimate, mode, _ = prepare_step(module, chat, device, compile,
                                                  parse_grad_checkpoint(grad_checkpoint), packed_tokens, 0.05)
    cfg = chat.model.config
    data = {} if data is None else data

    def pair(i: int) -> dict:
        if i not in data:
            data[i] = materialize_pair(pairs[i], cfg.image_token_id, cfg.text_config.vocab_size, i)
        return data[i]

    collate = PreferenceCollator(True, 0, chat.img_context_token_id, chat.num_image_token)
    name = f"ours {objective}" + (" + compile" if compile else "") + (f" + ckpt {grad_checkpoint}" if mode else "")
    return StepLoop(name + f" + LoRA r{lora_rank}", module, stepper, lambda pack: collate([pair(i) for i in pack]),
                    lambda pack: 0.0, device, memory, estimate.total, {"collator": collate, "pair": pair})


def pins(collator_cls, samples: list[dict], img_context_token_id: int, num_image_token: int) -> dict[str, str]:
    """Pin a padded and a packed batch of ``samples`` as the DataLoader's pin thread does: layout -> "ok" or the
    error (issue 26: padded preference batches failed here on CUDA)."""
    out = {}
    for packed in (False, True):
        batch = collator_cls(packed, 0, img_context_token_id, num_image_token)(samples)
        try:
            batch.pin_memory()
            out["packed" if packed else "padded"] = "ok"
        except RuntimeError as exc:
            out["packed" if packed else "padded"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out
