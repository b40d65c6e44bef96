"""Write the reference fixtures of the test suite: tiny random checkpoints made and run by the reference InternVL code.

Each fixture is a checkpoint directory the reference code itself wrote (``save_pretrained`` of its own model class,
so key names, shapes, config keys and tied weights are the reference's) plus what the reference computes from it on
fixed inputs (its outputs, not ours: the tests load the same files with ``internvl_tune`` and compare, within
``TOLERANCE``, in fp32 on the CPU). Every stored number comes from the reference; ``internvl_tune`` only supplies
inputs: the tiny release configs (``testing.tiny_chat``, ``testing.tiny_cg``) and tokenizer-file writers.

    tests/fixtures/reference/
      manifest.json            reference commit, library versions, tolerance, the fixtures and what made them
      inputs.safetensors       the pixel inputs every fixture uses
      NAME/                    the checkpoint (config.json, model.safetensors, tokenizer files)
      NAME.json                token inputs, scalar outputs (losses), generated token ids and text, margins
      NAME.safetensors         tensor outputs (logits, logsumexp, vision features, embeddings ...)

The reference's ``internvl_chat`` and ``internvl_g`` were written for transformers 4.37, which they pin;
``internvl_chat_gpt_oss`` (InternVL3.5) for 4.55. Each fixture names its version (``transformers``) and a run writes
the fixtures of the transformers on its path and keeps the others, so run it once per group with that group's
libraries first on the path (nothing else changes; the test suite itself never needs them):

    pip install --target /tmp/refdeps "transformers==4.37.2" "tokenizers==0.15.2" "huggingface-hub<0.25" \\
        "peft==0.10.0" "accelerate==0.27.2" einops
    PYTHONPATH=/tmp/refdeps:src python tools/make_reference_fixtures.py --reference /path/to/InternVL \\
        --out tests/fixtures/reference [--only internvl2-2b ...]
    pip install --target /tmp/refdeps35 --no-deps "transformers==4.55.0" "tokenizers==0.21.4" \\
        "huggingface-hub==0.34.3" "accelerate==1.9.0" "einops==0.8.1"
    PYTHONPATH=/tmp/refdeps35:src python tools/make_reference_fixtures.py --reference /path/to/InternVL \\
        --out tests/fixtures/reference [--only internvl3_5-30b-a3b ...]

Adding a model family is one entry in ``CHAT_FIXTURES`` (a ``RELEASES`` name of ``internvl_tune.testing.tiny_chat``;
``reference`` names the folder of the checkout whose ``internvl`` package builds it, when not ``internvl_chat``, and
``transformers`` the version that folder runs with); ``tests/models/test_reference_chat.py`` picks every fixture of
the manifest up by itself (a mixture-of-experts family also records the reference's load-balancing loss).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TOLERANCE = 1e-4  # max abs difference the tests allow, fp32 CPU
SEED = 1234
CHAT_TILES, CHAT_TILE_SIZE = 2, 56  # 56-px tiles: 4 image tokens each
CG_IMAGES, CG_IMAGE_SIZE = 3, 28
GREEDY_TOKENS = 8
QUESTION = "Describe the image in detail."
ANSWER = "A cat sits on a wooden table next to a cup of coffee."
BATCH_QUESTIONS = ["What is the color of the car?", "How many people are there?"]
TEXT_QUESTION = "Please answer the question with a single word or phrase."


@dataclass(frozen=True)
class ChatFixture:
    """One InternVLChatModel fixture.

    Attributes:
        like: the release it copies (``RELEASES`` of ``internvl_tune.testing.tiny_chat``: its config keys, LLM family,
            InternViT variant, template and tokenizer file format).
        variants: ``{variant: InternVLChatConfig settings}`` the reference is also run with (same weights); their
            outputs are stored under ``VARIANT/``-prefixed tensor names, the default's under ``default/``.
        long_prompt: also run a prompt longer than the LLM's ``original_max_position_embeddings`` (Phi-3's long RoPE).
        reference: the folder of the reference checkout that holds the ``internvl`` package building this model.
        transformers: the transformers version that folder's code is run with (its pinned one): a fixture is written
            only under that version, so a run with other libraries on the path never rewrites it.
    """

    like: str
    variants: dict = field(default_factory=dict)
    long_prompt: bool = False
    reference: str = "internvl_chat"
    transformers: str = "4.37.2"


# name -> fixture. Every LLM family the reference's InternVLChatModel builds (Qwen2, InternLM2, Phi-3, Llama), both
# InternViT variants (300M: LayerNorm + qkv bias, in 1B / 2B / 4B / InternVL3-1B; 6B: RMSNorm + qk-norm, no qkv bias,
# in 76B), the InternVL3 config (Qwen2.5 with dynamic RoPE scaling, InternViT-300M-V2_5, the internvl2_5 template) and
# InternVL3.5's LLMs, built by internvl_chat_gpt_oss, whose code needs the transformers of its requirements.txt
# (4.55.0, tokenizers 0.21.4): Qwen3 (q/k-norm, head_dim apart from hidden / heads), Qwen3-MoE (per-expert modules,
# softmax-then-top-k routing) and GPT-OSS (grouped experts with biases, top-k-then-softmax routing, attention sinks,
# a sliding window on every other layer, the harmony template).
_V1_SECOND_LAST = {"ps_v1_layer_m2": {"ps_version": "v1", "select_layer": -2}}
_V3_5 = dict(reference="internvl_chat_gpt_oss", transformers="4.55.0")
CHAT_FIXTURES = {
    "internvl2-1b": ChatFixture("internvl2-1b", variants=_V1_SECOND_LAST),
    "internvl2-2b": ChatFixture("internvl2-2b"),
    "internvl2-4b": ChatFixture("internvl2-4b", long_prompt=True),
    "internvl2-76b": ChatFixture("internvl2-76b", variants=_V1_SECOND_LAST),
    "internvl3-1b": ChatFixture("internvl3-1b"),
    "internvl3_5-1b": ChatFixture("internvl3_5-1b", **_V3_5),
    "internvl3_5-30b-a3b": ChatFixture("internvl3_5-30b-a3b", **_V3_5),
    "internvl3_5-gpt-oss-20b-a4b": ChatFixture("internvl3_5-gpt-oss-20b-a4b", **_V3_5),
}


@dataclass(frozen=True)
class CGFixture:
    """One InternVL-14B (InternVL-C / InternVL-G) fixture, built by ``internvl_g``'s retrieval fine-tuning model."""

    num_query_token: int = 96  # the reference's decoder layers hard-code InternVL-14B's 96 queries
    reference: str = "internvl_g"
    transformers: str = "4.37.2"


CG_FIXTURES = {"internvl-14b": CGFixture()}


# ----------------------------------------------------------------------------------------------- the reference code
# The reference imports timm's DropPath (used only with drop_path_rate > 0) and, in internvl_g's package, torchvision's
# transforms (used only by its image-loading helpers): stand-ins save installing both.
_STANDINS = {
    "timm/__init__.py": "",
    "timm/models/__init__.py": "",
    "timm/models/layers.py": """
from torch import nn


class DropPath(nn.Module):
    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        return x
""",
    "timm/layers.py": "from timm.models.layers import DropPath\n",  # where internvl_chat_gpt_oss imports it from
    "torchvision/__init__.py": "",
    "torchvision/transforms.py": "InterpolationMode = None\n",
}


def _write_standins(scratch: Path) -> None:
    for name, text in _STANDINS.items():
        (scratch / name).parent.mkdir(parents=True, exist_ok=True)
        (scratch / name).write_text(text)


@contextlib.contextmanager
def reference_package(root: Path):
    """Make ``root``'s ``internvl`` package importable, and forget it afterwards (two folders use the same name)."""
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n == "internvl" or n.startswith("internvl.")]:
            del sys.modules[name]


def reference_commit(ref: Path, folders: list[str]) -> dict:
    """The checkout's commit, and the files of ``folders`` whose content differs from that commit (should be none)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(ref), *args], capture_output=True, text=True, check=True).stdout

    differing = []
    for folder in folders:
        for line in git("ls-tree", "-r", "HEAD", f"{folder}/internvl").splitlines():
            meta, path = line.split("\t", 1)
            on_disk = ref / path
            if not on_disk.is_file() or git("hash-object", str(on_disk)).strip() != meta.split()[2]:
                differing.append(path)
    return {"commit": git("rev-parse", "HEAD").strip(), "date": git("log", "-1", "--format=%cs").strip(),
            "folders": folders, "files_differing_from_commit": differing}


def library_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "peft", "accelerate", "sentencepiece", "safetensors", "einops"):
        with contextlib.suppress(ImportError):
            out[name] = importlib.import_module(name).__version__
    return out


# -------------------------------------------------------------------------------------------------- random weights
def seed_of(name: str) -> int:
    """Each fixture its own weights (fixtures of one family must not share an LLM)."""
    return SEED + zlib.crc32(name.encode())


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Seeded random values for every parameter (norm scales near 1, layer scales near 0.1, matrices ~ 1/sqrt(fan_in)):
    activations stay O(1) through the layers and every tensor matters, so a misplaced one changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=gen)
        leaf_module = name.rpartition(".")[0].rpartition(".")[2]
        if name.endswith(("ls1", "ls2")):
            p.copy_(0.1 + 0.02 * noise)
        elif name.endswith("logit_scale"):  # not the initial log(1/0.07): a constant in its place would show
            p.fill_(math.log(1 / 0.07) - 0.5)
        elif ("norm" in leaf_module or leaf_module in ("0",) and "mlp1" in name) and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * noise)
        elif name.endswith("bias") or p.ndim == 1:
            p.copy_(0.02 * noise)
        elif name.endswith(("query_tokens", "class_embedding", "position_embedding")):
            p.copy_(0.5 * noise)
        elif "embed_tokens" in name or "tok_embeddings" in name or "embed_in" in name or name.endswith("sinks"):
            p.copy_(noise)
        elif p.ndim == 3:  # grouped experts [E, in, out] (GPT-OSS)
            p.copy_(noise / math.sqrt(p.shape[1]))
        else:
            p.copy_(noise / math.sqrt(p[0].numel()))


# ------------------------------------------------------------------------------------------------------- tokenizers
QWEN_BPE_SIZE = 512  # the first ranks of Qwen's BPE: 256 bytes and 256 merges, a valid byte-level BPE of its own


def write_small_qwen_tokenizer(out: Path, version: str) -> tuple[int, dict]:
    """Qwen2 / Qwen2.5 / Qwen3 tokenizer files (vocab.json, merges.txt, tokenizer_config.json ...) over the first
    ``QWEN_BPE_SIZE`` ranks of the real Qwen BPE, then Qwen's added tokens and the nine InternVL ones, so a fixture
    needs no 151k-row embedding. Returns (vocab size, LLM special ids)."""
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    from internvl_tune.constants import SPECIAL_TOKENS
    from internvl_tune.testing.tokenizers import (
        QWEN_ADDED_TOKENS,
        _last_merge,
        _read_tiktoken_ranks,
        qwen_tiktoken_path,
    )

    ranks = {t: r for t, r in _read_tiktoken_ranks(qwen_tiktoken_path()).items() if r < QWEN_BPE_SIZE}
    char = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(char[b] for b in token)

    by_rank = sorted(ranks, key=ranks.get)
    (out / "vocab.json").write_text(json.dumps({text(t): ranks[t] for t in by_rank}, ensure_ascii=False))
    merges = [_last_merge(t, ranks) for t in by_rank if len(t) > 1]
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{text(a)} {text(b)}\n" for a, b in merges))
    added = QWEN_ADDED_TOKENS[version] + [(t, True) for t in SPECIAL_TOKENS]
    entry = lambda t, s: {"content": t, "lstrip": False, "normalized": False, "rstrip": False,  # noqa: E731
                          "single_word": False, "special": s}
    config = {"add_prefix_space": False, "bos_token": None, "clean_up_tokenization_spaces": False,
              "added_tokens_decoder": {str(QWEN_BPE_SIZE + i): entry(t, s) for i, (t, s) in enumerate(added)},
              "additional_special_tokens": [t for t, s in QWEN_ADDED_TOKENS[version][1:] if s],
              "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 8192, "pad_token": "<|endoftext|>",
              "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    ids = {t: QWEN_BPE_SIZE + i for i, (t, _) in enumerate(added)}
    return QWEN_BPE_SIZE + len(added), {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]}


def _released_style_sentencepiece(user_symbols: list[str], vocab_size: int = 400) -> bytes:
    """A small sentencepiece BPE with the normaliser settings of the released LLM tokenizers (Llama-2 / Phi-3, Yi,
    InternLM2: identity normalisation, whitespace kept, byte fallback) rather than sentencepiece's NFKC default."""
    import io

    import sentencepiece as spm

    from internvl_tune.testing.tiny_chat import _CORPUS

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines() * 4), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, user_defined_symbols=user_symbols,
        hard_vocab_limit=False, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, num_threads=1, minloglevel=2)
    return model.getvalue()


def write_tokenizer(style: str, out: Path) -> tuple[int, dict]:
    """The tokenizer files of ``style`` (``Release.tokenizer``); returns (vocab size, LLM special ids)."""
    from internvl_tune.testing.tokenizers import QWEN_ADDED_TOKENS

    if style in QWEN_ADDED_TOKENS:
        return write_small_qwen_tokenizer(out, style)
    from internvl_tune.testing import tiny_chat

    train = tiny_chat._train_sentencepiece  # the files of tiny_chat's writer, with a release-like normaliser
    tiny_chat._train_sentencepiece = _released_style_sentencepiece
    try:
        return tiny_chat.write_tiny_tokenizer(style, out)
    finally:
        tiny_chat._train_sentencepiece = train


def reference_tokenizer(path: Path, family: str):
    """The tokenizer as the reference loads it (``add_eos_token=False``, slow classes; InternLM2's own class)."""
    if family == "internlm2":
        from internvl.model.internlm2.tokenization_internlm2 import InternLM2Tokenizer

        return InternLM2Tokenizer.from_pretrained(str(path), add_eos_token=False)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), add_eos_token=False, use_fast=False)


# ---------------------------------------------------------------------------------------------------- chat fixtures
def _new_tokens(gen) -> torch.Tensor:
    """The generated tokens only: one per step (transformers 4.37 puts a BOS in front when given embeddings)."""
    return gen.sequences[:, -len(gen.scores):]


def _margins(scores) -> float:
    """The smallest gap between the best and second-best logit over greedy steps (how safe the argmax is)."""
    gaps = [s.float().topk(2, dim=-1).values for s in scores]
    return min(float((g[:, 0] - g[:, 1]).min()) for g in gaps)


def one_process_group() -> None:
    """A gloo group of one rank, for reference code that reduces over ranks (InternVL-C/G's training forward, and
    internvl_chat_gpt_oss's loss, which averages its token weights over ranks)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)


def make_chat(name: str, fx: ChatFixture, out_root: Path, pixels: torch.Tensor) -> dict:
    from internvl.model.internvl_chat import InternVLChatConfig, InternVLChatModel

    from internvl_tune.testing.tiny_chat import RELEASES, tiny_original_config

    release = RELEASES[fx.like]
    ckpt = out_root / name
    shutil.rmtree(ckpt, ignore_errors=True)
    ckpt.mkdir(parents=True)
    vocab, special = write_tokenizer(release.tokenizer, ckpt)
    config = tiny_original_config(fx.like, vocab, special, image_size=CHAT_TILE_SIZE)
    model = InternVLChatModel(InternVLChatConfig(**json.loads(json.dumps(config))), use_flash_attn=False)
    randomize_(model, seed_of(name))
    model.to(torch.bfloat16).save_pretrained(str(ckpt), safe_serialization=True)
    tokenizer = reference_tokenizer(ckpt, release.family)
    one_process_group()

    meta = {"like": fx.like, "family": release.family, "template": release.template, "tiles": CHAT_TILES,
            "question": QUESTION, "answer": ANSWER, "batch_questions": BATCH_QUESTIONS, "variants": {}}
    tensors = {}
    for variant, overrides in {"default": {}, **fx.variants}.items():
        cfg = InternVLChatConfig.from_pretrained(str(ckpt))
        for key, value in overrides.items():
            setattr(cfg, key, value)
        # .float(): internvl_chat_gpt_oss builds mlp1 in bf16, which from_pretrained keeps (a no-op for the others)
        ref = InternVLChatModel.from_pretrained(str(ckpt), config=cfg, torch_dtype=torch.float32,
                                                use_flash_attn=False).float().eval()
        ref.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
        conversation = _conversation(ref)
        prompt_ids = tokenizer(conversation(QUESTION, None, CHAT_TILES), return_tensors="pt").input_ids
        ids = tokenizer(conversation(QUESTION, ANSWER, CHAT_TILES), return_tensors="pt").input_ids
        labels = ids.clone()
        labels[:, : prompt_ids.shape[1]] = -100
        flags = torch.ones(CHAT_TILES, 1, dtype=torch.long)
        out = ref(pixel_values=pixels, input_ids=ids, image_flags=flags, labels=labels, return_dict=True)
        out.loss.backward()
        with torch.no_grad():
            features = ref.extract_feature(pixels)
        positions = logit_positions(ids[0], labels[0], ref.img_context_token_id)
        entry = {"input_ids": ids[0].tolist(), "labels": labels[0].tolist(), "loss": out.loss.item(),
                 "overrides": overrides, "logit_positions": positions}
        prefix = f"{variant}/"
        tensors[prefix + "logits"] = out.logits[0, positions]
        tensors[prefix + "logsumexp"] = out.logits[0].logsumexp(-1)
        tensors[prefix + "vision_features"] = features
        if variant == "default":
            patterns = CHAT_GRADIENTS + MOE_GRADIENTS.get(release.family, ())
            tensors.update({f"grad/{k}": v for k, v in gradients(ref, patterns).items()})
            if release.family in MOE_GRADIENTS:
                aux_patterns = CHAT_GRADIENTS[:1] + CHAT_GRADIENTS[2:3] + MOE_GRADIENTS[release.family][:1]
                entry["aux"] = _aux_loss(ref, pixels, ids, flags, labels, aux_patterns, tensors)
            entry.update(_chat_generation(ref, tokenizer, pixels, prompt_ids, conversation))
            if fx.long_prompt:
                entry["long"] = _long_prompt(ref, tokenizer, pixels, config, tensors)
        meta["variants"][variant] = entry
        del ref
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(out_root / f"{name}.safetensors"))
    return meta


def _aux_loss(ref, pixels, ids, flags, labels, patterns, tensors) -> dict:
    """The load-balancing loss as the reference's fine-tuning runs a mixture-of-experts LLM (it turns
    ``output_router_logits`` on for GPT-OSS; a Qwen3-MoE config may): its forward adds ``router_aux_loss_coef`` x
    transformers' ``load_balancing_loss_func`` of the routers' outputs to the loss. Stored: that loss, the auxiliary
    loss alone and the gradients of the sum where the auxiliary loss reaches (the routers, and through the hidden
    states they read the attention and the projector)."""
    ref.zero_grad(set_to_none=True)
    out = ref(pixel_values=pixels, input_ids=ids, image_flags=flags, labels=labels, return_dict=True,
              output_router_logits=True)
    out.loss.backward()
    tensors.update({f"aux/grad/{k}": v for k, v in gradients(ref, patterns).items()})
    return {"loss": out.loss.item(), "aux_loss": out.aux_loss.item(),
            "router_aux_loss_coef": ref.language_model.router_aux_loss_coef}


# Whose gradients of the loss are kept: the projector, a ViT MLP, a fused (or first) attention input projection, the
# last decoder MLP (every expert of it that got tokens, for a mixture of experts), the final norm and the LM head;
# for a mixture of experts also every router, and GPT-OSS's attention sinks.
CHAT_GRADIENTS = (r"mlp1\.[13]\.weight", r"vision_model\.encoder\.layers\.1\.mlp\.fc2\.weight",
                  r"language_model\.model\.layers\.0\.(attention\.wqkv|self_attn\.(qkv|q)_proj)\.weight",
                  r"language_model\.model\.layers\.1\.(mlp\.down_proj\.weight|feed_forward\.w2\.weight"
                  r"|mlp\.experts\.\d+\.down_proj\.weight|mlp\.experts\.down_proj)",
                  r"language_model\.model\.norm\.weight", r"language_model\.(lm_head|output)\.weight")
MOE_GRADIENTS = {"qwen3_moe": (r"language_model\.model\.layers\.\d+\.mlp\.gate\.weight",),
                 "gpt_oss": (r"language_model\.model\.layers\.\d+\.mlp\.router\.weight",
                             r"language_model\.model\.layers\.1\.mlp\.experts\.down_proj_bias",
                             r"language_model\.model\.layers\.\d+\.self_attn\.sinks")}
CG_GRADIENTS = (r"text_projection", r"logit_scale", r"query_tokens", r"itm_head\.weight",
                r"clip_projector2?\.cross_attn\.(q|proj)\.weight",
                r"qllama\.model\.layers\.0\.cross_attn\.[kv]_proj\.weight",
                r"qllama\.model\.layers\.1\.self_attn\.q_proj\.weight",
                r"vision_model\.encoder\.layers\.1\.mlp\.fc2\.weight")


def gradients(model: torch.nn.Module, patterns: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The gradients (after ``backward``) of the parameters whose full names match one of ``patterns``."""
    found = {name: p.grad.detach().clone() for name, p in model.named_parameters()
             if p.grad is not None and any(re.fullmatch(pattern, name) for pattern in patterns)}
    for pattern in patterns:
        if not any(re.fullmatch(pattern, name) for name in found):
            raise RuntimeError(f"no gradient for {pattern}")
    return found


def logit_positions(ids: torch.Tensor, labels: torch.Tensor, image_token: int) -> list[int]:
    """Where full logit rows are kept: the first and last image tokens and the two after them, every position that
    predicts a supervised token, and the last (logsumexp is kept everywhere)."""
    image = (ids == image_token).nonzero().flatten().tolist()
    around = [image[0], image[-1], image[-1] + 1, image[-1] + 2]
    supervised = [t - 1 for t in (labels != -100).nonzero().flatten().tolist()]
    return sorted(set(around + supervised + [len(ids) - 1]))


def get_conv_template(name: str):
    """The reference's conversation template ``name`` (``internvl_chat`` keeps it in ``internvl/conversation.py``,
    ``internvl_chat_gpt_oss`` beside its model)."""
    try:
        from internvl.conversation import get_conv_template as get
    except ImportError:
        from internvl.model.internvl_chat.conversation import get_conv_template as get
    return get(name)


def _conversation(ref):
    """``conversation(question, answer, tiles)``: the prompt text as the reference's ``chat`` builds it (its template
    and system message, ``<image>`` in front, the image tokens of ``tiles`` tiles); ``answer`` None ends with the
    assistant's header, as a generation prompt."""

    def build(question: str, answer: str | None, tiles: int) -> str:
        template = get_conv_template(ref.template)
        template.system_message = ref.system_message
        template.append_message(template.roles[0], "<image>\n" + question)
        template.append_message(template.roles[1], answer)
        image_tokens = "<img>" + "<IMG_CONTEXT>" * (ref.num_image_token * tiles) + "</img>"
        return template.get_prompt().replace("<image>", image_tokens, 1)

    return build


def _chat_generation(ref, tokenizer, pixels, prompt_ids, conversation) -> dict:
    """Greedy generation as the reference's ``chat`` (one question, both tiles; and one without an image) and
    ``batch_chat`` (two questions, one tile each, left padding) run it; the token ids come from its ``generate`` with
    the same arguments."""
    sep = get_conv_template(ref.template).sep.strip()
    eos = tokenizer.convert_tokens_to_ids(sep)
    args = dict(max_new_tokens=GREEDY_TOKENS, do_sample=False)
    response = ref.chat(tokenizer, pixels, QUESTION, dict(args))
    text_response = ref.chat(tokenizer, None, TEXT_QUESTION, dict(args))  # no image: what `internvl-tune chat` runs
    gen = ref.generate(pixel_values=pixels, input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                       eos_token_id=eos, output_scores=True, return_dict_in_generate=True, **args)
    responses = ref.batch_chat(tokenizer, pixels, BATCH_QUESTIONS, dict(args), num_patches_list=[1, 1])
    tokenizer.padding_side = "left"  # what batch_chat tokenizes: one tile per question
    batch = tokenizer([conversation(q, None, 1) for q in BATCH_QUESTIONS], return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"
    batch_gen = ref.generate(pixel_values=pixels, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             eos_token_id=eos, output_scores=True, return_dict_in_generate=True, **args)
    return {"prompt_ids": prompt_ids[0].tolist(), "generated_ids": _new_tokens(gen)[0].tolist(),
            "greedy_margin": _margins(gen.scores), "chat_response": response,
            "batch_input_ids": batch.input_ids.tolist(), "batch_attention_mask": batch.attention_mask.tolist(),
            "batch_generated_ids": _new_tokens(batch_gen).tolist(), "batch_greedy_margin": _margins(batch_gen.scores),
            "batch_chat_responses": responses, "text_question": TEXT_QUESTION, "text_response": text_response}


def _long_prompt(ref, tokenizer, pixels, config, tensors) -> dict:
    """A prompt past ``original_max_position_embeddings`` (Phi-3's long-factor RoPE): logsumexp everywhere and the
    last position's logits."""
    window = config["llm_config"].get("original_max_position_embeddings", 0)
    image_tokens = "<img>" + "<IMG_CONTEXT>" * (ref.num_image_token * CHAT_TILES) + "</img>"
    text = image_tokens + ("\n" + QUESTION + " " + ANSWER) * 4
    ids = tokenizer(text, return_tensors="pt").input_ids
    while ids.shape[1] <= window + 16:
        text += " " + ANSWER
        ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = ref(pixel_values=pixels, input_ids=ids, image_flags=torch.ones(CHAT_TILES, 1, dtype=torch.long),
                     return_dict=True).logits[0]
    tensors["long/logsumexp"] = logits.logsumexp(-1)
    tensors["long/last_logits"] = logits[-8:]
    return {"input_ids": ids[0].tolist(), "original_max_position_embeddings": window}


# ------------------------------------------------------------------------------------------------------ C/G fixture
CG_CAPTIONS = ["a dog runs on the grass", "a man rides a bicycle down the street", "a cat lies on a blanket"]
CG_NEGATIVES = ["a rocket stands on the launch pad", "a cup of coffee on a table", "two girls play in the park"]
CG_IMAGE_IDS = [5, 7, 5]  # rows 0 and 2 share an image id: soft ITC targets


def _padded(tokenizer, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tokenizer(t).input_ids[:length] for t in texts]
    ids = torch.zeros(len(rows), length, dtype=torch.long)  # pad id 0, as the reference's collators
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids, (ids > 0).long()


def _narrow_cross_attention(vision_width: int) -> None:
    """QLLaMA's cross-attention reads image features of a width the reference hard-codes (3200, InternViT-6B's) rather
    than taking it from the config; here it is set to the tiny ViT's width. Nothing else of the reference changes
    (the patched class lives only until ``reference_package`` forgets the package)."""
    from internvl.model.internvl_stage2_retrieval import modeling_qllama as qllama

    build = qllama.LlamaCrossAttention.__init__

    def __init__(self, config):
        build(self, config)
        self.vision_hidden_size = vision_width
        self.k_proj = torch.nn.Linear(vision_width, self.num_heads * self.head_dim, bias=False)
        self.v_proj = torch.nn.Linear(vision_width, self.num_heads * self.head_dim, bias=False)
        self.norm2 = qllama.LlamaRMSNorm(vision_width, eps=config.rms_norm_eps)

    qllama.LlamaCrossAttention.__init__ = __init__


def make_cg(name: str, fx: CGFixture, out_root: Path, pixels: torch.Tensor) -> dict:
    from internvl.model.internvl_stage2_retrieval import InternVL_C, InternVL_G, InternVLConfig, InternVLModel
    from transformers import LlamaTokenizer

    from internvl_tune.testing.tiny_cg import tiny_config_dict, train_tiny_sentencepiece

    ckpt = out_root / name
    shutil.rmtree(ckpt, ignore_errors=True)
    ckpt.mkdir(parents=True)
    config = tiny_config_dict(0, image_size=CG_IMAGE_SIZE, num_query_token=fx.num_query_token)
    _narrow_cross_attention(config["vision_config"]["hidden_size"])
    (ckpt / "tokenizer.model").write_bytes(train_tiny_sentencepiece())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>", "clean_up_tokenization_spaces": False,
        "legacy": True}, indent=2) + "\n")
    tokenizer = LlamaTokenizer.from_pretrained(str(ckpt))
    config["qllama_config"]["vocab_size"] = tokenizer.vocab_size
    model = InternVLModel(InternVLConfig(**config))
    randomize_(model, seed_of(name))  # lm_head and embed_tokens differ in the files; loading ties them (lm_head's win)
    model.to(torch.bfloat16).save_pretrained(str(ckpt), safe_serialization=True)

    one_process_group()  # its training forward gathers over ranks
    tensors, meta = {}, {"captions": CG_CAPTIONS, "negatives": CG_NEGATIVES, "image_ids": CG_IMAGE_IDS}
    # the retrieval tokenizer adds EOS (clip_benchmark and the fine-tuning data both do)
    eos_tokenizer = LlamaTokenizer.from_pretrained(str(ckpt), add_eos_token=True)
    text, _ = _padded(eos_tokenizer, CG_CAPTIONS + CG_NEGATIVES[:1], 16)
    meta["text_ids"] = text.tolist()
    with torch.no_grad():
        for mode, cls in (("C", InternVL_C), ("G", InternVL_G)):
            ref = cls.from_pretrained(str(ckpt), torch_dtype=torch.float32).eval()
            logits_per_image, logits_per_text = ref(pixels, text)
            tensors[f"{mode}/image_embeds"] = ref.encode_image(pixels)
            tensors[f"{mode}/text_embeds"] = ref.encode_text(text)
            tensors[f"{mode}/logits_per_image"] = logits_per_image
            tensors[f"{mode}/logits_per_text"] = logits_per_text
        ref = InternVLModel.from_pretrained(str(ckpt), torch_dtype=torch.float32).eval()
        tensors["embed_tokens"] = ref.qllama.model.embed_tokens.weight.to(torch.bfloat16)  # tied, as loaded (bf16 files)
        meta["tied_lm_head"] = ref.qllama.lm_head.weight.data_ptr() == ref.qllama.model.embed_tokens.weight.data_ptr()
        meta["captions_generated"] = _cg_captions(ref, tokenizer, pixels)
    meta["training"] = _cg_training(ref, eos_tokenizer, pixels, tensors)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(out_root / f"{name}.safetensors"))
    return meta


def _cg_training(ref, tokenizer, pixels, tensors) -> dict:
    """The reference's retrieval fine-tuning forward (ITM + ITC, its own loss code), on one process."""
    pos, pos_mask = _padded(tokenizer, CG_CAPTIONS, 12)
    neg, neg_mask = _padded(tokenizer, CG_NEGATIVES, 12)
    summ, summ_mask = _padded(tokenizer, ["summarize:" + c for c in CG_CAPTIONS], 12)
    itm = []
    hook = ref.itm_head.register_forward_hook(lambda m, i, o: itm.append(o.mean(dim=1)))
    image_ids = torch.tensor(CG_IMAGE_IDS)
    out = ref(pixel_values=pixels, positive_input_ids=pos, positive_attention_mask=pos_mask,
              negative_input_ids=neg, negative_attention_mask=neg_mask, summarize_input_ids=summ,
              summarize_attention_mask=summ_mask, input_ids=pos, attention_mask=pos_mask, image_ids=image_ids,
              labels=pos)
    hook.remove()
    tensors["training/itm_logits"] = itm[0].detach()
    out.loss.backward()
    tensors.update({f"training/grad/{k}": v for k, v in gradients(ref, CG_GRADIENTS).items()})
    return {"positive_input_ids": pos.tolist(), "positive_attention_mask": pos_mask.tolist(),
            "negative_input_ids": neg.tolist(), "negative_attention_mask": neg_mask.tolist(),
            "summarize_input_ids": summ.tolist(), "summarize_attention_mask": summ_mask.tolist(),
            "loss": out.loss.item(), "loss_itm": out.loss_itm.item(), "loss_itc": out.loss_itc.item()}


def _cg_captions(ref, tokenizer, pixels) -> dict:
    """InternVL-G captioning as ``internvl_g/eval/evaluate_caption.py`` runs it ('English caption:', BOS, no EOS):
    greedy and beam search, token ids."""
    prompt = tokenizer(["English caption:"] * pixels.shape[0], return_tensors="pt")
    out = {"prompt_ids": prompt.input_ids[0].tolist()}
    for name, args in (("greedy", dict(num_beams=1)), ("beam3", dict(num_beams=3))):
        gen = ref.generate(pixels, prompt.input_ids, prompt.attention_mask, do_sample=False, max_new_tokens=8,
                           min_new_tokens=8, output_scores=True, return_dict_in_generate=True, **args)
        out[name] = _new_tokens(gen).tolist()
        if name == "greedy":
            out["greedy_margin"] = _margins(gen.scores)
    return out


# ------------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, type=Path, help="checkout of github.com/OpenGVLab/InternVL")
    parser.add_argument("--out", default=Path("tests/fixtures/reference"), type=Path)
    parser.add_argument("--only", nargs="*", default=None, help="fixture names to (re)write; others are kept")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(SEED)
    fixtures = {**CHAT_FIXTURES, **CG_FIXTURES}
    unknown = set(args.only or ()) - set(fixtures)
    if unknown:
        parser.error(f"unknown fixtures {sorted(unknown)}; known: {[*fixtures]}")
    import transformers

    installed = transformers.__version__
    names = [n for n in args.only or fixtures if fixtures[n].transformers == installed]
    wrong = [n for n in args.only or fixtures if n not in names]
    if args.only and wrong:
        parser.error(f"{wrong} are made with another transformers than {installed} (the fixture's ``transformers``): "
                     "put that one first on PYTHONPATH (see the docstring)")
    for name in wrong:
        print(f"{name}: kept (made with transformers {fixtures[name].transformers}, not {installed})", flush=True)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    inputs_file = out / "inputs.safetensors"
    if inputs_file.is_file():
        inputs = load_file(str(inputs_file))
    else:
        gen = torch.Generator().manual_seed(SEED)
        inputs = {"chat_pixels": torch.randn(CHAT_TILES, 3, CHAT_TILE_SIZE, CHAT_TILE_SIZE, generator=gen),
                  "cg_pixels": torch.randn(CG_IMAGES, 3, CG_IMAGE_SIZE, CG_IMAGE_SIZE, generator=gen)}
        save_file(inputs, str(inputs_file))
    manifest_file = out / "manifest.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {"fixtures": {}}
    manifest.update(tolerance=TOLERANCE, dtype="float32", device="cpu",
                    regenerate="tools/make_reference_fixtures.py (see its docstring)")
    scratch = Path(tempfile.mkdtemp(prefix="reference-fixtures-"))
    _write_standins(scratch)
    sys.path.insert(0, str(scratch))
    versions = library_versions()
    for name in names:
        fx = fixtures[name]
        provenance = {"reference": reference_commit(args.reference, [fx.reference]), "versions": versions}
        with reference_package(args.reference / fx.reference):
            torch.manual_seed(SEED)
            if name in CHAT_FIXTURES:
                meta = make_chat(name, fx, out, inputs["chat_pixels"])
            else:
                meta = make_cg(name, fx, out, inputs["cg_pixels"])
        kind = "chat" if name in CHAT_FIXTURES else "cg"
        meta = {"kind": kind, "reference_folder": fx.reference, **provenance, **meta}
        (out / f"{name}.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
        manifest["fixtures"][name] = {"kind": kind, **provenance}
        print(f"{name}: written", flush=True)
    manifest_file.write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
