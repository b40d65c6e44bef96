"""--run_name and the W&B environment variables, read as the transformers Trainer reads them."""

import sys
import types


def _fake_wandb(calls: list):
    module = types.ModuleType("wandb")
    module.init = lambda **kw: calls.append(kw) or types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None)
    return module


def test_wandb_takes_its_project_name_and_folder_from_the_environment(tmp_path, monkeypatch):
    from internvl_tune.train.metrics import MetricsLogger

    calls = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    for var in ("WANDB_PROJECT", "WANDB_NAME", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    MetricsLogger(tmp_path / "run", sinks=("wandb",), run_name="lora-r16").close()
    assert (calls[-1]["project"], calls[-1]["name"], calls[-1]["dir"]) == ("internvl-tune", "lora-r16",
                                                                          str(tmp_path / "run"))
    monkeypatch.setenv("WANDB_PROJECT", "vlm")
    monkeypatch.setenv("WANDB_NAME", "from-env")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    MetricsLogger(tmp_path / "run", sinks=("wandb",), run_name="lora-r16").close()
    assert (calls[-1]["project"], calls[-1]["name"], calls[-1]["dir"]) == ("vlm", "from-env", str(tmp_path / "wandb"))
    MetricsLogger(tmp_path / "other", sinks=("wandb",)).close()  # no --run_name: WANDB_NAME, else the folder
    monkeypatch.delenv("WANDB_NAME")
    MetricsLogger(tmp_path / "other", sinks=("wandb",)).close()
    assert [c["name"] for c in calls[-2:]] == ["from-env", "other"]
