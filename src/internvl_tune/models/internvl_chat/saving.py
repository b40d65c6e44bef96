"""Saving InternVL2 checkpoints in the original layout (reference, vLLM, lmdeploy) or the transformers-native one.

Both layouts are written into a temporary sibling directory that is renamed into place at the end, so an interrupted
save never leaves a half-written checkpoint under the target name; a full or read-only disk is one StorageError line,
and files and folders get the modes the umask gives (``internvl_tune.storage``). Tokenizer, generation, processor and remote-code
files are copied from the source checkpoint (an allowlist: a training run's logs, metrics and checkpoints stay
behind). The native layout also gets what ``transformers.AutoProcessor`` reads (``write_processor_files``).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import shutil
from pathlib import Path

import torch

from internvl_tune.constants import IMAGENET_MEAN, IMAGENET_STD, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl_tune.errors import CheckpointError
from internvl_tune.models.common.weights import write_shards
from internvl_tune.models.internvl_chat import families
from internvl_tune.models.internvl_chat.config import SIDECAR
from internvl_tune.models.internvl_chat.key_map import LayoutSpec, per_expert, to_original
from internvl_tune.models.internvl_chat.tokenizers import OWN_CLASSES
from internvl_tune.storage import make_temp_dir, writing

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# The files of a checkpoint that are neither weights nor configs: copied from the source (nothing else is).
AUX_FILE_PATTERNS = (
    "tokenizer*.json", "tokenizer.model", "*.tiktoken", "vocab*", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "generation_config.json", "chat_template*", "preprocessor_config.json",
    "processor_config.json", "video_preprocessor_config.json", "*.py",
)
PROCESSOR_CLASS = "InternVLProcessor"
# Written by a native save (and copied along by later saves, like the other files above).
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
                   "chat_template.jinja")
_PIL_BICUBIC = 3
_NO_VIDEO = "InternVL2 takes a video as its frames: pass each frame as an image item"


def _dtype_name(state: dict[str, torch.Tensor]) -> str:
    return _DTYPE_NAMES.get(next(iter(state.values())).dtype, "float32")


def write_original_checkpoint(out: Path, native_state: dict[str, torch.Tensor], original: dict,
                              num_shards: int | None = None) -> None:
    """Weights (original key names) and config.json of the original layout into ``out``."""
    spec = LayoutSpec.from_original(original)
    state = to_original(native_state, spec)
    config = json.loads(json.dumps(original))
    embed = next(v for k, v in state.items() if k.endswith(("embed_tokens.weight", "tok_embeddings.weight")))
    config["llm_config"]["vocab_size"] = embed.shape[0]
    config["torch_dtype"] = config["llm_config"]["torch_dtype"] = _dtype_name(state)
    write_shards(out, state, num_shards)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_native_checkpoint(out: Path, native_state: dict[str, torch.Tensor], native_config, original: dict) -> None:
    """Weights, config.json (``InternVLForConditionalGeneration``) and the original config sidecar into ``out``."""
    native_config = copy.deepcopy(native_config)
    native_config.text_config.vocab_size = native_state["lm_head.weight"].shape[0]
    native_config.dtype = _dtype_name(native_state)
    native_config.architectures = ["InternVLForConditionalGeneration"]
    write_shards(out, per_expert(native_state, LayoutSpec.from_original(original)))  # as transformers writes MoE
    native_config.to_json_file(str(out / "config.json"))
    (out / SIDECAR).write_text(json.dumps(original, indent=2, sort_keys=True) + "\n")


def copy_aux_files(source: Path | None, out: Path, skip: tuple[str, ...] = ()) -> None:
    """Copy the tokenizer / generation / processor / remote-code files (``AUX_FILE_PATTERNS``) of the source checkpoint
    (but ``skip``)."""
    if source is None:
        return
    for file in sorted(source.iterdir()):
        if file.is_file() and file.name not in skip and any(fnmatch.fnmatchcase(file.name, p) for p in AUX_FILE_PATTERNS):
            shutil.copyfile(file, out / file.name)  # (copy2 would keep the source's mode, not the umask's)


def copy_remote_code(folder: str | Path, out: Path) -> None:
    """The ``*.py`` files of an original-layout release folder (``--remote_code``), for the servers that build its
    config (and model) from them."""
    folder = Path(folder)
    files = sorted(folder.glob("*.py")) if folder.is_dir() else []
    if not files:
        raise CheckpointError(f"--remote_code {folder}: no .py files there — pass the folder of the original-layout "
                              "release (e.g. a download of OpenGVLab/InternVL2-1B, not its -hf copy)")
    for file in files:
        shutil.copyfile(file, out / file.name)


REMOTE_CODE_CLASSES = ("AutoConfig", "AutoModel")  # what LMDeploy and transformers resolve; vLLM / SGLang: AutoConfig


def finish_original_folder(out: Path, chat, require_remote_code: bool) -> None:
    """Make an original-layout folder servable, or say why it is not (docs/checkpoints.md, "Serving").

    - The servers build its config (LMDeploy and transformers also its model) from the release's remote code, named
      by ``auto_map``; internvl-tune ships none of it, so the folder is as servable as its source: an original
      source's .py files are copied along. A native ("-hf") source has none: with ``require_remote_code`` (the CLI's
      default) that is refused, naming what is missing and how to get it; otherwise the folder is written without
      them (config.json as the source implies: a round trip is exact) for the reference code and internvl-tune.
    - A chat template that puts an image as ``<image>`` (what InternVL servers expand), written unless the folder
      already has one that does (a native source's renders ``<IMG_CONTEXT>``).
    """
    from internvl_tune.models.internvl_chat.serving import ORIGINAL, remote_code, template_check

    config = json.loads((out / "config.json").read_text())
    ok, detail = remote_code(out, config.get("auto_map") or {}, REMOTE_CODE_CLASSES)
    if not ok and require_remote_code and chat.layout == "native":
        raise CheckpointError(
            f"the original layout is served (vLLM, LMDeploy, SGLang) through the release's remote code, and "
            f"{chat.source_dir} does not carry it ({detail}); internvl-tune cannot ship that code. Pass "
            "--remote_code DIR (the original-layout release's folder: its .py files are copied), write the native "
            "layout (--to native / --layout native), which vLLM, LMDeploy and transformers load without remote code, "
            "or --without_remote_code for a folder only the reference code and internvl-tune read")
    if not template_check(out, ORIGINAL).ok:
        (out / "chat_template.jinja").write_text(chat_template(chat.template, chat.system_message, image="<image>\n"),
                                                 encoding="utf-8")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def chat_template(template_name: str, system_message: str | None = None,
                  image: str = IMG_CONTEXT_TOKEN + "\n") -> str:
    """A Jinja chat template that builds the prompts of the conversation template ``template_name``; an image
    content item becomes ``image`` (``<image>\\n`` for the original layout, whose servers expand it).

    An image content item becomes ``<IMG_CONTEXT>\\n`` (what ``InternVLProcessor`` expands into the tile tokens), so
    a user turn [image, text] gives the prompt ``InternVLChat.chat`` builds; a leading ``system`` message replaces
    the default system message. Video items are refused: InternVL2 sees a video as its frames, given as images.
    """
    from internvl_tune.data.templates import get_template

    template = get_template(template_name)
    lit = lambda text: json.dumps(text, ensure_ascii=False)  # noqa: E731 (a Jinja string literal)
    render = (
        "{%- macro render(content) -%}{%- if content is string -%}{{ content }}{%- else -%}"
        "{%- for item in content -%}{%- if item['type'] == 'image' -%}{{ " + lit(image) + " }}"
        "{%- elif item['type'] == 'video' -%}{{ raise_exception(" + lit(_NO_VIDEO) + ") }}"
        "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    )
    default = template.system_message if system_message is None else system_message
    system = (
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set system = render(messages[0]['content']) -%}"
        "{%- set turns = messages[1:] -%}{%- else -%}{%- set system = " + lit(default) + " -%}"
        "{%- set turns = messages -%}{%- endif -%}"
    )
    if template.system_template is not None:
        before, after = template.system_template.split("{system_message}")
        system += "{{ " + lit(before) + " }}{{ system }}{{ " + lit(after + template.sep) + " }}"
    user, assistant = lit(template.roles[0]), lit(template.roles[1] + template.answer_prefix)
    turns = (
        "{%- for message in turns -%}{%- if message['role'] == 'user' -%}{{ " + user + " }}{%- else -%}{{ " + assistant
        + " }}{%- endif -%}{{ render(message['content']) }}{{ " + lit(template.sep) + " }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ " + assistant + " }}{%- endif -%}"
    )
    return render + system + turns


def _sentencepiece_tokenizer_json(out: Path, tokenizer) -> None:
    """``tokenizer.json`` that encodes like ``InternLM2Tokenizer`` / ``InternLM3Tokenizer`` (sentencepiece on each
    chunk between added tokens, BOS in front), so that transformers' own ``AutoTokenizer`` can load the checkpoint."""
    from tokenizers import AddedToken, processors
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString((out / "tokenizer.model").read_bytes())
    fast = SpmConverter.build_tokenizer_from_spm_proto(proto, {p.piece: i for i, p in enumerate(proto.pieces)}, legacy=True)
    added = sorted(tokenizer.added_tokens_decoder.items())
    fast.add_special_tokens([AddedToken(t.content, special=t.special, normalized=False) for _, t in added])
    moved = [t.content for i, t in added if fast.token_to_id(t.content) != i]
    if moved:
        raise CheckpointError(f"{out / 'tokenizer.model'}: the added tokens {moved[:5]} do not follow the sentencepiece "
                              "vocabulary in id order, so no tokenizer.json can reproduce their ids — keep the "
                              "original layout for this model")
    bos = tokenizer.bos_token
    fast.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                        special_tokens=[(bos, tokenizer.bos_token_id)])
    fast.save(str(out / "tokenizer.json"))


def write_processor_files(out: Path, chat) -> None:
    """What ``transformers.AutoProcessor`` reads for InternVL, with the checkpoint's tiling and normalisation.

    ``preprocessor_config.json`` (``GotOcr2ImageProcessor``: tile size, dynamic tiling with min / max tiles and the
    thumbnail, ImageNet mean / std, bicubic resize), ``video_preprocessor_config.json`` (``InternVLVideoProcessor``,
    needs torchvision), ``processor_config.json`` (``InternVLProcessor``, tokens per tile), ``chat_template.jinja``,
    and the InternVL image tokens named in ``tokenizer_config.json`` (InternLM2 / InternLM3: a ``tokenizer.json`` too).
    """
    tiles = chat.image_processor
    pixels = {
        "do_resize": True, "size": {"height": chat.image_size, "width": chat.image_size}, "resample": _PIL_BICUBIC,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD), "do_convert_rgb": True, "processor_class": PROCESSOR_CLASS,
    }
    _write_json(out / "preprocessor_config.json", {
        "image_processor_type": "GotOcr2ImageProcessor", **pixels, "crop_to_patches": bool(tiles.dynamic),
        "min_patches": tiles.min_tiles, "max_patches": tiles.max_tiles})
    _write_json(out / "video_preprocessor_config.json", {"video_processor_type": "InternVLVideoProcessor", **pixels})
    _write_json(out / "processor_config.json", {"processor_class": PROCESSOR_CLASS,
                                                "image_seq_length": chat.num_image_token})
    (out / "chat_template.jinja").write_text(chat_template(chat.template, chat.system_message), encoding="utf-8")
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    # InternVLProcessor needs a video token too. InternVL2 has none, and a new one would grow the vocabulary; <img> is
    # never in a prompt the processor is given (images are <IMG_CONTEXT> placeholders there), so no text has videos.
    config.update(start_image_token=IMG_START_TOKEN, end_image_token=IMG_END_TOKEN,
                  context_image_token=IMG_CONTEXT_TOKEN, video_token=IMG_START_TOKEN, processor_class=PROCESSOR_CLASS)
    if families.get(chat.family).tokenizer_class in OWN_CLASSES:  # the release names a remote-code class
        _sentencepiece_tokenizer_json(out, chat.tokenizer)
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config.pop("auto_map", None)  # the remote-code class; tokenizer.json needs none
    _write_json(out / "tokenizer_config.json", config)


def atomic_directory(target: Path, overwrite: bool, needed: int | None = None):
    """Context manager yielding a temp directory that replaces ``target`` when the block succeeds.

    ``needed``: the bytes the block writes, for the message of a full disk.
    """
    import contextlib

    @contextlib.contextmanager
    def _ctx():
        if target.exists() and any(target.iterdir()) and not overwrite:
            raise CheckpointError(f"{target} already exists and is not empty — choose a new directory or overwrite it")
        with writing("the model files", target, needed):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = make_temp_dir(target.parent, prefix=f".{target.name}.tmp-")
        try:
            with writing("the model files", target, needed):
                yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{tmp.name[-8:]}"
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    return _ctx()


def save_chat(chat, out_dir: str | Path, layout: str = "original", overwrite: bool = False, remote_code=None,
              require_remote_code: bool = False) -> Path:
    """Save an ``InternVLChat`` (weights, config, tokenizer files) in ``layout`` into ``out_dir`` atomically.

    The original layout also gets the release's remote code (copied from the source, or from ``remote_code``: a
    release folder) and a chat template for servers (:func:`finish_original_folder`; ``require_remote_code``
    refuses a folder the servers could not load). A native source's processor files stay out of it.
    """
    if layout not in ("original", "native"):
        raise CheckpointError(f"unknown layout {layout!r}; use 'original' or 'native'")
    if layout == "native" and chat.ps_version == "v1":
        raise CheckpointError(
            "this checkpoint uses pixel shuffle v1 (ps_version='v1'), which transformers' native InternVL cannot "
            "express (its features would come out transposed) — keep the original layout for this model"
        )
    from internvl_tune.models.internvl_chat.lora import has_lora

    if has_lora(chat):
        raise CheckpointError("the model still holds LoRA adapters — merge them (merge_lora) or save the adapter alone")
    target = Path(out_dir)
    state = {k: v.detach().cpu() for k, v in chat.model.state_dict().items()}
    with atomic_directory(target, overwrite, needed=sum(v.numel() * v.element_size() for v in state.values())) as tmp:
        native_only = PROCESSOR_FILES if layout == "original" and chat.layout == "native" else ()
        copy_aux_files(chat.source_dir, tmp, skip=native_only)
        if remote_code is not None:
            copy_remote_code(remote_code, tmp)
        if chat.tokens_added:
            chat.tokenizer.save_pretrained(str(tmp))
        if layout == "original":
            write_original_checkpoint(tmp, state, chat.original_config)
            finish_original_folder(tmp, chat, require_remote_code)
        else:
            write_native_checkpoint(tmp, state, chat.model.config, chat.original_config)
            write_processor_files(tmp, chat)
    return target
