"""Mixture-of-experts layers for training: grouped expert products, LoRA on grouped experts, the load-balancing loss.

**Grouped experts.** transformers 5 keeps a layer's experts as grouped tensors (``gate_up_proj`` [E, ...],
``down_proj`` [E, ...]) and lets a model's experts forward be swapped through its public ``ExpertsInterface``
(as attention is through ``AttentionInterface``, see ``varlen_attention.py``). :func:`grouped_experts_forward`,
registered as ``internvl_grouped``, sorts the (token, expert) pairs by expert and runs each projection as *one*
grouped matrix product over all experts (``torch._grouped_mm``: one kernel, each expert's rows against its own
weight, experts without tokens skipped), then weighs and sums each token's experts back in token order (a reshape
and a sum, not a scatter: deterministic, accumulated in the output's dtype per token). No Python loop over experts
on the GPU path. The kernel needs rows of 16 bytes (widths that are multiples of 8 in bf16) and, on CUDA, bf16;
elsewhere (fp32 on CUDA, odd widths, PyTorch without the op) :func:`grouped_mm` falls back to one ``mm`` per
expert after one host sync. The same function serves both families: Qwen3-MoE's experts hold ``[E, out, in]``
weights and gate rows before up rows; GPT-OSS's ``[E, in, out]`` weights (``is_transposed``), interleaved gate/up
columns, biases and a clamped SwiGLU (the module's own ``_apply_gate``).

**LoRA on experts** (``--moe_experts lora``): per targeted grouped parameter, ``lora_A`` [E, r, in] and ``lora_B``
[E, out, r] on the experts module (``ParameterDict`` s named ``lora_A`` / ``lora_B``, so every LoRA rule of the
project, ``is_lora_name`` included, sees them). The update ``B_e A_e x`` is computed on the routed rows with two more
grouped products, never as a dense ``[E, out, in]`` weight. :func:`merge_expert_lora` folds it into the weights;
``internvl_chat/lora.py`` writes it in peft's ``target_parameters`` layout.

**Load-balancing loss.** A forward hook on each router (:class:`RouterStats`) reduces its logits to two [E] vectors
per layer as the layer runs (how many of the real tokens picked each expert, and the sum of their router
probabilities); :meth:`RouterStats.loss` is transformers' / the reference's Switch-Transformer loss
``E * sum_e f_e * P_e`` over all MoE layers, counting real tokens only (padding of padded rows is masked; a packed
row has none).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NAME = "internvl_grouped"
_ALIGN = 16  # bytes: torch._grouped_mm needs 16-byte aligned rows and strides


# -------------------------------------------------------------------------------------------- grouped products
def _kernel_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """True when ``torch._grouped_mm`` takes these operands (see the module docstring)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    if x.is_cuda and x.dtype != torch.bfloat16:
        return False
    size = x.element_size()
    return (x.shape[-1] * size) % _ALIGN == 0 and (w.shape[-1] * size) % _ALIGN == 0 \
        and (w.shape[-2] * size) % _ALIGN == 0 and x.data_ptr() % _ALIGN == 0 and w.data_ptr() % _ALIGN == 0


def _grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The fallback: one ``mm`` per group (one host sync for the bounds)."""
    out, start = [], 0
    for g, end in enumerate(offsets.tolist()):
        out.append(x[start:end] @ w[g])
        start = end
    return torch.cat(out) if out else x.new_zeros(0, w.shape[-1])


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` [S, K] sorted by group, each group times its matrix of ``w`` [G, K, N] -> [S, N].

    ``offsets`` [G] int32: the cumulative row counts (group ``g`` is rows ``offsets[g-1]:offsets[g]``; an empty group
    repeats its predecessor's end).
    """
    x = x.to(w.dtype)
    if _kernel_usable(x, w):
        return torch._grouped_mm(x, w, offs=offsets)
    return _grouped_mm_loop(x, w, offsets)


def _linear(experts: nn.Module, name: str, x: torch.Tensor, offsets: torch.Tensor, expert_of_row: torch.Tensor):
    """Rows ``x`` [S, in] (sorted by expert) through expert parameter ``name``, its bias and LoRA, -> [S, out]."""
    weight = getattr(experts, name)
    out = grouped_mm(x, weight if experts.is_transposed else weight.transpose(1, 2), offsets)
    if experts.has_bias:
        out = out + getattr(experts, f"{name}_bias")[expert_of_row].to(out.dtype)
    lora_a = getattr(experts, "lora_A", None)
    if lora_a is not None and name in lora_a:
        dropped = F.dropout(x, experts.lora_dropout, experts.training) if experts.lora_dropout else x
        low = grouped_mm(dropped, lora_a[name].transpose(1, 2), offsets)  # [S, r]
        out = out + experts.lora_scaling * grouped_mm(low, experts.lora_B[name].transpose(1, 2), offsets).to(out.dtype)
    return out


def grouped_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers experts forward: tokens [T, H], their top-k experts [T, k] and weights [T, k] -> [T, H]."""
    tokens, k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # (token, expert) pairs sorted by expert
    expert_of_row = flat[order]
    counts = torch.zeros(self.num_experts, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))  # no host sync (unlike bincount)
    offsets = counts.cumsum(0, dtype=torch.int32)
    rows = hidden_states[order // k]
    gate_up = _linear(self, "gate_up_proj", rows, offsets, expert_of_row)
    out = _linear(self, "down_proj", self._apply_gate(gate_up), offsets, expert_of_row)
    out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)
    unsorted = torch.empty_like(out).index_copy_(0, order, out)  # back to (token, k) order
    return unsorted.view(tokens, k, -1).sum(1).to(hidden_states.dtype)


def register() -> str:
    """Register the grouped forward with transformers (idempotent); returns its name for
    ``set_experts_implementation``."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(NAME, grouped_experts_forward)
    return NAME


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every grouped experts module (``num_experts`` and a 3-dimensional ``gate_up_proj``; not
    the ``lora_A`` / ``lora_B`` dictionaries, whose entries have those names too)."""
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, "num_experts") and isinstance(getattr(m, "gate_up_proj", None), torch.Tensor)
            and m.gate_up_proj.ndim == 3]


# ----------------------------------------------------------------------------------------------- expert LoRA
EXPERT_LORA_PARAMS = ("gate_up_proj", "down_proj")


def _in_out(experts: nn.Module, name: str) -> tuple[int, int]:
    shape = getattr(experts, name).shape
    return (shape[1], shape[2]) if experts.is_transposed else (shape[2], shape[1])


def add_expert_lora(experts: nn.Module, rank: int, alpha: float, dropout: float,
                    params: tuple[str, ...] = EXPERT_LORA_PARAMS) -> None:
    """LoRA matrices on ``experts``' grouped ``params`` (A: Kaiming-uniform as peft's, B: zeros; the update starts at 0);
    its base weights are frozen."""
    weight = experts.gate_up_proj
    lora_a, lora_b = nn.ParameterDict(), nn.ParameterDict()
    for name in params:
        fan_in, fan_out = _in_out(experts, name)
        a = torch.empty(weight.shape[0], rank, fan_in, dtype=weight.dtype, device=weight.device)
        if a.device.type != "meta":
            for e in range(a.shape[0]):
                nn.init.kaiming_uniform_(a[e], a=5 ** 0.5)
        lora_a[name] = nn.Parameter(a)
        lora_b[name] = nn.Parameter(torch.zeros(weight.shape[0], fan_out, rank, dtype=weight.dtype,
                                                device=weight.device))
    for p in experts.parameters():
        p.requires_grad_(False)
    experts.lora_A, experts.lora_B = lora_a, lora_b
    experts.lora_scaling, experts.lora_dropout = alpha / rank, dropout
    for p in (*lora_a.values(), *lora_b.values()):
        p.requires_grad_(True)


def has_expert_lora(model: nn.Module) -> bool:
    return any(hasattr(m, "lora_A") for _, m in experts_modules(model))


def expert_delta(experts: nn.Module, name: str) -> torch.Tensor:
    """The dense update of grouped parameter ``name`` in its own layout ([E, out, in], or [E, in, out] when
    transposed)."""
    delta = experts.lora_scaling * (experts.lora_B[name].float() @ experts.lora_A[name].float())  # [E, out, in]
    return delta.transpose(1, 2) if experts.is_transposed else delta


def merge_expert_lora(model: nn.Module) -> None:
    """Fold every expert LoRA update into its grouped weight and remove the LoRA matrices, in place."""
    for _, experts in experts_modules(model):
        if not hasattr(experts, "lora_A"):
            continue
        with torch.no_grad():
            for name in experts.lora_A:
                weight = getattr(experts, name)
                weight.add_(expert_delta(experts, name).to(weight.dtype))
        del experts.lora_A, experts.lora_B
        del experts.lora_scaling, experts.lora_dropout


# --------------------------------------------------------------------------------------- load-balancing loss
class RouterStats:
    """Per-layer router statistics of one forward, for the load-balancing loss (see the module docstring).

    The training module calls :meth:`start` before its LLM forward and :meth:`stop` after it. The hooks compute on
    every forward while the stats are attached (so an activation-checkpointed layer recomputes what it saved), but
    keep results only between ``start`` and ``stop``: a recomputation during backward records nothing.
    """

    def __init__(self, routers: list[nn.Module], num_experts: int, top_k: int):
        self.num_experts, self.top_k = num_experts, top_k
        self.recording = False
        self.mask: torch.Tensor | None = None
        self.counts: list[torch.Tensor] = []
        self.prob_sums: list[torch.Tensor] = []
        self.handles = [r.register_forward_hook(self._hook) for r in routers]

    def _hook(self, module, inputs, output) -> None:
        logits, _, indices = output
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
        weights = torch.ones(indices.shape[0], device=probs.device) if self.mask is None else self.mask
        counts = torch.zeros(self.num_experts, device=probs.device).scatter_add_(
            0, indices.reshape(-1), weights.repeat_interleave(indices.shape[-1]))
        prob_sum = (probs * weights.unsqueeze(-1)).sum(0)
        if self.recording:
            self.counts.append(counts)
            self.prob_sums.append(prob_sum)

    def start(self, attention_mask: torch.Tensor | None) -> None:
        """Record the next forward; ``attention_mask`` [B, L] (True on real tokens) or None (every token is real)."""
        self.mask = None if attention_mask is None else attention_mask.reshape(-1).float()
        self.counts, self.prob_sums, self.recording = [], [], True

    def stop(self) -> None:
        self.recording, self.mask = False, None

    def loss(self, real_tokens: int) -> torch.Tensor:
        """``E * sum_e f_e P_e``: f_e the share of (token, top-k slot) picks that went to expert e, P_e its mean router
        probability, both over every recorded layer's ``real_tokens`` tokens (the Switch Transformer loss as
        transformers' ``load_balancing_loss_func`` computes it, whose minimum is ``top_k``)."""
        rows = real_tokens * len(self.counts)
        f = torch.stack(self.counts).sum(0) / rows
        p = torch.stack(self.prob_sums).sum(0) / rows
        return self.num_experts * (f * p).sum()

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
