"""`internvl-tune eval caption` and evaluate.sh end to end on tiny checkpoints, and the captioner adapters."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from caption_fixtures import build_tree

from internvl_tune.cli import main
from internvl_tune.errors import CheckpointError
from internvl_tune.eval.caption import metrics
from internvl_tune.eval.caption.captioners import INTERNVL_CHAT, INTERNVL_G, detect_model_kind, load_captioner
from internvl_tune.eval.caption.datasets import BENCHMARKS, load_images
from internvl_tune.eval.caption.generate import load_image

REPO = Path(__file__).resolve().parents[2]
CHAT_PROMPT = "Provide a one-sentence caption for the provided image."
NUMBER = r"[0-9.e-]+"
METRICS = ", ".join(rf"\('{m}', {NUMBER}\)" for m in metrics.METRIC_NAMES)


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory) -> Path:
    """The bundled sample's caption split when present, else our own tree in the same layout."""
    sample = REPO / "examples" / "sample"
    if (sample / BENCHMARKS["coco"].annotation).is_file():
        return sample
    return build_tree(tmp_path_factory.mktemp("sample") / "data")


@pytest.fixture(scope="module")
def tiny_g(tmp_path_factory) -> Path:
    from internvl_tune.testing.tiny_cg import write_tiny_internvl14b

    return write_tiny_internvl14b(tmp_path_factory.mktemp("ckpt") / "InternVL-14B-224px")


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory) -> Path:
    from internvl_tune.testing.tiny_chat import write_tiny_checkpoint

    return write_tiny_checkpoint("internvl2-1b", tmp_path_factory.mktemp("ckpt") / "InternVL2-1B")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sample_images(root: Path, n: int):
    return [load_image(x.path) for x in load_images(BENCHMARKS["flickr30k"], root)[:n]]


def test_model_kind_comes_from_config_json(tmp_path):
    cases = {
        "g": ({"architectures": ["InternVLModel"], "model_type": "internvl", "qllama_config": {}}, INTERNVL_G),
        "chat": ({"architectures": ["InternVLChatModel"], "llm_config": {}, "vision_config": {}}, INTERNVL_CHAT),
        "native": ({"architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl",
                    "text_config": {}}, INTERNVL_CHAT),
    }
    for name, (config, kind) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        assert detect_model_kind(tmp_path / name) == kind
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(CheckpointError, match="neither an InternVL-14B.*BertModel"):
        detect_model_kind(tmp_path / "bert")
    with pytest.raises(CheckpointError, match="config.json: not found"):
        detect_model_kind(tmp_path / "absent")


def test_missing_java_stops_before_loading_the_model(tiny_chat, monkeypatch, capsys):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    assert main(["eval", "caption", "--model", str(tiny_chat), "--datasets", "coco"]) == 2
    assert "apt-get install default-jre-headless" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", [False, True])
def test_chat_batched_captions_equal_one_by_one(tiny_chat, sample_root, dynamic):
    images = _sample_images(sample_root, 3)  # different aspect ratios: different tile counts with --dynamic
    for beams in (2,) if dynamic else (1, 2):
        captioner, generation = load_captioner(tiny_chat, INTERNVL_CHAT, device="cpu", dtype=torch.float32,
                                               prompt=CHAT_PROMPT, num_beams=beams, max_new_tokens=8,
                                               min_new_tokens=6, dynamic=dynamic, max_num=4)
        assert generation["num_beams"] == (1 if dynamic else beams)  # --dynamic forces one beam, as the reference
        single = [captioner.caption([img])[0] for img in images]
        assert captioner.caption(images) == single
        assert all(single)


@pytest.mark.slow
def test_internvl_g_batched_captions_equal_one_by_one(tiny_g, sample_root):
    images = _sample_images(sample_root, 3)
    for beams in (1, 5):
        captioner, generation = load_captioner(tiny_g, INTERNVL_G, device="cpu", dtype=torch.float32,
                                               prompt="English caption:", num_beams=beams, max_new_tokens=10)
        assert generation["num_beams"] == beams and generation["min_new_tokens"] == 8
        single = [captioner.caption([img])[0] for img in images]
        assert captioner.caption(images) == single


@pytest.mark.slow
def test_evaluate_sh_on_two_processes_prints_the_seed_line(tiny_g, sample_root, tmp_path, needs_java):
    out = tmp_path / "results"
    env = dict(os.environ, GPUS="2", MASTER_PORT=str(_free_port()), PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["sh", str(REPO / "evaluate.sh"), str(tiny_g), "caption-coco", "--data_root",
                           str(sample_root), "--out-dir", str(out), "--batch_size", "2", "--device", "cpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("['coco'")]
    assert len(lines) == 1, proc.stdout
    assert re.fullmatch(rf"\['coco', 'English caption:', {NUMBER}, dict_items\(\[{METRICS}\]\)\]", lines[0])
    # The two ranks' captions, gathered, equal one process captioning every image in one batch.
    (captions_file,) = out.glob("coco_????????????.json")
    written = json.loads(captions_file.read_text())
    items = load_images(BENCHMARKS["coco"], sample_root)
    captioner, _ = load_captioner(tiny_g, INTERNVL_G, device="cpu", dtype=torch.float32, prompt="English caption:")
    expected = captioner.caption([load_image(x.path) for x in items])
    assert written == [{"image_id": x.image_id, "caption": c} for x, c in zip(items, expected)]
    record = json.loads(next(out.glob("coco_*_scores.json")).read_text())
    assert record["world_size"] == 2 and record["generation"]["num_beams"] == 5


@pytest.mark.slow
def test_chat_cli_end_to_end(tiny_chat, sample_root, tmp_path, capsys, needs_java):
    out = tmp_path / "results"
    code = main(["eval", "caption", "--model", str(tiny_chat), "--datasets", "nocaps", "--data_root",
                 str(sample_root), "--out-dir", str(out), "--batch_size", "4", "--max_new_tokens", "10", "--limit", "5"])
    stdout = capsys.readouterr().out
    assert code == 0
    line = rf"\['{re.escape(str(tiny_chat))}', 'nocaps', {NUMBER}, dict_items\(\[{METRICS}\]\)\]"
    assert re.search(line, stdout), stdout
    txt = out / f"{tiny_chat.parent.name}_InternVL2-1B.txt"
    assert re.fullmatch(line + "\n", txt.read_text())
    (scores_file,) = out.glob("nocaps_*_scores.json")
    record = json.loads(scores_file.read_text())
    assert record["prompt"] == CHAT_PROMPT and record["generation"]["num_beams"] == 1
    assert record["generation"]["kind"] == INTERNVL_CHAT and record["generation"]["dtype"] == "float32"
    (captions_file,) = out.glob("nocaps_????????????.json")
    ids = [x.image_id for x in load_images(BENCHMARKS["nocaps"], sample_root)][:5]
    assert [c["image_id"] for c in json.loads(captions_file.read_text())] == ids  # --limit 5: the first five
    assert record["num_images"] == 5
