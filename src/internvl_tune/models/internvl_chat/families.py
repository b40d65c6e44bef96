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
class MoeLayout:
    """Room for mixture-of-experts families (Qwen3-MoE, GPT-OSS), filled in when they are added; dense families have
    none and a family with one is refused until its loader exists.

    Attributes:
        router_rows: (original, native) key templates of the router.
        expert_rows: (original, native) key templates of the experts (per-expert original keys, grouped native ones).
        fused_gate_up: the native experts hold gate and up projections in one tensor.
        aux_loss_coef_key: the llm_config key of the load-balancing loss coefficient.
    """

    router_rows: tuple[tuple[str, str], ...]
    expert_rows: tuple[tuple[str, str], ...]
    fused_gate_up: bool
    aux_loss_coef_key: str


# LLM keys of the families whose InternVL checkpoints keep the transformers names (everything but InternLM2).
SAME_NAMES = ((LM + "{rest}", T + "{rest}"), ("language_model.lm_head.weight", "lm_head.weight"))
# The files of Qwen's byte-level BPE tokenizers (Qwen2, Qwen2.5, Qwen3): the slow files, or the fast tokenizer.json.
QWEN_BPE_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))
# The reference's LLM LoRA targets of the families with transformers' separate projections (same leaf names).
SEPARATE_PROJECTIONS = tuple((name, (name.rsplit(".", 1)[-1],)) for name in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj"))


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
))
