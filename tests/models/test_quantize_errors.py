"""--load_in_4bit refusals and the 4-bit byte count, with bitsandbytes absent, broken or faked (they run everywhere)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from internvl_tune.cli import build_parser
from internvl_tune.data.config import DataConfig
from internvl_tune.errors import UserError
from internvl_tune.models.common.quantize import stored_bytes
from internvl_tune.models.internvl_chat import chat as chat_module
from internvl_tune.models.internvl_chat import load_pretrained
from internvl_tune.models.internvl_chat.recipe import ChatRecipe, ModelArgs
from internvl_tune.train.memory import estimate_training_memory


class FakeParams4bit(nn.Parameter):
    """Stands in for an unquantized ``bitsandbytes.nn.Params4bit`` (the settings the byte count reads)."""

    blocksize, compress_statistics, bnb_quantized = 64, True, False


def _fake_bitsandbytes(linear4bit=None) -> types.ModuleType:
    bnb = types.ModuleType("bitsandbytes")
    bnb.__version__ = "0.45.5"
    bnb.nn = types.SimpleNamespace(Params4bit=FakeParams4bit, Linear4bit=linear4bit)
    return bnb


def _recipe(model, **flags) -> ChatRecipe:
    return ChatRecipe(ModelArgs(model_name_or_path=str(model), load_in_4bit=True, **flags), DataConfig(meta_path="m"))


def test_a_missing_bitsandbytes_is_named_with_the_install_command(monkeypatch, tiny_dirs):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(UserError, match=r"--load_in_4bit needs the bitsandbytes package.*pip install bitsandbytes"):
        _recipe(tiny_dirs("internvl2-1b"), use_llm_lora=16)
    monkeypatch.setattr(chat_module, "load_weights", lambda *a: pytest.fail("weights were read"))
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        load_pretrained(tiny_dirs("internvl2-1b"), load_in_4bit=True)


def test_a_bitsandbytes_without_kernels_for_the_device_is_refused_before_loading(monkeypatch, tiny_dirs):
    # bitsandbytes before 0.46 leaves a CPU layer unquantized (its forward then fails)
    monkeypatch.setitem(sys.modules, "bitsandbytes", _fake_bitsandbytes(lambda *a, **k: nn.Linear(64, 64)))
    monkeypatch.setattr(chat_module, "load_weights", lambda *a: pytest.fail("weights were read"))
    with pytest.raises(UserError, match=r"bitsandbytes 0\.45\.5 cannot run 4-bit layers on cpu.*0\.46 or later"):
        load_pretrained(tiny_dirs("internvl2-1b"), load_in_4bit=True)


def test_several_ranks_are_refused(monkeypatch, tiny_dirs):
    monkeypatch.setitem(sys.modules, "bitsandbytes", _fake_bitsandbytes())
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    recipe = _recipe(tiny_dirs("internvl2-1b"), use_llm_lora=16)
    monkeypatch.setattr(recipe, "_load_chat", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match=r"--load_in_4bit trains in one process.*2 ranks.*--nproc_per_node 1"):
        recipe.build_module(torch.bfloat16, device="cuda")


def test_a_trainable_4bit_llm_is_refused(monkeypatch, tiny_dirs):
    monkeypatch.setitem(sys.modules, "bitsandbytes", _fake_bitsandbytes())
    with pytest.raises(UserError, match="add --use_llm_lora R .* or --freeze_llm True"):
        _recipe(tiny_dirs("internvl2-1b"))
    _recipe(tiny_dirs("internvl2-1b"), freeze_llm=True)  # a frozen 4-bit LLM under a trained projector is fine


@pytest.mark.parametrize("argv, value", [(["--load_in_4bit"], True), (["--quantization_bit", "4"], True),
                                         (["--quant_bits", "4"], True), (["--quant_bits", "0"], False)])
def test_the_flag_and_its_aliases(argv, value):
    argv = ["train", "--meta_path", "m", *argv]
    assert getattr(build_parser(argv).parse_args(argv), "model.load_in_4bit") is value


def test_other_bit_widths_are_refused(capsys):
    argv = ["train", "--quantization_bit", "8"]
    with pytest.raises(SystemExit) as stop:
        build_parser(argv).parse_args(argv)
    assert stop.value.code == 2
    assert "only 4-bit base weights are supported (--load_in_4bit True)" in capsys.readouterr().err


def test_4bit_weights_count_half_a_byte_plus_their_scales(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", _fake_bitsandbytes())
    weight = FakeParams4bit(torch.empty(64, 64, device="meta"), requires_grad=False)
    # as bitsandbytes 0.50 stores 4096 NF4 weights: 2048 packed bytes, 64 8-bit scales, one fp32 second-level scale,
    # the 16-entry NF4 code, the scales' 256-entry code and their offset (fp32)
    assert stored_bytes(weight) == 2048 + 64 + 4 + 16 * 4 + 256 * 4 + 4
    big = FakeParams4bit(torch.empty(8192, 8192, device="meta"), requires_grad=False)
    assert 0.515 < stored_bytes(big) / big.numel() < 0.516
    model = nn.Linear(8192, 8192, bias=False)
    model.weight = big
    model.lora = nn.Linear(8192, 16, bias=False)
    estimate = estimate_training_memory(model, [], world_size=1, tokens_per_micro_batch=1, hidden=8192, ffn=1,
                                        num_layers=1, grad_checkpoint=1.0)
    assert estimate.model_states * 2**30 == pytest.approx(stored_bytes(big) + 16 * 8192 * 16)  # + fp32 master, grad, AdamW
