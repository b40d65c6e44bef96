"""``internvl-tune export --check DIR``: the checklist of what vLLM, LMDeploy, SGLang and transformers need."""

import json
import shutil
from pathlib import Path

import pytest

from internvl_tune.cli import main
from internvl_tune.models.internvl_chat.serving import check_folder

# remote code written here (stand-ins for a release's files): the checker follows auto_map and relative imports
CONFIG_PY = "from .configuration_intern_vit import InternVisionConfig\nclass InternVLChatConfig: pass\n"
VIT_CONFIG_PY = "class InternVisionConfig: pass\n"
MODELING_PY = "from .configuration_internvl_chat import InternVLChatConfig\nfrom .modeling_intern_vit import X\n"
# an InternVL2 release's string-content chat template (vLLM inserts <image> into the text itself)
STRING_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def original(tiny_dirs, tmp_path_factory):
    return tiny_dirs("internvl2-1b")


@pytest.fixture(scope="module")
def native(original, tmp_path_factory):
    out = tmp_path_factory.mktemp("native") / "hf"
    assert main(["convert", str(original), str(out), "--to", "native"]) == 0
    return out


def _failing(report, server):
    return sorted(c.what for c in report.failed([server]))


def test_a_release_copy_without_its_remote_code_is_not_servable(original, capsys):
    report = check_folder(original)
    assert _failing(report, "vllm") == ["chat template puts an image as <image>", "remote code for AutoConfig"]
    assert _failing(report, "lmdeploy") == ["remote code for AutoConfig + AutoModel"]
    assert main(["export", "--check", str(original), "--server", "vllm"]) == 1
    out = capsys.readouterr().out
    assert "FAIL remote code for AutoConfig [vLLM, SGLang]: missing configuration_internvl_chat.py" in out
    assert "vLLM: NOT ready" in out


def test_with_its_remote_code_and_template_the_original_layout_is_ready(original, tmp_path, capsys):
    folder = tmp_path / "orig"
    shutil.copytree(original, folder)
    for name, text in (("configuration_internvl_chat.py", CONFIG_PY), ("configuration_intern_vit.py", VIT_CONFIG_PY),
                       ("modeling_internvl_chat.py", MODELING_PY)):
        (folder / name).write_text(text)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": STRING_TEMPLATE}))
    report = check_folder(folder)
    assert _failing(report, "vllm") == [] and _failing(report, "sglang") == []
    assert _failing(report, "lmdeploy") == ["remote code for AutoConfig + AutoModel"]
    assert any("missing modeling_intern_vit.py" in c.detail for c in report.failed(["lmdeploy"]))  # an import of it
    (folder / "modeling_intern_vit.py").write_text("X = 1\n")
    assert main(["export", "--check", str(folder), "--server", "vllm,lmdeploy"]) == 0
    assert "vLLM: ready" in capsys.readouterr().out


def test_the_native_layout_serves_in_vllm_lmdeploy_and_transformers_not_sglang(native):
    report = check_folder(native)
    for server in ("vllm", "lmdeploy", "transformers"):
        assert _failing(report, server) == [], server
    assert _failing(report, "sglang") == ["architecture InternVLForConditionalGeneration registered"]
    assert main(["export", "--check", str(native), "--server", "vllm,lmdeploy"]) == 0


def test_a_native_folder_whose_template_puts_image_tokens_wrong_fails(native, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(native, folder)
    (folder / "chat_template.jinja").write_text(STRING_TEMPLATE.replace("message['content']", "'<image>'"))
    (folder / "processor_config.json").unlink()
    failing = _failing(check_folder(folder), "vllm")
    assert failing == ["chat template puts an image as <IMG_CONTEXT>", "transformers processor files"]


def test_not_a_model_folder_and_an_unknown_server_are_errors(tmp_path, native, capsys):
    assert main(["export", "--check", str(tmp_path)]) == 2
    assert "no readable config.json" in capsys.readouterr().err
    assert main(["export", "--check", str(native), "--server", "tgi"]) == 2
    assert "unknown tgi" in capsys.readouterr().err


def _release(tiny, folder):
    """A tiny original-layout checkpoint as a release ships it: with its remote code (stand-ins here)."""
    shutil.copytree(tiny, folder)
    for name, text in (("configuration_internvl_chat.py", CONFIG_PY), ("configuration_intern_vit.py", VIT_CONFIG_PY),
                       ("modeling_internvl_chat.py", MODELING_PY), ("modeling_intern_vit.py", "X = 1\n")):
        (folder / name).write_text(text)
    return folder


def _train(base, out, meta):
    assert main(["train", "--model_name_or_path", str(base), "--meta_path", str(meta), "--output_dir", str(out),
                 "--max_steps", "1", "--use_llm_lora", "4", "--device", "cpu", "--report_to", "none",
                 "--dataloader_num_workers", "0", "--grad_checkpoint", "False", "--max_dynamic_patch", "2"]) == 0
    return out


@pytest.mark.slow
def test_every_export_folder_is_ready_for_vllm_and_lmdeploy(original, tmp_path, capsys):
    """convert (both ways), merge-lora and a training run's output, from an original release and from its -hf
    copy: each folder passes export --check for vLLM and LMDeploy (an -hf source's original layout needs the
    release's remote code: --remote_code)."""
    meta = tmp_path / "meta.json"
    sample = Path(__file__).resolve().parents[2] / "examples" / "sample"
    lines = (sample / "image.jsonl").read_text().splitlines()[:2]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    meta.write_text(json.dumps({"d": {"root": str(sample / "images"), "annotation": str(tmp_path / "d.jsonl")}}))
    release = _release(original, tmp_path / "InternVL2-1B")
    hf = tmp_path / "InternVL2-1B-hf"
    assert main(["convert", str(release), str(hf), "--to", "native"]) == 0
    assert main(["convert", str(release), str(tmp_path / "orig"), "--to", "original"]) == 0
    assert main(["convert", str(hf), str(tmp_path / "orig-from-hf"), "--to", "original", "--remote_code",
                 str(release)]) == 0
    run = _train(release, tmp_path / "run", meta)
    run_hf = _train(hf, tmp_path / "run-hf", meta)
    assert main(["merge-lora", str(run / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    folders = [hf, tmp_path / "orig", tmp_path / "orig-from-hf", run, run_hf, tmp_path / "merged"]
    capsys.readouterr()
    for folder in folders:
        assert main(["export", "--check", str(folder), "--server", "vllm,lmdeploy"]) == 0, capsys.readouterr().out
    assert json.loads((run_hf / "config.json").read_text())["architectures"] == ["InternVLForConditionalGeneration"]
