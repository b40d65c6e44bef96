"""Batched sampling with a KV cache for InternVL2 chat models: what online RL (GRPO) rolls out with.

transformers' ``generate`` does the same job, but it draws from one global random stream (a batch's samples then
depend on what else is in the batch and on the rank) and has no hook for several processes that must run the same
number of forward calls. This engine runs the LLM's decoder layers itself, over a cache of its own:

- **Prompts** come as input embeddings (image features already in place), **left-padded**; position ids count the
  real tokens only (``cumsum(mask) - 1``, as ``generate`` does). Each prompt is prefilled once and its keys/values
  copied to its ``repeats`` completions (GRPO's group of G).
- **Sampling**: temperature, then top-k, then top-p (transformers' ``TemperatureLogitsWarper``,
  ``TopKLogitsWarper``, ``TopPLogitsWarper``, in that order and with the same rules), then one draw by inverting the
  cumulative distribution at a uniform number. The uniform number is a hash of the row's *key* and the token's
  position (a counter-based generator): a completion depends only on its key (the caller derives it from the seed,
  the step, the prompt and the completion's index) and on the model, not on the batch, the rank or any saved
  generator state. So a resumed run draws the same completions, and 2 ranks draw what 1 rank draws.
  Temperature 0 is greedy (the most likely token; ties to the lowest id, as ``argmax``).
- **Stopping**: a row is done after one of ``stop_token_ids`` (kept in its completion) or ``max_new_tokens``; later
  positions hold ``pad_token_id``. Whether all rows are done is read back every ``sync_every`` tokens (each read
  is a host sync), summed over ranks by ``all_reduce_sum``: every rank then runs the same number of decode steps,
  which collectives inside the model (FSDP) need.
- **Two cache layouts**: ``static=False`` keeps keys/values for the tokens so far (each step attends over what
  exists); ``static=True`` preallocates ``prompt + max_new_tokens`` slots (rounded up to 64) and runs every decode
  step on the same shapes, so the step can be compiled once (``compile=True``: ``torch.compile`` with CUDA graphs
  on GPUs) and replayed for every token. Both give the same tokens.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass

import torch

MASK32 = 0xFFFFFFFF
SLOT_ROUNDING = 64  # static caches are rounded up to this many positions: fewer distinct compiled shapes


@dataclass(frozen=True)
class Sampling:
    """How to pick each next token.

    Attributes:
        max_new_tokens: most tokens per completion (the stop token included).
        temperature: logits are divided by it; 0 picks the most likely token (greedy).
        top_p: keep the most likely tokens whose probabilities sum to at least ``top_p`` (1 = all).
        top_k: keep the ``top_k`` most likely tokens (0 = all).
        stop_token_ids: tokens that end a completion (kept as its last token).
        pad_token_id: what fills a row after it stopped.
        suppress_token_ids: tokens never generated (InternVL's image tokens: a completion holding ``<IMG_CONTEXT>``
            would ask for image features that do not exist).
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    suppress_token_ids: tuple[int, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generated:
    """Completions of a batch: ``tokens`` [B, T] (``pad_token_id`` after a row's stop), ``lengths`` [B] (tokens up to
    and including the stop token), ``stopped`` [B] (ended by a stop token rather than ``max_new_tokens``) and the
    number of decode ``steps`` run."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    stopped: torch.Tensor
    steps: int


# ------------------------------------------------------------------------------------------- counter-based sampling
def _mul32(x, c: int):
    """``x * c mod 2**32`` for ``x`` below 2**32, in 16-bit halves so int64 never overflows (tensor or int)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def mix32(x):
    """A 32-bit integer hash (Wellons' lowbias32) of ``x`` in ``[0, 2**32)``; works on ints and int64 tensors alike."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_key(*parts: int) -> int:
    """The key of one random stream from integers (seed, step, prompt, completion, ...): a chain of :func:`mix32`."""
    key = 0x9E3779B9
    for part in parts:
        key = mix32(key ^ mix32(int(part) & MASK32))
    return key


def uniforms(keys: torch.Tensor, position) -> torch.Tensor:
    """One uniform number in [0, 1) per row (float64, 53 random bits) for token ``position`` of the row's stream."""
    h1 = mix32(keys ^ mix32(position * 2 + 1 if isinstance(position, int) else (position * 2 + 1) & MASK32))
    h2 = mix32(h1 ^ 0x85EBCA6B)
    return (h1 * 2**21 + (h2 >> 11)).double() / 2.0**53


def filter_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """fp32 logits [B, V] after temperature, top-k and top-p; removed tokens are -inf (transformers' rules)."""
    scores = logits.float() / sampling.temperature
    if 0 < sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k)[0][..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= 1 - sampling.top_p
        remove[..., -1:] = False  # keep at least the most likely token
        scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return scores


def sample_tokens(logits: torch.Tensor, sampling: Sampling, keys: torch.Tensor | None, position) -> torch.Tensor:
    """The next token of each row: greedy, or drawn from the filtered distribution at the rows' uniform numbers."""
    if sampling.suppress_token_ids:
        logits = logits.index_fill(1, torch.tensor(sampling.suppress_token_ids, device=logits.device), float("-inf"))
    if sampling.greedy or keys is None:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, sampling).softmax(dim=-1).double()
    cdf = probs.cumsum(dim=-1)
    u = uniforms(keys, position) * cdf[:, -1]
    # the first token whose cumulative probability exceeds u: tokens of probability 0 are never picked, also if u
    # rounded up to the total (the pick is then the last token of positive probability, not the vocabulary's end)
    last = torch.where(probs > 0, torch.arange(probs.shape[-1], device=probs.device), 0).amax(dim=-1)
    return torch.minimum((cdf <= u[:, None]).sum(dim=-1), last)


# ------------------------------------------------------------------------------------------------------ the cache
class KVCache:
    """Keys and values of every decoder layer: [B, KV heads, slots, head dim], written at given positions.

    It answers the one call transformers' attention layers make on a cache, ``update(keys, values, layer_idx, ...)``.
    While ``prefill_repeats`` is set, the prompt's keys/values ([prompts, ...]) are stored for each of the prompt's
    completions and the attention sees the prompt's own; afterwards each update writes the new token at
    ``slot`` and returns the first ``visible`` slots (all of them for a static cache).
    """

    def __init__(self, layers: int, batch: int, slots: int, heads: int, dim: int, dtype, device, static: bool):
        shape = (batch, heads, slots, dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.static = static
        self.prefill_repeats = 0
        self.slot: torch.Tensor | None = None  # [1] position the current token is written at
        self.visible = slots
        if static and not torch.compiler.is_compiling():  # CUDA graphs need the buffers at fixed addresses
            for t in self.keys + self.values:
                torch._dynamo.mark_static_address(t)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.prefill_repeats:
            n = key_states.shape[2]
            keys[:, :, :n] = key_states.repeat_interleave(self.prefill_repeats, dim=0)
            values[:, :, :n] = value_states.repeat_interleave(self.prefill_repeats, dim=0)
            return key_states, value_states
        keys.index_copy_(2, self.slot, key_states)
        values.index_copy_(2, self.slot, value_states)
        if self.static:
            return keys, values
        return keys[:, :, : self.visible], values[:, :, : self.visible]


# ------------------------------------------------------------------------------------------------------ decoding
def _stance(name: str):
    """``torch.compiler.set_stance(name)`` (PyTorch >= 2.6), else nothing."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance(name) if set_stance is not None else nullcontext()


class Generator:
    """Batched sampling for one ``InternVLForConditionalGeneration`` (see the module docstring).

    Args:
        model: the transformers model (its LLM's decoder layers and LM head are run directly).
        static: preallocated cache and fixed shapes per decode step.
        compile: ``torch.compile`` the static decode step (CUDA graphs on GPUs); needs ``static``.

    Training compiles the decoder layers one by one (``dist.parallelize``) for training shapes; generation runs them
    eagerly (the prefill, the uncompiled decode steps) or inside its own compiled decode step, never through those
    per-layer graphs, which would otherwise be traced again for every cache length.
    """

    def __init__(self, model, static: bool = False, compile: bool = False):
        self.model, self.static, self.compile = model, static or compile, compile
        self.llm = model.model.language_model
        # renamed in transformers 5.2x; asked of the LLM, whose layers may sit in checkpoint wrappers (eager training)
        params = inspect.signature(type(self.llm).forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._steps: dict = {}
        self._caches: dict = {}  # static caches are kept: a replayed CUDA graph reads its buffers at fixed addresses

    # ---- the pieces of a forward over the cache
    def _layers(self, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: KVCache):
        rotary = self.llm.rotary_emb(hidden, positions)
        for layer in self.llm.layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=positions, use_cache=True,
                           position_embeddings=rotary, **{self.cache_kwarg: cache})
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # older transformers return tuples
        return self.llm.norm(hidden)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden[:, -1]).float()

    def _decode(self, cache: KVCache, token, position, slot, key_valid):
        """The model's part of one decode step: (each row's next-token logits, key_valid). Fixed shapes with a static
        cache; this is what ``compile`` compiles. Sampling stays outside it (:meth:`_pick`): its sort and cumulative
        sums over the vocabulary need inductor's split-scan kernels, which failed to generate on an H100 (torch 2.11,
        2026-12-06), and eagerly they are a few kernels a token."""
        key_valid = key_valid.index_fill(1, slot, True)
        cache.slot = slot
        hidden = self.llm.embed_tokens(token[:, None])
        visible = key_valid if cache.static else key_valid[:, : cache.visible]
        hidden = self._layers(hidden, visible[:, None, None, :], position[:, None], cache)
        return self._logits(hidden), key_valid

    @staticmethod
    def _pick(logits: torch.Tensor, keys, position, done: torch.Tensor, sampling: Sampling):
        """The next token of every row from its logits (padding once the row is done), and the new done flags."""
        nxt = sample_tokens(logits, sampling, keys, position + 1)
        nxt = torch.where(done, torch.full_like(nxt, sampling.pad_token_id), nxt)
        if sampling.stop_token_ids:
            done = done | torch.isin(nxt, torch.tensor(sampling.stop_token_ids, device=nxt.device))
        return nxt, done

    def _cache(self, batch: int, slots: int, dtype, device) -> KVCache:
        """A new cache, or for a static one the same buffers as the last call with these shapes (every slot a call
        reads is written first or masked)."""
        key = (batch, slots, dtype, device)
        if self.static and key in self._caches:
            return self._caches[key]
        text = self.llm.config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        cache = KVCache(len(self.llm.layers), batch, slots, text.num_key_value_heads, head_dim, dtype, device,
                        self.static)
        if self.static:
            self._caches = {key: cache}  # one shape at a time: the buffers of older shapes are freed
        return cache

    def _decode_step(self, batch: int, slots: int):
        """The decode function for these shapes (compiled once per shape when ``compile``)."""
        key = (batch, slots)
        if key not in self._steps:
            fn = self._decode
            if self.compile:
                fn = torch.compile(fn, mode="reduce-overhead" if torch.cuda.is_available() else "default",
                                   dynamic=False)
            self._steps[key] = fn
        return self._steps[key]

    @torch.no_grad()
    def generate(self, *args, **kwargs) -> Generated:
        """See :meth:`_generate`; the layers' own compiled graphs (training's) are bypassed."""
        with _stance("force_eager"):
            return self._generate(*args, **kwargs)

    def _generate(self, embeds: torch.Tensor, attention_mask: torch.Tensor, sampling: Sampling,
                 keys: torch.Tensor | None = None, repeats: int = 1, all_reduce_sum=None,
                 sync_every: int = 8) -> Generated:
        """Complete each prompt ``repeats`` times.

        Args:
            embeds: [P, L, H] input embeddings of the left-padded prompts (``InternVLChat.embed_inputs``).
            attention_mask: [P, L] 1 on real tokens, 0 on the left padding.
            sampling: how to pick tokens.
            keys: [P x repeats] int64 stream keys in ``[0, 2**32)`` (:func:`stream_key`), completion ``r`` of prompt
                ``p`` at row ``p * repeats + r``; None with greedy decoding.
            repeats: completions per prompt.
            all_reduce_sum: sums a tensor over ranks (every rank then decodes as many tokens); None on one process.
            sync_every: decode steps between two checks of whether every row is done.
        """
        prompts, length, _ = embeds.shape
        batch, device = prompts * repeats, embeds.device
        if keys is None and not sampling.greedy:
            raise ValueError("sampling needs one stream key per row (greedy decoding needs none)")
        slots = length + sampling.max_new_tokens
        if self.static:
            slots = -(-slots // SLOT_ROUNDING) * SLOT_ROUNDING
        weight = self.model.lm_head.weight
        cache = self._cache(batch, slots, weight.dtype, device)

        # prefill: each prompt once, causal over its real tokens (a padding row attends to itself: no NaN)
        real = attention_mask.to(device=device, dtype=torch.bool)
        positions = (real.long().cumsum(-1) - 1).masked_fill(~real, 0)
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        mask = (real[:, None, :] & causal) | torch.eye(length, dtype=torch.bool, device=device)
        cache.prefill_repeats = repeats
        hidden = self._layers(embeds.to(weight.dtype), mask[:, None], positions, cache)
        cache.prefill_repeats = 0
        logits = self._logits(hidden).repeat_interleave(repeats, dim=0)
        last = positions[:, -1].repeat_interleave(repeats)  # each row's last prompt position
        token = sample_tokens(logits, sampling, keys, last + 1)
        stop = torch.tensor(sampling.stop_token_ids, device=device, dtype=torch.long)
        done = torch.isin(token, stop)
        key_valid = torch.zeros(batch, slots, dtype=torch.bool, device=device)
        key_valid[:, :length] = real.repeat_interleave(repeats, dim=0)
        out = [token]
        step = self._decode_step(batch, slots)
        compiled = _stance("default") if self.compile else nullcontext()
        steps = 0
        while len(out) < sampling.max_new_tokens:
            if steps % sync_every == 0:  # a host sync: read (on every rank) whether all rows are done
                running = (~done).sum()
                if all_reduce_sum is not None:
                    running = all_reduce_sum(running)
                if int(running) == 0:
                    break
            slot = torch.tensor([length + steps], device=device)
            cache.visible = length + steps + 1
            position = last + 1 + steps
            with compiled:
                logits, key_valid = step(cache, token, position, slot, key_valid)
            if self.compile:  # a CUDA graph's outputs are overwritten by its next replay (logits are read before it)
                key_valid = key_valid.clone()
            token, done = self._pick(logits, keys, position, done, sampling)
            out.append(token)
            steps += 1
        tokens = torch.stack(out, dim=1)
        return self._finish(tokens, sampling, steps)

    @staticmethod
    def _finish(tokens: torch.Tensor, sampling: Sampling, steps: int) -> Generated:
        """Lengths up to and including the first stop token; everything after it becomes padding."""
        stop = torch.tensor(sampling.stop_token_ids, device=tokens.device, dtype=torch.long)
        is_stop = torch.isin(tokens, stop)
        first = torch.where(is_stop.any(dim=1), is_stop.float().argmax(dim=1), torch.full_like(tokens[:, 0], -1))
        stopped = first >= 0
        lengths = torch.where(stopped, first + 1, torch.full_like(first, tokens.shape[1]))
        after = torch.arange(tokens.shape[1], device=tokens.device)[None] >= lengths[:, None]
        return Generated(tokens.masked_fill(after, sampling.pad_token_id), lengths, stopped, steps)
