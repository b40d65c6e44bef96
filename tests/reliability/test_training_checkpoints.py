"""Training checkpoints and run outputs on real disks: manifests and damaged files, file modes, full and read-only
disks, re-running a finished run, checkpoints without tokenizer files (issue 20 items 9-12 and 15).

The runs are tiny (``finished_runs`` in conftest.py: 2 steps, a checkpoint after each, the final model); tests copy
them before damaging anything.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from train_helpers import run_chat, train_config

from internvl_tune.dist import DistInfo
from internvl_tune.errors import CheckpointError
from internvl_tune.train.checkpoint import Checkpointer

SRC = Path(__file__).resolve().parents[2] / "src" / "internvl_tune"
RANK0 = "rank00000-of-00001.safetensors"


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / run.name
    shutil.copytree(run, dst)
    return dst


def _flip_a_byte(file: Path) -> None:
    """Change one byte in the middle of a file, keeping its size (what only a checksum can see)."""
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


# ---------------------------------------------------------------------------------------------- item 9: manifests
def test_the_manifest_lists_every_file_with_its_size_and_sha256(finished_runs):
    ckpt = finished_runs["full"] / "checkpoint-2"
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    on_disk = {f.name for f in ckpt.iterdir()} - {"manifest.json"}
    assert set(manifest) == on_disk == {"trainer_state.json", RANK0}
    for name, entry in manifest.items():
        data = (ckpt / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_auto_resume_falls_back_to_the_newest_intact_checkpoint(finished_runs, tiny_1b, sample_meta, tmp_path, capsys):
    run = _copy(finished_runs["full"], tmp_path)
    _flip_a_byte(run / "checkpoint-2" / RANK0)  # same size: only the checksum sees it (truncation: the tests below)
    capsys.readouterr()
    # 3 steps: not the finished run's schedule, so it resumes; constant lr: step 2 is the same step as before
    result = run_chat(train_config(tiny_1b, sample_meta, run, max_steps=3, resume_from_checkpoint="auto"))
    err = capsys.readouterr().err
    assert f"warning: checkpoint-2 is damaged ({run / 'checkpoint-2' / RANK0}" in err
    assert result.steps == 3 and result.losses[0] == finished_runs["full_losses"][1]  # resumed from checkpoint-1
    assert Checkpointer(run, DistInfo()).problems(run / "checkpoint-2") == []  # rewritten when step 2 came again


@pytest.mark.parametrize("damage, fragment", [
    (lambda c: _flip_a_byte(c / RANK0), f"{RANK0}: its content changed since it was written (SHA-256 differs)"),
    (lambda c: _truncate(c / RANK0), f"{RANK0}: "),
    (lambda c: (c / RANK0).unlink(), f"{RANK0} is missing"),
    (lambda c: (c / "manifest.json").write_text("{"), "manifest.json: damaged"),
], ids=["flipped_byte", "truncated", "missing_rank_file", "broken_manifest"])
def test_an_explicit_damaged_checkpoint_is_a_clean_error(finished_runs, tmp_path, damage, fragment):
    ckpt = _copy(finished_runs["full"], tmp_path) / "checkpoint-2"
    damage(ckpt)
    with pytest.raises(CheckpointError, match="the checkpoint is damaged") as info:
        Checkpointer(tmp_path, DistInfo()).resolve(str(ckpt))
    assert fragment in str(info.value)


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(finished_runs, tmp_path):
    run = _copy(finished_runs["full"], tmp_path)
    for n in (1, 2):
        _truncate(run / f"checkpoint-{n}" / RANK0)
    with pytest.raises(CheckpointError, match="every checkpoint in .* is damaged"):
        Checkpointer(run, DistInfo()).resolve("auto")


@pytest.mark.parametrize("command", ["chat", "merge-lora", "convert"])
def test_commands_on_a_damaged_checkpoint_name_the_file(finished_runs, tmp_path, cli, command):
    run = _copy(finished_runs["lora" if command == "merge-lora" else "full"], tmp_path)
    _flip_a_byte(run / "checkpoint-2" / RANK0)
    args = {"chat": ["chat", run / "checkpoint-2", "Hi", "--max-new-tokens", "2"],
            "merge-lora": ["merge-lora", run / "checkpoint-2", "--out", tmp_path / "out"],
            "convert": ["convert", run / "checkpoint-2", tmp_path / "out", "--to", "native"]}[command]
    result = cli(*args)
    assert result.code == 2 and "is damaged" in result.err and f"{RANK0}: its content changed" in result.err
    assert not (tmp_path / "out").exists()


def test_convert_takes_a_full_checkpoint_and_sends_a_lora_one_to_merge_lora(finished_runs, tmp_path, cli):
    from internvl_tune.models.internvl_chat import load_pretrained
    from internvl_tune.models.internvl_chat.training_checkpoint import load_checkpoint_model

    result = cli("convert", finished_runs["full"] / "checkpoint-2", tmp_path / "native", "--to", "native")
    assert result.code == 0, result.err
    converted = dict(load_pretrained(tmp_path / "native", dtype=None).model.named_parameters())
    trained = dict(load_checkpoint_model(finished_runs["full"] / "checkpoint-2").model.named_parameters())
    assert converted.keys() == trained.keys()  # and the trained values, in the base's dtype (--dtype keep)
    assert all(torch.equal(converted[k], trained[k].to(converted[k].dtype)) for k in trained)
    lora = cli("convert", finished_runs["lora"] / "checkpoint-2", tmp_path / "x", "--to", "native")
    assert lora.code == 2 and "merge-lora" in lora.err


def _as_older_version(ckpt: Path) -> None:
    """What checkpoints looked like before manifests and recorded rows."""
    from safetensors.torch import load_file, save_file

    (ckpt / "manifest.json").unlink()
    save_file(load_file(str(ckpt / RANK0)), str(ckpt / RANK0), metadata={"step": "2"})


def test_a_checkpoint_of_an_older_version_still_loads_and_is_verified_by_reading(finished_runs, tmp_path, cli):
    from internvl_tune.models.internvl_chat.training_checkpoint import load_checkpoint_model

    run = _copy(finished_runs["full"], tmp_path)
    for n in (1, 2):
        _as_older_version(run / f"checkpoint-{n}")
    now = load_checkpoint_model(run / "checkpoint-2").model.state_dict()
    before = load_checkpoint_model(finished_runs["full"] / "checkpoint-2").model.state_dict()
    assert all(torch.equal(now[k], before[k]) for k in before)
    assert Checkpointer(run, DistInfo()).resolve("auto") == run / "checkpoint-2"
    _truncate(run / "checkpoint-2" / RANK0)
    assert Checkpointer(run, DistInfo()).resolve("auto") == run / "checkpoint-1"
    result = cli("chat", run / "checkpoint-2", "Hi", "--max-new-tokens", "2")
    assert result.code == 2 and f"{RANK0}: file is truncated" in result.err


def test_the_trainer_reaches_models_only_through_the_recipe():
    """``train/`` and ``dist/`` never import a model family (issue 23: the checkpoint-as-model loader moved to
    models/internvl_chat); the library never imports the application."""
    def imports(folder):
        for file in (SRC / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    yield file.relative_to(SRC), node.module

    family = [(f, m) for d in ("train", "dist") for f, m in imports(d)
              if m.startswith(("internvl_tune.models.internvl_chat", "internvl_tune.models.internvl_cg"))]
    upward = [(f, m) for d in ("models", "data", "eval") for f, m in imports(d)
              if m.split(".")[1:2] and m.split(".")[1] in ("train", "dist", "cli", "bench", "testing")]
    assert family == [] and upward == []


# ---------------------------------------------------------------------------------------------- item 11: modes
def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_run_outputs_honour_the_umask(finished_runs):
    """The runs were made under umask 022: checkpoints, the final model and the adapter are readable by all."""
    for run in (finished_runs["full"], finished_runs["lora"]):
        modes = _modes(run)
        wrong = {k: oct(v) for k, v in modes.items() if v != (0o755 if (run / k).is_dir() else 0o644)}
        assert wrong == {}
    assert (finished_runs["full"] / "model.safetensors").is_file()
    assert (finished_runs["lora"] / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("command", ["merge-lora", "convert"])
def test_merged_and_converted_models_honour_the_umask(finished_runs, tmp_path, cli, command):
    args = {"merge-lora": ["merge-lora", finished_runs["lora"] / "adapter", "--out", tmp_path / "out"],
            "convert": ["convert", finished_runs["full"], tmp_path / "out", "--to", "native"]}[command]
    old = os.umask(0o027)
    try:
        assert cli(*args).code == 0
    finally:
        os.umask(old)
    modes = _modes(tmp_path / "out")
    assert {oct(v) for k, v in modes.items() if (tmp_path / "out" / k).is_dir()} == {"0o750"}
    assert {oct(v) for k, v in modes.items() if (tmp_path / "out" / k).is_file()} == {"0o640"}


# ---------------------------------------------------------------------------------------------- item 10: disks
def test_convert_into_a_read_only_place_is_one_line_with_its_own_exit_status(finished_runs, read_only_dir, cli):
    result = cli("convert", finished_runs["full"], read_only_dir / "out", "--to", "native")
    assert result.code == 74, result
    assert result.err.startswith(f"error: cannot write the model files to {read_only_dir / 'out'}: ")
    assert ("read-only" in result.err or "permission denied" in result.err) and "free there" in result.err
    assert result.err.count("error:") == 1


def test_training_into_a_read_only_place_stops_before_loading(tiny_1b, sample_meta, read_only_dir):
    from internvl_tune.errors import StorageError

    with pytest.raises(StorageError, match=r"cannot write the run's files to .*read-only.*: (the file system is "
                                           r"read-only|permission denied)"):
        run_chat(train_config(tiny_1b, sample_meta, read_only_dir / "run"))


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one(tiny_1b, sample_meta, tmp_path, monkeypatch):
    """A fake ENOSPC from the writer at the second save: one line with what, where, bytes needed and free, the
    partial folder gone, checkpoint-1 intact and still what ``auto`` resumes from."""
    import errno

    import internvl_tune.train.checkpoint as ck_module
    from internvl_tune.errors import StorageError

    real, calls = ck_module.save_safetensors, []

    def full_at_the_second(tensors, path, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, **kw)

    monkeypatch.setattr(ck_module, "save_safetensors", full_at_the_second)
    with pytest.raises(StorageError) as info:
        run_chat(train_config(tiny_1b, sample_meta, tmp_path / "run"))
    text = str(info.value)
    assert text.startswith(f"cannot write checkpoint-2 to {tmp_path / 'run' / 'checkpoint-2.partial'}: the disk is "
                           "full (needs ")
    assert "free there)" in text and "checkpoint-1 is intact" in text and "\n" not in text
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]
    assert Checkpointer(tmp_path / "run", DistInfo()).resolve("auto").name == "checkpoint-1"


def test_a_full_disk_at_the_export_leaves_no_half_model_and_the_rerun_finishes(tiny_1b, sample_meta, tmp_path,
                                                                              monkeypatch):
    import errno

    import internvl_tune.models.common.weights as weights
    from internvl_tune.errors import StorageError

    def disk_full(tensors, path, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(weights, "save_safetensors", disk_full)  # the final model's shards only
        with pytest.raises(StorageError) as info:
            run_chat(train_config(tiny_1b, sample_meta, out, max_steps=1))
    assert str(info.value).startswith(f"cannot write the model files to {out / '.final-model.tmp'}: the disk is full")
    assert str(info.value).endswith("then run again with --resume_from_checkpoint auto: it resumes from checkpoint-1 "
                                    "and writes the final model")
    left = {p.name for p in out.iterdir()}
    assert "checkpoint-1" in left and "config.json" not in left  # no config pointing at missing weights
    assert not [n for n in left if n.endswith(".safetensors") or n.startswith(".")]  # no shard, no temporary folder
    assert not json.loads((out / "train_results.json").read_text())["finished"]
    run_chat(train_config(tiny_1b, sample_meta, out, max_steps=1, resume_from_checkpoint="auto"))
    assert (out / "model.safetensors").is_file() and json.loads((out / "train_results.json").read_text())["finished"]


# ---------------------------------------------------------------------------------------------- item 12: finished
def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_rerunning_a_finished_run_changes_nothing(finished_runs, tiny_1b, sample_meta, tmp_path, capsys):
    run = _copy(finished_runs["full"], tmp_path)
    before = _snapshot(run)
    capsys.readouterr()
    result = run_chat(train_config(tiny_1b, sample_meta, run, resume_from_checkpoint="auto"))
    out = capsys.readouterr().out
    assert result.already_finished and result.exit_status == 0 and result.steps == 2
    assert f"{run}: already finished at step 2; nothing was changed" in out
    assert _snapshot(run) == before


# ---------------------------------------------------------------------------------------------- item 15: tokenizers
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "special_tokens_map.json")


@pytest.mark.parametrize("like, keep, fragment", [
    ("internvl2-1b", (), "the qwen2 tokenizer needs vocab.json and merges.txt, or tokenizer.json; none of them"),
    ("internvl2-1b", ("vocab.json",), "the qwen2 tokenizer needs vocab.json and merges.txt, or tokenizer.json; "
                                      "missing: merges.txt"),
    ("internvl2-2b", ("tokenizer_config.json",), "the internlm2 tokenizer needs tokenizer.model; none of them"),
    ("internvl3-9b", (), "the internlm3 tokenizer needs tokenizer.model; none of them"),
    ("internvl2-4b", ("tokenizer_config.json",), "the phi3 tokenizer needs tokenizer.model, or tokenizer.json; none of "
                                                 "them"),
    ("internvl2-76b", (), "the llama tokenizer needs tokenizer.model, or tokenizer.json; none of them"),
], ids=["qwen2", "qwen2_no_merges", "internlm2", "internlm3", "phi3", "llama3"])
def test_a_checkpoint_without_tokenizer_files_names_them(tmp_path, cli, like, keep, fragment):
    from internvl_tune.testing.tiny_chat import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(like, tmp_path / like)
    for name in TOKENIZER_FILES:
        if name not in keep:
            (ckpt / name).unlink(missing_ok=True)
    result = cli("chat", ckpt, "Hi", "--max-new-tokens", "2")
    assert result.code == 2 and f"{ckpt}: {fragment}" in result.err, result.err
    assert "copy the tokenizer files of the base model" in result.err
