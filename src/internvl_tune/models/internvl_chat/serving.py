"""What the servers users run need from an InternVL chat checkpoint folder: ``internvl-tune export --check DIR``.

Each server is one entry of :data:`SERVERS`: the architectures it registers for InternVL, which remote-code classes
it builds for the original layout, and whether it reads the transformers processor files of the native layout.
What the entries say was read from the servers' own code (2026-12):

- vLLM: ``InternVLChatModel`` (original layout: its config comes from ``AutoConfig`` with remote code trusted, so
  ``auto_map.AutoConfig`` and its ``configuration_*.py`` must be in the folder) and ``InternVLForConditionalGeneration``
  (native layout, served by its InternS1 model through the transformers processor).
- LMDeploy: ``InternVLChatModel`` (its vision preprocessor builds the whole remote-code model: ``AutoConfig`` and
  ``AutoModel`` must resolve) and ``InternVLForConditionalGeneration`` (its InternVL3-hf path, transformers processor).
- SGLang: ``InternVLChatModel`` (``AutoConfig`` remote code); no entry for ``InternVLForConditionalGeneration``.
- transformers: the native layout loads with ``AutoModelForImageTextToText`` + ``AutoProcessor``; the original one
  only with the release's remote code (``AutoModel`` with remote code trusted).

Every server also needs complete weights, a tokenizer with InternVL's image tokens, and, for its chat endpoint, a chat
template that puts an image where the model expects it: ``<image>`` in the original layout (the server expands it
into the tile tokens), ``<IMG_CONTEXT>`` in the native one (``InternVLProcessor`` expands it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from internvl_tune.constants import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl_tune.errors import UserError

ORIGINAL, NATIVE = "InternVLChatModel", "InternVLForConditionalGeneration"
# what the original layout's config.json must say (the servers read these keys themselves)
ORIGINAL_KEYS = ("llm_config", "vision_config", "template", "downsample_ratio", "ps_version", "select_layer",
                 "dynamic_image_size", "use_thumbnail", "max_dynamic_patch")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
IMAGE_TOKENS = (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN)
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.MULTILINE)


@dataclass(frozen=True)
class Server:
    """What one server needs: its InternVL architectures, the remote-code classes of the original layout, and the
    processor files of the native one."""

    name: str
    architectures: tuple[str, ...]
    remote_code: tuple[str, ...]  # auto_map entries it resolves for the original layout
    processor: bool  # reads the native layout's transformers processor files
    chat_template: bool = True  # its chat endpoint renders the checkpoint's chat template


SERVERS = {s.name.lower(): s for s in (
    Server("vLLM", (ORIGINAL, NATIVE), ("AutoConfig",), processor=True),
    Server("LMDeploy", (ORIGINAL, NATIVE), ("AutoConfig", "AutoModel"), processor=True, chat_template=False),
    Server("SGLang", (ORIGINAL,), ("AutoConfig",), processor=False),
    Server("transformers", (ORIGINAL, NATIVE), ("AutoConfig", "AutoModel"), processor=True),
)}


@dataclass
class Check:
    """One line of the checklist: what was checked, whether it holds, and for which servers it is required."""

    what: str
    ok: bool
    detail: str = ""
    servers: tuple[str, ...] = ()  # the servers that need it (empty: advice only)

    def line(self) -> str:
        mark = "ok  " if self.ok else ("FAIL" if self.servers else "warn")
        needs = f" [{', '.join(SERVERS[s].name for s in self.servers)}]" if self.servers else ""
        return f"  {mark} {self.what}{needs}" + (f": {self.detail}" if self.detail else "")


@dataclass
class Report:
    """The checklist of a folder for the chosen servers."""

    folder: Path
    layout: str
    checks: list[Check] = field(default_factory=list)

    def failed(self, servers) -> list[Check]:
        return [c for c in self.checks if not c.ok and set(c.servers) & set(servers)]

    def text(self, servers) -> str:
        lines = [f"{self.folder}: {self.layout}"] + [c.line() for c in self.checks]
        for key in servers:
            bad = [c.what for c in self.failed([key])]
            lines.append(f"{SERVERS[key].name}: " + ("ready" if not bad else f"NOT ready ({len(bad)} failing)"))
        return "\n".join(lines)


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _weights(folder: Path) -> tuple[bool, str]:
    from internvl_tune.errors import CheckpointError
    from internvl_tune.models.common.weights import weight_files

    try:
        files = weight_files(folder)
    except CheckpointError as exc:
        return False, str(exc)
    if not files:
        return False, "no model.safetensors, shards with an index, or pytorch_model*.bin"
    kind = "safetensors" if files[0].suffix == ".safetensors" else ".bin (servers prefer safetensors)"
    return True, f"{len(files)} file(s), {kind}"


def _added_tokens(folder: Path) -> set[str]:
    """The added tokens the tokenizer files declare (tokenizer_config.json, tokenizer.json, added_tokens.json)."""
    tokens = {t.get("content") for t in _json(folder / "tokenizer_config.json").get("added_tokens_decoder", {}).values()
              if isinstance(t, dict)}
    tokens |= {t.get("content") for t in _json(folder / "tokenizer.json").get("added_tokens", []) if isinstance(t, dict)}
    tokens |= set(_json(folder / "added_tokens.json"))
    return tokens


def remote_code(folder: Path, auto_map: dict, classes: tuple[str, ...]) -> tuple[bool, str]:
    """Whether the ``auto_map`` entries ``classes`` resolve to files in the folder, with every module they import
    relatively (``from .configuration_intern_vit import ...``)."""
    missing, wanted = [], []
    for cls in classes:
        ref = auto_map.get(cls)
        if not isinstance(ref, str):
            missing.append(f"auto_map.{cls}")
            continue
        wanted.append(ref.split("--")[-1].rsplit(".", 1)[0])
    seen: set[str] = set()
    while wanted:
        module = wanted.pop()
        if module in seen:
            continue
        seen.add(module)
        file = folder / f"{module}.py"
        if not file.is_file():
            missing.append(file.name)
            continue
        wanted += _RELATIVE_IMPORT.findall(file.read_text(encoding="utf-8", errors="replace"))
    if missing:
        return False, f"missing {', '.join(missing)}"
    return True, ", ".join(f"{m}.py" for m in sorted(seen))


def template_check(folder: Path, layout: str) -> Check:
    from internvl_tune.models.internvl_chat.config import chat_template_of

    want = "<image>" if layout == ORIGINAL else IMG_CONTEXT_TOKEN
    servers = tuple(k for k, s in SERVERS.items() if s.chat_template and layout in s.architectures)
    found = chat_template_of(folder)
    what = f"chat template puts an image as {want}"
    if found is None:
        return Check(what, False, "no chat template (chat_template.jinja, or chat_template in tokenizer_config.json): "
                                  "a chat endpoint has nothing to render", servers)
    file, jinja = found
    from transformers.utils.chat_template_utils import render_jinja_template

    listed = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}]
    try:
        rendered = render_jinja_template([listed], chat_template=jinja, add_generation_prompt=True)[0][0]
    except Exception as exc:  # noqa: BLE001 - a template may refuse list contents
        rendered = f"(error: {exc})"
    if "'type'" in rendered or "(error" in rendered:
        # a template for string contents: the server puts its own placeholder into the text (vLLM: <image>)
        ok = layout == ORIGINAL
        return Check(what, ok, f"{file.name} renders text contents; the server inserts <image>" if ok else
                     f"{file.name} renders only text contents, where InternVLProcessor needs {want}", servers)
    ok = want in rendered and (layout == NATIVE or IMG_CONTEXT_TOKEN not in rendered)
    return Check(what, ok, f"{file.name} renders an image item as {rendered!r}"[:200], servers)


def check_folder(folder: str | Path) -> Report:
    """The checklist of an exported folder against every server in :data:`SERVERS`.

    Raises:
        UserError: when the folder has no readable config.json or is no InternVL chat checkpoint.
    """
    folder = Path(folder)
    config = _json(folder / "config.json")
    if not config:
        raise UserError(f"{folder}: no readable config.json — pass the folder an export wrote")
    archs = config.get("architectures") or []
    layout = next((a for a in archs if a in (ORIGINAL, NATIVE)), None)
    if layout is None:
        raise UserError(f"{folder}: config.json names architectures {archs}, not {ORIGINAL} (original layout) or "
                        f"{NATIVE} (native layout)")
    report = Report(folder, f"{'original' if layout == ORIGINAL else 'native'} layout ({layout})")
    add = report.checks.append
    everyone = tuple(SERVERS)
    supported = tuple(k for k, s in SERVERS.items() if layout in s.architectures)
    for key in everyone:
        if key not in supported:
            add(Check(f"architecture {layout} registered", False,
                      f"{SERVERS[key].name} has no entry for it: export the other layout", (key,)))
    ok, detail = _weights(folder)
    add(Check("weights complete", ok, detail, everyone))
    dtype = config.get("torch_dtype") or config.get("dtype") or (config.get("text_config") or {}).get("dtype")
    add(Check("weights in bf16 or fp16", dtype in ("bfloat16", "float16"),
              f"{dtype} (servers load it; bf16 halves the files and the load)" if dtype == "float32" else str(dtype)))
    tokens = _added_tokens(folder)
    has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    lacking = [t for t in IMAGE_TOKENS if t not in tokens]
    add(Check("tokenizer with the image tokens", has_tokenizer and not lacking,
              "no tokenizer files" if not has_tokenizer else
              (f"missing added tokens {lacking}" if lacking else " ".join(IMAGE_TOKENS)), everyone))
    if layout == ORIGINAL:
        absent = [k for k in ORIGINAL_KEYS if k not in config]
        absent += [] if config.get("force_image_size") or (config.get("vision_config") or {}).get("image_size") \
            else ["force_image_size"]
        add(Check("config keys the servers read", not absent,
                  f"missing {absent}" if absent else f"template {config.get('template')}, "
                                                     f"ps_version {config.get('ps_version')}", supported))
        if config.get("model_type") != "internvl_chat":
            add(Check("model_type internvl_chat", False, f"got {config.get('model_type')!r}", supported))
        auto_map = config.get("auto_map") or {}
        for classes in sorted({s.remote_code for k, s in SERVERS.items() if k in supported}):
            needs = tuple(k for k in supported if SERVERS[k].remote_code == classes)
            ok, detail = remote_code(folder, auto_map, classes)
            add(Check(f"remote code for {' + '.join(classes)}", ok, detail + ("" if ok else
                      " (the release's .py files: see docs/checkpoints.md, Serving)"), needs))
    else:
        if config.get("model_type") != "internvl":
            add(Check("model_type internvl", False, f"got {config.get('model_type')!r}", supported))
        missing = [f for f in PROCESSOR_FILES if not (folder / f).is_file()]
        add(Check("transformers processor files", not missing, f"missing {missing}" if missing else
                  ", ".join(PROCESSOR_FILES), tuple(k for k in supported if SERVERS[k].processor)))
    add(template_check(folder, layout))
    return report
