"""chat / merge-lora / convert with LoRA adapters: the recorded base, --base, run directories, clear errors."""

from __future__ import annotations

import json
import shutil

import torch

from internvl_tune.cli import main
from internvl_tune.models.internvl_chat import load_pretrained
from internvl_tune.models.internvl_chat.lora import add_lora, save_adapter


def _lora_run(base, run_dir):
    """A LoRA run's output directory holding adapter/ only (--merge_lora False); returns the trained model."""
    chat = load_pretrained(base)
    chat.model.model.vision_tower.requires_grad_(False)  # --freeze_backbone
    chat.model.model.multi_modal_projector.requires_grad_(False)  # --freeze_mlp
    add_lora(chat, llm_rank=2)
    chat.model.lm_head.weight.requires_grad_(True)  # --unfreeze_lm_head
    with torch.no_grad():
        for name, p in chat.model.named_parameters():
            if "lora_B" in name or name == "lm_head.weight":
                p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    save_adapter(chat, run_dir / "adapter", base=base)
    return chat


def test_chat_with_an_adapter_or_a_run_dir(tiny_dirs, tmp_path, capsys):
    chat = _lora_run(tiny_dirs("internvl2-1b"), tmp_path / "run")
    expected = chat.chat(question="Hi there", max_new_tokens=5)
    capsys.readouterr()
    for model in (tmp_path / "run" / "adapter", tmp_path / "run"):
        assert main(["chat", str(model), "Hi there", "--max_new_tokens", "5", "--device", "cpu"]) == 0
        assert capsys.readouterr().out.strip() == expected


def test_a_moved_base_needs_base(tiny_dirs, tmp_path, capsys):
    base = tmp_path / "InternVL2-1B"
    shutil.copytree(tiny_dirs("internvl2-1b"), base)
    chat = _lora_run(base, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(base.resolve())
    assert main(["merge-lora", str(tmp_path / "run"), "--out", str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    torch.testing.assert_close(load_pretrained(tmp_path / "merged").model.lm_head.weight, chat.model.lm_head.weight)

    base.rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["chat", str(tmp_path / "run"), "Hi", "--max_new_tokens", "2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"the base model recorded in base_model_name_or_path, '{base.resolve()}', is not a directory" in err
    assert "adapter_config.json" in err and "--base PATH" in err
    assert main(["chat", str(tmp_path / "run"), "Hi", "--max_new_tokens", "2", "--device", "cpu",
                 "--base", str(tmp_path / "moved")]) == 0
    assert main(["merge-lora", str(tmp_path / "run"), "--out", str(tmp_path / "m2")]) == 2
    assert "--base PATH" in capsys.readouterr().err


def test_base_flag_without_an_adapter(tiny_dirs, capsys):
    base = tiny_dirs("internvl2-1b")
    assert main(["chat", str(base), "Hi", "--base", str(base)]) == 2
    assert "--base is for LoRA adapters" in capsys.readouterr().err


def test_convert_an_adapter(tiny_dirs, tmp_path, capsys):
    _lora_run(tiny_dirs("internvl2-2b"), tmp_path / "run")
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "orig"), "--to", "original"]) == 0
    config = json.loads((tmp_path / "orig" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["language_model.output"] and "attention\\.wqkv" in config["target_modules"]
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "x"), "--to", "original", "--dtype", "float32"]) == 2
    assert "--dtype applies to checkpoints" in capsys.readouterr().err


def test_auto_peft_model_loads_an_adapter_whose_base_transformers_reads(tiny_dirs, tmp_path):
    """peft's AutoPeftModel builds the recorded base through transformers (auto_mapping, task_type null): with an
    -hf base directly; with an original-layout base once `convert --to native --base HF` records the -hf copy. Its
    logits are those of internvl-tune's model with the adapter."""
    from peft import AutoPeftModel

    hf = tmp_path / "InternVL2-1B-hf"
    assert main(["convert", str(tiny_dirs("internvl2-1b")), str(hf), "--to", "native"]) == 0
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    for base, run in ((hf, tmp_path / "run-hf"), (tiny_dirs("internvl2-1b"), tmp_path / "run-orig")):
        chat = _lora_run(base, run)
        adapter = run / "adapter"
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["task_type"] is None and config["auto_mapping"]["base_model_class"] == \
            "InternVLForConditionalGeneration"
        if base != hf:
            assert main(["convert", str(adapter), str(run / "adapter-hf"), "--to", "native", "--base", str(hf)]) == 0
            adapter = run / "adapter-hf"
        model = AutoPeftModel.from_pretrained(str(adapter), dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, chat.model(input_ids=ids).logits)


def test_an_adapter_for_vllm_with_whole_trained_parts_warns_and_merge_splits_it(tiny_dirs, tmp_path, capsys):
    """vLLM's LoRA ignores modules_to_save: --to original says so; --merge writes the base with those parts in (a
    folder vLLM loads) and the LoRA matrices alone, recording that base."""
    from safetensors.torch import load_file

    from internvl_tune.models.internvl_chat.loading import iter_tensors

    base = tmp_path / "InternVL2-1B"
    shutil.copytree(tiny_dirs("internvl2-1b"), base)
    (base / "configuration_internvl_chat.py").write_text("class InternVLChatConfig: pass\n")  # stand-in remote code
    (base / "modeling_internvl_chat.py").write_text("class InternVLChatModel: pass\n")
    chat = _lora_run(base, tmp_path / "run")  # LoRA in the LLM and a trained lm_head (modules_to_save)
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "plain"), "--to", "original"]) == 0
    assert "vLLM's LoRA ignores them" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "split"), "--to", "original", "--merge"]) == 0
    served = {k: t for k, t, _ in iter_tensors(tmp_path / "split" / "base")}
    original = {k: t for k, t, _ in iter_tensors(base)}
    head = "language_model.lm_head.weight"
    assert torch.equal(served[head], chat.model.lm_head.weight.detach().to(served[head].dtype))
    assert not torch.equal(served[head], original[head])
    assert all(torch.equal(served[k], original[k]) for k in original if k != head)  # LoRA layers are not folded in
    config = json.loads((tmp_path / "split" / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None
    assert config["base_model_name_or_path"] == str((tmp_path / "split" / "base").resolve())
    plain = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    lora_only = load_file(str(tmp_path / "split" / "adapter" / "adapter_model.safetensors"))
    assert lora_only.keys() == {k for k in plain if ".lora_" in k} and all(torch.equal(v, plain[k])
                                                                          for k, v in lora_only.items())
    assert main(["export", "--check", str(tmp_path / "split" / "base"), "--server", "vllm"]) == 0
