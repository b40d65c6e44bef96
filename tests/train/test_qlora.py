"""QLoRA on the CPU (bitsandbytes >= 0.46 has 4-bit CPU kernels): 4-bit loading, training, export, byte counts."""

import json
import math

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


def test_4bit_layers_give_the_logits_and_lora_gradients_of_their_dequantized_weights(tiny_1b):
    """Through a validation pass (bitsandbytes repacks CPU weights for inference there) and back to training, the
    4-bit LLM with LoRA computes what an fp32 copy holding the dequantized NF4 weights and the same LoRA computes:
    the same logits and the same LoRA gradients."""
    from internvl_tune.models.internvl_chat.lora import add_lora

    chat = load_pretrained(tiny_1b, load_in_4bit=True)
    add_lora(chat, llm_rank=4, lora_dropout=0.0)
    plain = load_pretrained(tiny_1b)
    add_lora(plain, llm_rank=4, lora_dropout=0.0)
    quantized = dict(chat.model.named_modules())
    lora = dict(chat.model.named_parameters())
    with torch.no_grad():
        for name, module in plain.model.named_modules():
            if isinstance(quantized.get(name), bnb.nn.Linear4bit):
                weight = quantized[name].weight
                module.weight.copy_(bnb.functional.dequantize_4bit(weight.data, weight.quant_state))
        for name, p in plain.model.named_parameters():
            if "lora_" in name:
                p.copy_(lora[name])
                if "lora_B" in name:  # B starts at 0; a random one makes the A gradients count too
                    value = 0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name)))
                    p.copy_(value)
                    lora[name].copy_(value)
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    _logits(chat, ids)  # eval mode, no grad
    grads = {}
    for which, model in (("4bit", chat.model), ("plain", plain.model)):
        model.train()
        logits = model(input_ids=ids).logits
        logits.float().logsumexp(-1).sum().backward()
        grads[which] = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
        grads[which + "_logits"] = logits.detach()
    torch.testing.assert_close(grads["4bit_logits"], grads["plain_logits"], atol=1e-4, rtol=1e-4)
    assert len(grads["4bit"]) == 28 and grads["4bit"].keys() == grads["plain"].keys()  # A and B of 14 linears
    for name, grad in grads["plain"].items():
        torch.testing.assert_close(grads["4bit"][name], grad, atol=1e-4, rtol=1e-3, msg=name)


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
    # LoRA r16 on the 7 linears of each of the 2 layers of the tiny LLM (width 64, 4 heads and 2 KV heads of 16,
    # MLP 128): r x (in + out) = 16 x (128 + 96 + 96 + 128 + 192 + 192 + 192) per layer
    assert row["trainable"] == 2 * 16 * (128 + 96 + 96 + 128 + 192 + 192 + 192) == 32768
    # random weights of std 0.02 predict the 1000-token vocabulary almost uniformly: a loss near log(1000)
    assert len(row["losses"]) == 1 and abs(row["losses"][0] - math.log(1000)) < 0.1, row["losses"]
    assert row["estimate_gib"] > 0
