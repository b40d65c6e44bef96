"""The LLM families of InternVL chat models: one :class:`Family` entry each, the one place that says how they differ.

A family is what ``llm_config.architectures[0]`` names in an original ``config.json``. Every part that treats families
differently reads its entry here: the config translation (``config.py``: native type, extra keys, RoPE scaling, bias
switches), the key table (``key_map.py``: LLM rows, fused q/k/v), the tokenizer class (``tokenizers.py``), the LoRA
targets (``lora.py``) and the remote-code tokenizer files of a native save (``saving.py``).

| family      | architectures[0]                    | native type | LLM key rows | tokenizer             | InternVL releases   |
|-------------|-------------------------------------|-------------|--------------|-----------------------|---------------------|
| `qwen2`     | Qwen2ForCausalLM (Qwen2, Qwen2.5)   | qwen2       | same names   | Qwen2Tokenizer        | 2-1B, 2.5, 3        |
| `internlm2` | InternLM2ForCausalLM (2 and 2.5)    | llama       | renamed, wqkv| ours (sentencepiece)  | 2-2B/8B/26B, 2.5    |
| `internlm3` | InternLM3ForCausalLM                | llama       | same names   | ours (sentencepiece)  | 3-9B                |
| `phi3`      | Phi3ForCausalLM                     | phi3        | same names   | named in the files    | 2-4B                |
| `llama`     | LlamaForCausalLM (Yi, Llama-3)      | llama       | same names   | named in the files    | 2-40B, 2-76B        |
| `qwen3`     | Qwen3ForCausalLM                    | qwen3       | same names   | Qwen2Tokenizer        | 3.5 1B-38B          |
| `qwen3_moe` | Qwen3MoeForCausalLM                 | qwen3_moe   | per expert   | Qwen2Tokenizer        | 3.5 30B-A3B, 241B   |
| `gpt_oss`   | GptOssForCausalLM                   | gpt_oss     | same names   | named in the files    | 3.5 20B-A4B         |

Adding a dense family that transformers implements is one :func:`register` call (see docs/architecture.md, "Adding
a family"); everything above reads the registry.
"""

from __future__ import annotations

from dataclasses import dataclass

from internvl_tune.errors import CheckpointError

LM, T = "language_model.model.", "model.language_model."  # original / native prefix of the LLM's decoder


@dataclass(frozen=True)
class FusedQKV:
    """An original fused q/k/v linear that the native model holds as three (``{p}`` = q, k or v in ``native``).

    ``grouped``: rows come in ``num_key_value_heads`` groups (that group's query heads, one key head, one value head,
    ``head_dim`` rows each: InternLM2's ``wqkv``); False is a plain [q | k | v] stack.
    """

    original: str
    native: str
    grouped: bool


@dataclass(frozen=True)
class BiasSwitches:
    """llm_config keys that switch biases which the native Llama switches differently.

    ``attention``: keys that must all equal the native ``attention_bias`` (q/k/v and o_proj); ``mlp``: the key of the
    native ``mlp_bias`` (None: the MLP has no bias); ``default``: their value when absent.
    """

    attention: tuple[str, ...]
    mlp: str | None
    default: bool


@dataclass(frozen=True)
class ExpertPart:
    """A per-expert tensor of the files and its place in the grouped native parameter.

    ``<experts>.{e}.<leaf>`` (e.g. ``mlp.experts.7.up_proj.weight``) is expert ``e`` of ``<experts>.<param>``, rows
    ``[part * n, (part + 1) * n)`` of that expert's slice cut into ``parts`` equal blocks along its first dimension
    (Qwen3-MoE: ``gate_proj`` is the first half of ``gate_up_proj[e]``, ``up_proj`` the second).
    """

    leaf: str
    param: str
    part: int = 0
    parts: int = 1


@dataclass(frozen=True)
class MoeLayout:
    """How a mixture-of-experts family holds its experts and router.

    transformers 5 keeps each layer's experts as grouped tensors ``[E, ...]`` (``<experts>.gate_up_proj``,
    ``<experts>.down_proj``); checkpoints of some families store one tensor per expert (``expert_parts``), which
    loading stacks and saving splits again, in both layouts (transformers itself writes Qwen3-MoE per expert).

    Attributes:
        experts: the experts module inside a decoder layer (``mlp.experts``).
        router: the router module inside a decoder layer (``mlp.gate``, ``mlp.router``).
        expert_parts: the per-expert tensors of the files (empty: the files hold the grouped tensors too).
        mxfp4_params: grouped parameters a checkpoint may store in MXFP4 (``<param>_blocks`` + ``<param>_scales``,
            dequantized on load: ``models.common.mxfp4``).
        num_experts_key, top_k_key: the llm_config keys of the expert count and the experts per token.
        aux_loss_always: the reference adds the load-balancing loss whatever ``output_router_logits`` says (its
            GPT-OSS training forces it on); otherwise only where the checkpoint's ``output_router_logits`` is true.
    """

    experts: str
    router: str
    expert_parts: tuple[ExpertPart, ...] = ()
    mxfp4_params: tuple[str, ...] = ()
    num_experts_key: str = "num_experts"
    top_k_key: str = "num_experts_per_tok"
    aux_loss_always: bool = False


# LLM keys of the families whose InternVL checkpoints keep the transformers names (everything but InternLM2).
SAME_NAMES = ((LM + "{rest}", T + "{rest}"), ("language_model.lm_head.weight", "lm_head.weight"))
# The files of Qwen's byte-level BPE tokenizers (Qwen2, Qwen2.5, Qwen3): the slow files, or the fast tokenizer.json.
QWEN_BPE_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))
# The reference's LLM LoRA targets of the families with transformers' separate projections (same leaf names).
SEPARATE_PROJECTIONS = tuple((name, (name.rsplit(".", 1)[-1],)) for name in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj"))
# The linears of a mixture-of-experts decoder layer: its attention (the experts are grouped tensors, not linears:
# their LoRA is --moe_experts lora, models/common/moe.py).
ATTENTION_PROJECTIONS = SEPARATE_PROJECTIONS[:4]


@dataclass(frozen=True)
class Family:
    """One LLM family.

    Attributes:
        name: the family's name; also the ``llm_config.model_type`` of an original config rebuilt from a native one.
        architectures: ``llm_config.architectures[0]`` values of this family; the first is written when rebuilding.
        native_type: ``model_type`` of transformers' text model that runs it (``text_config`` of the native layout).
        native_owner: a native checkpoint of ``native_type`` comes back as this family (InternLM2 / InternLM3 run as
            native Llamas, which come back as ``llama``).
        extra_keys: llm_config keys copied to and from the native text config besides the common ones
            (``config.TEXT_KEYS``).
        rope_scaling: ``rope_scaling`` types accepted; ``su`` / ``longrope`` become native ``longrope``.
        biases: llm_config bias switches that map onto native ``attention_bias`` / ``mlp_bias`` (None: the
            native keys themselves, if any, are in ``extra_keys``).
        key_rows: (original, native) templates of the LLM's keys (``{n}`` layer, ``{w}`` leaf, ``{rest}`` any tail).
        fused_qkv: a fused q/k/v the native model splits, or None.
        tokenizer_class: the tokenizer class to load (ours or transformers'); None: the class that
            ``tokenizer_config.json`` names.
        tokenizer_files: the files the tokenizer is built from, as alternatives (one must be complete); checked
            before loading, so a checkpoint without them is named instead of loading an empty vocabulary.
        lora_targets: the reference's LLM LoRA targets: (reference leaf name, native leaf names) pairs.
        moe: mixture-of-experts layout (None: dense).
        native_names: (llm_config key, native config key) pairs where transformers writes another name into a native
            config.json (Qwen3-MoE's ``num_experts`` is written as ``num_local_experts``).
        attn_implementation: the attention transformers must run this family with outside training (GPT-OSS:
            ``eager``, the only one of transformers' own that applies its attention sinks); None: the caller's.
        answers_keep_special_tokens: ``chat`` / ``batch_chat`` answers keep the special tokens generated before the
            stop text, as the reference's chat of this family's InternVL series decodes them (InternVL3.5's
            ``internvl_chat_gpt_oss`` keeps them; ``internvl_chat``, of the earlier series, drops them).
    """

    name: str
    architectures: tuple[str, ...]
    native_type: str
    native_owner: bool = True
    extra_keys: tuple[str, ...] = ()
    rope_scaling: tuple[str, ...] = ("dynamic", "linear", "llama3")
    biases: BiasSwitches | None = None
    key_rows: tuple[tuple[str, str], ...] = SAME_NAMES
    fused_qkv: FusedQKV | None = None
    tokenizer_class: str | None = None
    tokenizer_files: tuple[tuple[str, ...], ...] = (("tokenizer.model",), ("tokenizer.json",))
    lora_targets: tuple[tuple[str, tuple[str, ...]], ...] = SEPARATE_PROJECTIONS
    moe: MoeLayout | None = None
    native_names: tuple[tuple[str, str], ...] = ()
    attn_implementation: str | None = None
    answers_keep_special_tokens: bool = False

    @property
    def default_lora_targets(self) -> tuple[str, ...]:
        """The native leaf names the reference's LLM LoRA wraps."""
        return tuple(native for _, natives in self.lora_targets for native in natives)

    def native_lora_targets(self, names) -> tuple[str, ...]:
        """Native leaf names for LoRA target names given either way (``attention.wqkv`` / ``wqkv`` -> q/k/v_proj)."""
        by_reference = {}
        for reference, natives in self.lora_targets:
            by_reference[reference] = by_reference[reference.rsplit(".", 1)[-1]] = natives
        out = []
        for name in names:
            out += [n for n in by_reference.get(name, (name,)) if n not in out]
        return tuple(out)


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add ``family`` to the registry (its name and architecture names must be new)."""
    taken = [a for a in family.architectures if by_architecture(a) is not None]
    if family.name in FAMILIES or taken:
        raise ValueError(f"family {family.name!r} or architectures {taken} are registered already")
    FAMILIES[family.name] = family
    return family


def get(name: str) -> Family:
    """The family called ``name``."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise CheckpointError(f"unknown LLM family {name!r}; known: {', '.join(FAMILIES)}") from None


def by_architecture(architecture: str | None) -> Family | None:
    """The family whose ``architectures`` holds ``architecture`` (None when none does)."""
    return next((f for f in FAMILIES.values() if architecture in f.architectures), None)


def by_native_type(model_type: str | None) -> Family | None:
    """The family a native text config of ``model_type`` belongs to (None when none owns that type)."""
    return next((f for f in FAMILIES.values() if f.native_owner and f.native_type == model_type), None)


def architectures() -> list[str]:
    """Every supported ``llm_config.architectures[0]`` value."""
    return [a for f in FAMILIES.values() for a in f.architectures]


register(Family(
    "qwen2", ("Qwen2ForCausalLM",), "qwen2",  # Qwen2 and Qwen2.5
    extra_keys=("sliding_window", "use_sliding_window", "max_window_layers"),
    tokenizer_class="Qwen2Tokenizer", tokenizer_files=QWEN_BPE_FILES,
))
register(Family(
    "internlm2", ("InternLM2ForCausalLM",), "llama", native_owner=False,  # InternLM2 and InternLM2.5
    # `bias` switches the biases of wqkv and wo, i.e. Llama's attention_bias.
    biases=BiasSwitches(attention=("bias",), mlp=None, default=True),
    key_rows=(
        (LM + "tok_embeddings.weight", T + "embed_tokens.weight"),
        (LM + "layers.{n}.attention.wo.{w}", T + "layers.{n}.self_attn.o_proj.{w}"),
        (LM + "layers.{n}.feed_forward.w1.weight", T + "layers.{n}.mlp.gate_proj.weight"),
        (LM + "layers.{n}.feed_forward.w3.weight", T + "layers.{n}.mlp.up_proj.weight"),
        (LM + "layers.{n}.feed_forward.w2.weight", T + "layers.{n}.mlp.down_proj.weight"),
        (LM + "layers.{n}.attention_norm.weight", T + "layers.{n}.input_layernorm.weight"),
        (LM + "layers.{n}.ffn_norm.weight", T + "layers.{n}.post_attention_layernorm.weight"),
        (LM + "norm.weight", T + "norm.weight"),
        ("language_model.output.weight", "lm_head.weight"),
    ),
    fused_qkv=FusedQKV(LM + "layers.{n}.attention.wqkv.{w}", T + "layers.{n}.self_attn.{p}_proj.{w}", grouped=True),
    tokenizer_class="InternLM2Tokenizer", tokenizer_files=(("tokenizer.model",),),
    lora_targets=(("attention.wqkv", ("q_proj", "k_proj", "v_proj")), ("attention.wo", ("o_proj",)),
                  ("feed_forward.w1", ("gate_proj",)), ("feed_forward.w3", ("up_proj",)),
                  ("feed_forward.w2", ("down_proj",))),
))
register(Family(
    # A Llama with Llama's key names whose q/k/v biases (`qkv_bias`) and o_proj + MLP biases (`bias`) are switched
    # apart; Llama's attention_bias covers q/k/v and o_proj alike, so only equal values load.
    "internlm3", ("InternLM3ForCausalLM",), "llama", native_owner=False, extra_keys=("head_dim",),
    biases=BiasSwitches(attention=("qkv_bias", "bias"), mlp="bias", default=False),
    tokenizer_class="InternLM3Tokenizer", tokenizer_files=(("tokenizer.model",),),
))
register(Family(
    "phi3", ("Phi3ForCausalLM",), "phi3",
    extra_keys=("original_max_position_embeddings", "sliding_window", "resid_pdrop", "embd_pdrop"),
    # Phi-3's "su" scaling is what transformers calls "longrope" (same factors and attention scale).
    rope_scaling=("dynamic", "linear", "llama3", "su", "longrope"),
    # q/k/v and gate/up stay fused: the native Phi-3 has the same modules
    lora_targets=tuple((name, (name.rsplit(".", 1)[-1],)) for name in ("self_attn.qkv_proj", "self_attn.o_proj",
                                                                        "mlp.gate_up_proj", "mlp.down_proj")),
))
register(Family(
    "llama", ("LlamaForCausalLM",), "llama",  # Yi, Llama-3
    extra_keys=("attention_bias", "mlp_bias", "head_dim"),
))
register(Family(
    # InternVL3.5 dense (1B-38B). head_dim is its own key (128, not hidden_size / heads in the 0.6B, 4B and 32B LLMs);
    # q_norm / k_norm sit inside self_attn under the same names in both layouts.
    "qwen3", ("Qwen3ForCausalLM",), "qwen3",
    extra_keys=("head_dim", "attention_bias", "sliding_window", "use_sliding_window", "max_window_layers",
                "layer_types"),
    tokenizer_class="Qwen2Tokenizer", tokenizer_files=QWEN_BPE_FILES,
    answers_keep_special_tokens=True,
))

# InternVL3.5 mixture-of-experts. Qwen3-MoE: the files hold one gate/up/down linear per expert (the layout of
# transformers 4.x, in which the reference and the releases were written, and of transformers 5's own saves); the
# native model stacks them into gate_up_proj [E, 2I, H] (gate rows first) and down_proj [E, H, I]; the router is
# `mlp.gate` in both.
_QWEN_EXPERTS = (ExpertPart("gate_proj.weight", "gate_up_proj", 0, 2), ExpertPart("up_proj.weight", "gate_up_proj", 1, 2),
                 ExpertPart("down_proj.weight", "down_proj"))
register(Family(
    "qwen3_moe", ("Qwen3MoeForCausalLM",), "qwen3_moe",
    extra_keys=("head_dim", "attention_bias", "sliding_window", "use_sliding_window", "max_window_layers",
                "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                "router_aux_loss_coef", "output_router_logits", "decoder_sparse_step", "mlp_only_layers"),
    tokenizer_class="Qwen2Tokenizer", tokenizer_files=QWEN_BPE_FILES,
    lora_targets=ATTENTION_PROJECTIONS,
    moe=MoeLayout(experts="mlp.experts", router="mlp.gate", expert_parts=_QWEN_EXPERTS),
    native_names=(("num_experts", "num_local_experts"),),
    answers_keep_special_tokens=True,
))
register(Family(
    # GPT-OSS keeps its grouped experts in every layout (gate_up_proj [E, H, 2I] with gate and up columns
    # interleaved, down_proj [E, I, H], both with biases; openai's own release stores them in MXFP4), a router with a
    # bias, one learned attention sink per head, and sliding-window attention on every other layer (layer_types).
    "gpt_oss", ("GptOssForCausalLM",), "gpt_oss",
    extra_keys=("head_dim", "attention_bias", "sliding_window", "layer_types", "num_local_experts",
                "num_experts_per_tok", "experts_per_token", "router_aux_loss_coef", "output_router_logits",
                "swiglu_limit", "initial_context_length"),
    rope_scaling=("yarn",),
    lora_targets=ATTENTION_PROJECTIONS,
    moe=MoeLayout(experts="mlp.experts", router="mlp.router", mxfp4_params=("gate_up_proj", "down_proj"),
                  num_experts_key="num_local_experts", aux_loss_always=True),
    attn_implementation="eager",
    answers_keep_special_tokens=True,
))
