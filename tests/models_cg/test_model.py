"""InternVL-C/G on a tiny checkpoint: strict loading, embedding shapes/normalisation, masks, generation batching."""

import json
import logging
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from internvl_tune.data.retrieval import tokenize_retrieval
from internvl_tune.errors import CheckpointError
from internvl_tune.models.internvl_cg.loading import load_internvl_cg, save_internvl_cg
from internvl_tune.models.internvl_cg.qllama import CACHE_FIELD
from internvl_tune.models.internvl_cg.tokenizer import load_tokenizer, tokenize_prompts


@pytest.fixture(scope="module")
def model(tiny_cg):
    return load_internvl_cg(tiny_cg, dtype="fp32")


def test_strict_load_fills_every_parameter_and_ties_embeddings(tiny_cg, model):
    files = {}
    for f in sorted(tiny_cg.glob("*.safetensors")):
        files.update(load_file(str(f)))
    state = model.state_dict()
    assert set(files) == set(state)
    assert all(torch.equal(files[k], state[k]) for k in state)
    assert model.qllama.lm_head.weight is model.qllama.model.embed_tokens.weight


def test_missing_and_unexpected_tensors_raise(tiny_cg, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_cg, bad)
    shard = sorted(bad.glob("model-*.safetensors"))[0]
    tensors = load_file(str(shard))
    dropped = sorted(tensors)[0]
    extra = dict(tensors, **{"vision_model.extra.weight": torch.zeros(1)})
    save_file(extra, str(shard))
    with pytest.raises(CheckpointError, match="unexpected tensor 'vision_model.extra.weight'"):
        load_internvl_cg(bad, dtype="fp32")
    tensors.pop(dropped)
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match="missing"):
        load_internvl_cg(bad, dtype="fp32")


def test_legacy_bin_and_shape_mismatch(tiny_cg, model, tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(tiny_cg / "config.json", legacy)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, legacy / "pytorch_model.bin")
    again = load_internvl_cg(legacy, dtype="fp32")
    assert torch.equal(again.text_projection, model.text_projection)
    cfg = json.loads((legacy / "config.json").read_text())
    cfg["clip_embed_dim"] = 16
    (legacy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match the weights"):
        load_internvl_cg(legacy, dtype="fp32")


def test_embeddings_shapes_and_normalisation(tiny_cg, model):
    tok = load_tokenizer(tiny_cg, add_eos_token=True)
    ids, mask = tokenize_retrieval(tok, ["a dog runs on the grass", "一只猫躺在毯子上", "a cup"])
    assert ids.shape == (3, 80) and (ids[mask == 0] == 0).all()
    assert (ids[torch.arange(3), mask.sum(1) - 1] == tok.eos_token_id).all()  # EOS is the last real token
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        c, g, t = model.encode_image(x, "InternVL-C"), model.encode_image(x, "InternVL-G"), model.encode_text(ids)
    assert c.shape == g.shape == (2, 32) and t.shape == (3, 32)
    # G is the sum of two unit vectors: norm in (0, 2]; C and the text embedding are not normalised by the model.
    assert ((g.norm(dim=-1) > 0) & (g.norm(dim=-1) <= 2 + 1e-5)).all()
    assert not torch.allclose(c.norm(dim=-1), torch.ones(2))
    # Text embedding of a padded row equals the unpadded computation (EOS pooling ignores padding).
    one = ids[:1, : int(mask[0].sum())]
    with torch.no_grad():
        assert torch.allclose(model.encode_text(one), t[:1], atol=1e-5)


def test_itc_mask_blocks_queries_and_text_from_each_other(model):
    text_mask = torch.tensor([[1, 1, 0]] * 3)
    m = model.retrieval_attention_mask(text_mask, 3, torch.float32)
    Q, neg = model.num_query_token, torch.finfo(torch.float32).min
    itm, itc = m[0, 0], m[2, 0]
    assert (itm[:, : Q + 2] == 0).all() and (itm[:, Q + 2] == neg).all()  # ITM: all see all but padding
    assert (itc[:Q, :Q] == 0).all() and (itc[:Q, Q:] == neg).all() and (itc[Q:, :Q] == neg).all()
    assert itc[Q, Q + 1] == neg and itc[Q + 1, Q] == 0  # causal text


def test_pos_embedding_interpolation_on_load(tiny_cg):
    m = load_internvl_cg(tiny_cg, dtype="fp32", force_image_size=42)
    assert m.vision_model.embeddings.position_embedding.shape == (1, 10, 64)
    assert m.config.force_image_size == 42
    with torch.no_grad():
        assert m.encode_image(torch.randn(1, 3, 42, 42)).shape == (1, 32)


def test_save_roundtrip(tiny_cg, model, tmp_path):
    out = save_internvl_cg(model, tmp_path / "saved", tokenizer_dir=tiny_cg)
    again = load_internvl_cg(out, dtype="fp32")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert (out / "tokenizer.model").is_file()


def test_lora_checkpoint_is_merged_on_load(tiny_cg, model, tmp_path):
    lora = tmp_path / "lora"
    lora.mkdir()
    cfg = json.loads((tiny_cg / "config.json").read_text())
    cfg["use_backbone_lora"] = 2
    (lora / "config.json").write_text(json.dumps(cfg))
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("vision_model."):
            k = "vision_model.base_model.model." + k[len("vision_model."):]
        state[k] = v.clone()
    base = "vision_model.base_model.model.encoder.layers.0.attn.qkv"
    state[f"{base}.base_layer.weight"] = state.pop(f"{base}.weight")
    a, b = torch.randn(2, 64), torch.randn(192, 2)
    state[f"{base}.lora_A.default.weight"], state[f"{base}.lora_B.default.weight"] = a, b
    save_file(state, str(lora / "model.safetensors"))
    merged = load_internvl_cg(lora, dtype="fp32")
    w = model.vision_model.encoder.layers[0].attn.qkv.weight
    assert torch.allclose(merged.vision_model.encoder.layers[0].attn.qkv.weight, w + 2.0 * b @ a, atol=1e-6)
    assert merged.config.use_backbone_lora == 0


@pytest.mark.parametrize("num_beams", [1, 5])
def test_generation_batched_equals_single(tiny_cg, model, num_beams):
    tok = load_tokenizer(tiny_cg, add_eos_token=False)
    prompts = ["English caption:", "English caption: a", "English caption:"]
    ids, mask = tokenize_prompts(tok, prompts)
    x = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    kw = dict(num_beams=num_beams, max_new_tokens=12, min_new_tokens=4, do_sample=False)
    batched = model.generate(x, ids, mask, **kw)
    for i, p in enumerate(prompts):
        one_ids, one_mask = tokenize_prompts(tok, [p])
        single = model.generate(x[i : i + 1], one_ids, one_mask, **kw)[0]
        row = batched[i][: single.shape[0]]
        assert torch.equal(row, single), (i, row, single)
    assert batched.shape[1] >= 4


@pytest.mark.parametrize("cache_kwarg", ["cache", "past_key_values"])
def test_kv_cache_under_either_name_matches_the_full_forward(model, cache_kwarg):
    """transformers renamed the cache argument (``past_key_values`` -> ``cache``); QLLaMA takes both."""
    qllama = model.qllama
    ids = torch.randint(3, qllama.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    full = qllama(input_ids=ids).logits
    prefill = qllama(input_ids=ids[:, :-1], use_cache=True)
    cache = getattr(prefill, CACHE_FIELD)
    assert cache.get_seq_length() == 6
    step = qllama(input_ids=ids[:, -1:], **{cache_kwarg: cache})
    assert getattr(step, CACHE_FIELD) is cache and cache.get_seq_length() == 7
    assert torch.allclose(step.logits[:, -1], full[:, -1], atol=1e-5)


def test_generation_logs_no_deprecation(tiny_cg, model, caplog):
    logging.Logger.warning_once.cache_clear()  # transformers logs each message once per process
    tok = load_tokenizer(tiny_cg, add_eos_token=False)
    ids, mask = tokenize_prompts(tok, ["English caption:"])
    with caplog.at_level(logging.WARNING):
        model.generate(torch.randn(1, 3, 28, 28), ids, mask, num_beams=2, max_new_tokens=3, do_sample=False)
    assert not [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]


def test_gradient_checkpointing_and_drop_path_train(tiny_cg):
    m = load_internvl_cg(tiny_cg, dtype="fp32", drop_path_rate=0.3)
    rates = [layer.drop_path1.p for layer in m.vision_model.encoder.layers]
    assert rates == pytest.approx([0.0, 0.3])
    m.train()
    from internvl_tune.dist.parallelize import apply_activation_checkpointing

    blocks = [*m.vision_model.encoder.layers, *m.qllama.model.layers]
    assert len(apply_activation_checkpointing(m, blocks, 1.0)) == len(blocks)
    out = m.encode_image(torch.randn(2, 3, 28, 28), "InternVL-G")
    F.normalize(out, dim=-1).sum().backward()
    assert m.query_tokens.grad is not None and m.vision_model.embeddings.patch_embedding.weight.grad is not None
