"""QLoRA on the CPU (bitsandbytes >= 0.46 has 4-bit CPU kernels): 4-bit loading, training, export, byte counts."""

import json

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit  # noqa: E402
from test_chat_training import _cfg  # noqa: E402

from internvl_tune.models.common.quantize import stored_bytes  # noqa: E402
from internvl_tune.models.internvl_chat import load_pretrained  # noqa: E402
from internvl_tune.models.internvl_chat.lora import load_adapter  # noqa: E402
from internvl_tune.train.memory import estimate_training_memory  # noqa: E402


def _logits(chat, ids):
    chat.model.eval()
    with torch.no_grad():
        return chat.model(input_ids=ids).logits.float()


def test_only_the_llm_linears_are_quantized_and_survive_moves(tiny_1b):
    chat = load_pretrained(tiny_1b, load_in_4bit=True)
    chat.model.to("cpu")  # what the trainer does: the quantized weights and their state stay
    model = chat.model
    quantized = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    llm_linears = {n for n, m in model.model.language_model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert quantized == {f"model.language_model.{n}" for n in llm_linears} and len(quantized) == 14
    for name, p in model.named_parameters():
        is_weight = name.removesuffix(".weight") in quantized
        assert (p.dtype == torch.uint8 and p.quant_state is not None) if is_weight else p.dtype == torch.float32, name


def test_gradients_flow_through_4bit_layers_after_a_validation_pass(tiny_1b):
    from internvl_tune.models.internvl_chat.lora import add_lora

    chat = load_pretrained(tiny_1b, load_in_4bit=True)
    add_lora(chat, llm_rank=4, lora_dropout=0.0)
    ids = torch.randint(0, 1000, (1, 12))
    _logits(chat, ids)  # eval mode, no grad: bitsandbytes would repack CPU weights for inference here
    chat.model.train()
    chat.model(input_ids=ids).logits.sum().backward()
    grads = [p.grad for n, p in chat.model.named_parameters() if "lora_B" in n]  # lora_A's are 0 while B is 0
    assert len(grads) == 14 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_4bit_bytes_are_counted_as_bitsandbytes_stores_them(tiny_1b):
    for shape in [(64, 64), (37, 1000), (896, 4864)]:
        weight = bnb.nn.Params4bit(torch.randn(shape), quant_type="nf4", compress_statistics=True).to("cpu")
        state = weight.quant_state
        parts = [weight, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code]
        assert stored_bytes(weight) == sum(t.numel() * t.element_size() for t in parts)
    assert 0.51 < stored_bytes(weight) / (896 * 4864) < 0.52
    chat = load_pretrained(tiny_1b, load_in_4bit=True)
    chat.model.requires_grad_(False)
    estimate = estimate_training_memory(chat.model, [], world_size=1, tokens_per_micro_batch=1, hidden=1, ffn=1,
                                        num_layers=1, grad_checkpoint=1.0)
    assert estimate.model_states * 2**30 == pytest.approx(sum(stored_bytes(p) for p in chat.model.parameters()))


def test_qlora_trains_and_exports_the_adapter_and_a_bf16_merge(tiny_1b, tmp_path, subset_meta):
    from train_helpers import run_chat as run

    meta = subset_meta(tmp_path, 2)
    out = tmp_path / "run"
    result = run(_cfg(tiny_1b, meta, out, use_llm_lora=4, load_in_4bit=True, max_steps=2, learning_rate=1e-2,
                      lora_dropout=0.0))
    assert len(result.losses) == 2 and all(map(torch.isfinite, torch.tensor(result.losses)))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    merged = _logits(load_pretrained(out), ids)
    base = load_pretrained(tiny_1b, dtype=torch.bfloat16)
    plain = _logits(base, ids)
    load_adapter(base, out / "adapter")  # the merge is the bf16 base plus the adapter, up to bf16 rounding
    torch.testing.assert_close(merged, _logits(base, ids), atol=0.05, rtol=0)
    trained = load_pretrained(tiny_1b, load_in_4bit=True)
    quantized = _logits(trained, ids)
    load_adapter(trained, out / "adapter")  # the model as trained: peft's 4-bit LoRA layers
    assert any(isinstance(m, LoraLinear4bit) for m in trained.model.modules())
    # the adapter changes the logits alike on the 4-bit base it was trained on and in the bf16 merge
    on_merge, on_4bit = (merged - plain).flatten(), (_logits(trained, ids) - quantized).flatten()
    assert on_merge.abs().max() > 0.1
    assert torch.corrcoef(torch.stack([on_merge, on_4bit]))[0, 1] > 0.9


def test_the_gpu_check_script_runs_on_a_tiny_shape(tmp_path):
    from internvl_tune.cli import main

    out = tmp_path / "qlora.json"
    assert main(["bench", "qlora", "--shape", "tiny", "--device", "cpu", "--steps", "1", "--packed_tokens", "512",
                 "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    assert len(row["losses"]) == 1 and row["estimate_gib"] > 0 and row["trainable"] > 0
