"""Compare internvl_tune with the reference InternVLChatModel on tiny random checkpoints (not part of the test suite).

Needs a checkout of the reference repository (its ``internvl_chat`` folder), ``einops`` on the path and nothing else:
a stand-in for timm's DropPath is written to a temp dir (it is only used with drop_path_rate > 0). Run:

    pip install --target /tmp/refdeps einops
    PYTHONPATH=/tmp/refdeps python tests/models/reference_fidelity.py /path/to/InternVL/internvl_chat

The InternVL3.5 releases (Qwen3) need the reference's ``internvl_chat_gpt_oss`` folder instead, named with them:

    PYTHONPATH=/tmp/refdeps python tests/models/reference_fidelity.py /path/to/InternVL/internvl_chat_gpt_oss \
        internvl3_5-1b internvl3_5-38b

For every release it writes a tiny checkpoint in the original layout, loads it into the reference model
(``load_state_dict(strict)``: proves our key names and shapes are the reference's) and into ours (eager and SDPA),
and prints the largest logit difference (fp32, CPU) and whether 8 greedy tokens agree (reference: full forward per
step without cache; ours: ``generate`` with the KV cache).
"""

from __future__ import annotations

import json
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from internvl_tune.testing.tiny_chat import RELEASES

_DROP_PATH_STANDIN = '''
import torch
from torch import nn


class DropPath(nn.Module):
    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.ndim - 1)), device=x.device) >= self.p
        return x * keep / (1 - self.p)
'''
# Every release the reference's internvl_chat InternVLChatModel can build (it has no InternLM3, so not InternVL3-9B,
# and no Qwen3: InternVL3.5 runs with the internvl_chat_gpt_oss folder).
LIKES = [like for like, release in RELEASES.items() if release.family not in ("internlm3", "qwen3")]
VARIANTS = {"default": {}, "select_layer=-2": {"select_layer": -2}, "ps_version=v1": {"ps_version": "v1"}, "long-prompt": {}}
# Which sizes get the extra variants (all get "default"); the long prompt passes Phi-3's original rope window.
EXTRA = {"select_layer=-2": ("internvl2-1b", "internvl2-26b"), "ps_version=v1": ("internvl2-1b", "internvl2-26b"),
         "long-prompt": ("internvl2-4b",)}


def _import_reference(ref_root: str, scratch: Path):
    shim = scratch / "timm" / "models"
    shim.mkdir(parents=True)
    (scratch / "timm" / "__init__.py").write_text("")
    (shim / "__init__.py").write_text("")
    (shim / "layers.py").write_text(_DROP_PATH_STANDIN)
    (scratch / "timm" / "layers.py").write_text(_DROP_PATH_STANDIN)  # where the InternVL3.5 code imports it from
    sys.path[:0] = [str(scratch), ref_root]
    try:
        import transformers.modeling_attn_mask_utils  # noqa: F401
    except ImportError:  # gone in transformers 5.24; only the reference's Phi-3 imports it (InternVL2-4B cannot run)
        sys.modules["transformers.modeling_attn_mask_utils"] = SimpleNamespace(_prepare_4d_causal_attention_mask=None)
    from internvl.model.internvl_chat.configuration_internvl_chat import InternVLChatConfig
    from internvl.model.internvl_chat.modeling_internvl_chat import InternVLChatModel

    return InternVLChatConfig, InternVLChatModel


def compare(ref_root: str, likes: list[str]) -> None:
    from internvl_tune.models.internvl_chat import load_pretrained
    from internvl_tune.testing.tiny_chat import write_tiny_checkpoint

    warnings.filterwarnings("ignore")
    scratch = Path(tempfile.mkdtemp(prefix="internvl-fidelity-"))
    InternVLChatConfig, InternVLChatModel = _import_reference(ref_root, scratch)
    for like in likes:
        path = write_tiny_checkpoint(like, scratch / like, seed=3)
        raw = json.loads((path / "config.json").read_text())
        state = {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
        for name, override in VARIANTS.items():
            if name != "default" and like not in EXTRA[name]:
                continue
            # transformers edits rope dicts in place, so every config gets a fresh copy
            ref = InternVLChatModel(InternVLChatConfig(**json.loads(json.dumps({**raw, **override}))), use_flash_attn=False)
            ref = ref.float().eval()
            ref.load_state_dict(state, strict=True)
            ours = {impl: load_pretrained(path, attn_implementation=impl, **override) for impl in ("eager", "sdpa")}
            chat = ours["eager"]
            ref.img_context_token_id = chat.img_context_token_id
            pixels = torch.randn(2, 3, chat.image_size, chat.image_size, generator=torch.Generator().manual_seed(1))
            prompt = "<img>" + "<IMG_CONTEXT>" * (2 * chat.num_image_token) + "</img>\nWhat is shown here?" * (80 if name == "long-prompt" else 1)
            ids = chat.tokenizer(prompt, return_tensors="pt").input_ids
            flags = torch.ones(2, 1, dtype=torch.long)

            def ref_logits(tokens):
                return ref(pixel_values=pixels, input_ids=tokens, image_flags=flags, return_dict=True, use_cache=False).logits

            with torch.no_grad():
                expected = ref_logits(ids)
                diffs = {}
                for impl, c in ours.items():
                    embeds = c.embed_inputs(ids, pixels, flags.squeeze(-1))
                    diffs[impl] = (c.model(inputs_embeds=embeds).logits - expected).abs().max().item()
                tokens = ids
                for _ in range(8):
                    tokens = torch.cat([tokens, ref_logits(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
                generated = chat.generate(ids, pixels, max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None)
            same = torch.equal(tokens[:, ids.shape[1]:], generated)
            print(f"{like:14s} {chat.family:9s} {name:16s} max|dlogits| eager={diffs['eager']:.1e} "
                  f"sdpa={diffs['sdpa']:.1e} greedy_match={same} prompt_tokens={ids.shape[1]}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    compare(sys.argv[1], sys.argv[2:] or LIKES)
