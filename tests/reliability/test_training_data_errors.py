"""Training meets bad data as `data check` does (issue 20): the same one-line `file:line: ... — fix` with any number of
data-loader workers, never a worker traceback; an empty dataset is an error, not a ValueError; a skipping policy
(`--max_skipped_samples`) counted over workers and ranks and written to train.log, train_results.json and
skipped_samples.jsonl; a resumed run meets the same skips at the same steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample"


def turns(question="<image>\nWhat is this?", answer="A cat."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


GOOD = {"image": "chelsea.jpg", "conversations": turns()}
BAD = {  # one of each family: a media file, a line, a placeholder rule, JSON syntax
    "missing_image": {"image": "gone.jpg", "conversations": turns()},
    "corrupt_image": {"image": "truncated.jpg", "conversations": turns()},
    "unknown_role": {"image": "chelsea.jpg", "conversations": [{"from": "user", "value": "Hi"},
                                                                 {"from": "gpt", "value": "Hello"}]},
    "placeholder_count": {"image": ["chelsea.jpg", "coffee.jpg"], "conversations": turns()},
    "bad_json": '{"image": "chelsea.jpg", "conversations": [',
}


def write_data(folder: Path, rows: list) -> Path:
    """d.jsonl of ``rows`` (dicts or raw lines) over the sample's photos plus a truncated JPEG; returns the meta."""
    images = folder / "images"
    shutil.copytree(SAMPLE / "images", images, dirs_exist_ok=True)
    data = (images / "coffee.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "d.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    meta = folder / "meta.json"
    meta.write_text(json.dumps({"d": {"root": str(images), "annotation": str(folder / "d.jsonl")}}))
    return meta


def train(cli, ckpt, meta, out, *extra):
    return cli("train", "--model_name_or_path", ckpt, "--meta_path", meta, "--output_dir", out, "--report_to", "none",
               "--save_strategy", "no", "--group_by_length", "False", "--learning_rate", "1e-3", *extra)


def check_errors(cli, meta, ckpt) -> list[str]:
    """The error lines `data check` prints (without the leading "error ")."""
    result = cli("data", "check", meta, "--model_name_or_path", ckpt, "--max_errors", "100")
    return [line[len("error "):] for line in _lines(result.out) if line.startswith("error ")]


def error_line(result) -> str:
    """The CLI's one-line error (other libraries may have written to stderr before it)."""
    return result.err[result.err.index("error: "):]


def _lines(out: str) -> list[str]:
    """cli() joins the output into one line; split it back at each "error " / "warning " report."""
    import re

    return [m.strip() for m in re.split(r"(?=\berror /|\bwarning /|\bproblems found: |\bclean: )", out) if m.strip()]


@pytest.fixture
def no_export(monkeypatch):
    """Writing the final model is not what these tests are about, and it is the slow part of a tiny run."""
    from internvl_tune.train.trainer import Trainer

    monkeypatch.setattr(Trainer, "export", lambda self: self.output_dir)


def test_a_meta_json_without_samples_stops_training_with_the_data_check_error(tmp_path, cli, tiny_checkpoints):
    meta = write_data(tmp_path, [GOOD])
    (tmp_path / "d.jsonl").write_text("\n\n")  # blank lines only
    ckpt = tiny_checkpoints["internvl2-2b"]
    (expected,) = check_errors(cli, meta, ckpt)
    result = train(cli, ckpt, meta, tmp_path / "run")
    assert result.code == 2 and error_line(result) == f"error: {expected}"
    assert expected.startswith(f"{meta}:1: the meta JSON gives no samples: dataset 'd' has 0 line(s)")


META_MISTAKES = {  # what the meta JSON holds -> the start of the error line (META: the meta file, D: the data folder)
    "invalid_json": ('{"d": {"root": "ROOT", "annotation": "ANN",}}', "META:1: invalid JSON: Expecting property name"),
    "duplicate_name": ('{"d": {"root": "ROOT", "annotation": "ANN"},\n "d": {"root": "ROOT", "annotation": "ANN"}}',
                       "META:2: dataset name 'd' is given twice (also at line 1)"),
    "missing_annotation": ('{"d": {"root": "ROOT", "annotation": "D/gone.jsonl"}}',
                           "META:1: dataset 'd': annotation file not found: D/gone.jsonl"),
    "annotation_is_a_folder": ('{"d": {"root": "ROOT", "annotation": "D/images.jsonl"}}',
                               "META:1: dataset 'd': annotation D/images.jsonl is a folder without state.json"),
    "root_not_a_string": ('{"d": {"root": 3, "annotation": "ANN"}}', "META:1: dataset 'd': `root` is missing"),
}


@pytest.mark.parametrize("where", ["meta_path", "eval_meta_path", "parts"])
@pytest.mark.parametrize("case", list(META_MISTAKES))
def test_a_bad_meta_json_is_reported_before_any_weight_is_read(tmp_path, cli, tiny_checkpoints, monkeypatch, case,
                                                               where):
    """The meta JSON was first read after the model had loaded (minutes for a real one): its mistakes now come first,
    before any weight is read, for --meta_path, --eval_meta_path and a model built from parts."""
    from internvl_tune.models.internvl_chat import assemble, chat

    def no_weights(*args, **kwargs):
        raise RuntimeError("the model was loaded before the meta JSON was checked")

    monkeypatch.setattr(chat, "load_pretrained", no_weights)
    monkeypatch.setattr(assemble, "save_model_from_parts", no_weights)
    good = write_data(tmp_path, [GOOD])
    (tmp_path / "images.jsonl").mkdir()
    text, expected = META_MISTAKES[case]
    bad = tmp_path / "bad.json"
    bad.write_text(text.replace("ROOT", str(tmp_path / "images")).replace("ANN", str(tmp_path / "d.jsonl"))
                   .replace("D/", f"{tmp_path}/"))
    expected = expected.replace("META", str(bad)).replace("D/", f"{tmp_path}/")
    ckpt = tiny_checkpoints["internvl2-2b"]
    model = ["--model_name_or_path", ckpt] if where != "parts" else ["--vision_path", ckpt, "--llm_path", ckpt]
    data = ["--meta_path", good, "--eval_meta_path", bad] if where == "eval_meta_path" else ["--meta_path", bad]
    result = cli("train", *model, *data, "--output_dir", tmp_path / "run", "--report_to", "none")
    assert result.code == 2 and error_line(result).startswith(f"error: {expected}"), result.err


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_sample_stops_training_with_the_data_check_line(tmp_path, cli, tiny_checkpoints, no_export, case):
    ckpt = tiny_checkpoints["internvl2-2b"]
    meta = write_data(tmp_path, [GOOD, BAD[case], GOOD, GOOD])
    (expected,) = check_errors(cli, meta, ckpt)
    assert expected.startswith(f"{tmp_path / 'd.jsonl'}:2: ")
    result = train(cli, ckpt, meta, tmp_path / "run", "--dataloader_num_workers", "0", "--per_device_train_batch_size", "4")
    assert result.code == 2 and error_line(result).startswith(f"error: {expected} [")
    assert "--max_skipped_samples N" in result.err and "internvl-tune data check" in result.err
    record = json.loads((tmp_path / "run" / "skipped_samples.jsonl").read_text())  # written down even so
    assert record["where"] == f"{tmp_path / 'd.jsonl'}:2" and record["sample_id"] == "d:2"
    assert f"step 1: error: {expected}" in (tmp_path / "run" / "train.log").read_text()


def test_data_loader_workers_give_the_same_line_as_no_workers(tmp_path, cli, tiny_checkpoints, no_export):
    """Issue 20.6: with the default 2 workers the run used to end in "Caught DataError in DataLoader worker process
    0", the worker's traceback and exit 2 after ten "skipping" lines. The 2-worker runs are real processes (the
    console script), as a user starts them."""
    import subprocess
    import sys

    ckpt = tiny_checkpoints["internvl2-2b"]
    meta = write_data(tmp_path, [GOOD, BAD["missing_image"], GOOD, BAD["unknown_role"], GOOD, GOOD])
    expected = check_errors(cli, meta, ckpt)
    args = ["--model_name_or_path", ckpt, "--meta_path", meta, "--report_to", "none", "--save_strategy", "no",
            "--group_by_length", "False", "--per_device_train_batch_size", "6", "--max_steps", "1"]
    in_process = train(cli, ckpt, meta, tmp_path / "w0", "--dataloader_num_workers", "0",
                       "--per_device_train_batch_size", "6", "--max_steps", "1")
    runs = [subprocess.run([sys.executable, "-m", "internvl_tune.cli", "train", *map(str, args), "--output_dir",
                            str(tmp_path / name), *extra], capture_output=True, text=True, timeout=600)
            for name, extra in (("w2", []), ("w2_skip", ["--max_skipped_samples", "2"]))]
    stopped, skipping = runs
    assert stopped.returncode == 2 and "Traceback" not in stopped.stderr and "DataLoader worker" not in stopped.stderr
    assert stopped.stderr.splitlines()[-1] == error_line(in_process) and error_line(in_process).split(" [")[0][7:] in expected
    assert skipping.returncode == 0 and "Traceback" not in skipping.stderr
    records = [json.loads(x) for x in (tmp_path / "w2_skip" / "skipped_samples.jsonl").read_text().splitlines()]
    assert sorted(f"{r['where']}: {r['reason']} — {r['fix']}" for r in records) == sorted(expected)


def test_a_truncated_sample_is_counted_and_named(tmp_path, cli, tiny_checkpoints, no_export):
    """Samples cut to --max_seq_length were trained on silently; now counted over the default two data-loader
    workers (train_results.json, train.log, the closing lines) and named with `data check`'s warning line."""
    ckpt = tiny_checkpoints["internvl2-2b"]
    long = {"image": "chelsea.jpg", "conversations": turns(answer="A cat sitting on a chair. " * 60)}
    meta = write_data(tmp_path, [GOOD, GOOD, long, GOOD])
    limit = "400"
    checked = cli("data", "check", meta, "--model_name_or_path", ckpt, "--max_seq_length", limit)
    warnings = [line[len("warning "):] for line in _lines(checked.out) if "truncated from" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"{tmp_path / 'd.jsonl'}:3: truncated from ")
    named = warnings[0].split(" — ")[0]  # file:line: truncated from N to 400 tokens
    assert named.endswith(f"to {limit} tokens")
    run = tmp_path / "run"
    result = train(cli, ckpt, meta, run, "--max_seq_length", limit, "--per_device_train_batch_size", "4",
                   "--max_steps", "1")
    assert result.code == 0, result.err
    assert json.loads((run / "train_results.json").read_text())["truncated_samples"] == 1
    log = " ".join((run / "train.log").read_text().split())
    assert f"samples longer than --max_seq_length {limit}: their tail is cut" in log
    assert f"notice: step 1: sample d:3 cut to --max_seq_length, its tail is not trained on: {named}" in log
    # the console (wrapped at its width, which a long temporary path may cross: compared without whitespace)
    assert f"truncated samples: 1 cut to --max_seq_length {limit}" in log
    assert "".join(named.split()) in "".join(result.err.split())


def test_truncations_are_counted_the_first_few_named_and_resumed(tmp_path):
    """The ledger counts every truncated training sample, names the first five only, leaves validation batches out,
    and a resumed run goes on from the checkpoint's counts (one more named sample would be a sixth notice)."""
    from internvl_tune.data.dataset import Truncation
    from internvl_tune.data.loading import Loaded
    from internvl_tune.dist import DistInfo
    from internvl_tune.train.skips import SkipLedger

    cuts = [Truncation(f"d:{n}", f"d.jsonl:{n}", 500 + n, 400) for n in range(1, 8)]
    said: list[str] = []
    ledger = SkipLedger("0", tmp_path, DistInfo())
    ledger.say = said.append
    ledger.take([Loaded("b1", [], 4, None, tuple(cuts[:3]))], 1)
    ledger.take([Loaded("v", [], 4, None, tuple(cuts[3:4]))], 1, "validation")  # not a trained sample
    assert ledger.take([Loaded("b2", [], 4, None, tuple(cuts[4:7]))], 2) == ["b2"]
    assert ledger.truncated == 6 and len(said) == 6
    assert said[0] == "notice: step 1: sample d:1 cut to --max_seq_length, its tail is not trained on: " \
                      "d.jsonl:1: truncated from 501 to 400 tokens"
    assert [line.split()[4] for line in said[:5]] == ["d:1", "d:2", "d:3", "d:5", "d:6"]
    assert said[5].startswith("further truncated samples are only counted")
    resumed = SkipLedger("0", tmp_path, DistInfo(), resume_step=2, state=ledger.state())
    resumed.say = said.append
    resumed.take([Loaded("b3", [], 4, None, tuple(cuts[:1]))], 3)
    assert resumed.truncated == 7 and len(said) == 6


def test_skipped_samples_are_counted_listed_and_held_to_the_limit(tmp_path, cli, tiny_checkpoints, no_export):
    ckpt = tiny_checkpoints["internvl2-2b"]
    rows = [GOOD, BAD["missing_image"], GOOD, BAD["unknown_role"], GOOD, GOOD]
    meta = write_data(tmp_path, rows)
    expected = {line.split(": ", 1)[0]: line for line in check_errors(cli, meta, ckpt)}
    assert len(expected) == 2
    run = tmp_path / "run"
    ok = train(cli, ckpt, meta, run, "--max_skipped_samples", "2", "--per_device_train_batch_size", "2")
    assert ok.code == 0, ok.err
    records = [json.loads(x) for x in (run / "skipped_samples.jsonl").read_text().splitlines()]
    assert sorted(r["sample_id"] for r in records) == ["d:2", "d:4"] and {r["split"] for r in records} == {"train"}
    for r in records:  # the same words as data check
        assert f"{r['where']}: {r['reason']} — {r['fix']}" == expected[r["where"]]
    assert json.loads((run / "train_results.json").read_text())["skipped_samples"] == 2
    log = (run / "train.log").read_text()
    assert "unusable samples: skipped (replaced by the next usable one), at most 2 (--max_skipped_samples 2)" in log
    assert all(f"skipped train sample {r['sample_id']}" in log and expected[r["where"]] in log for r in records)

    over = train(cli, ckpt, meta, tmp_path / "over", "--max_skipped_samples", "1", "--per_device_train_batch_size", "2")
    assert over.code == 2 and "2 samples could not be used, more than --max_skipped_samples 1 allows" in over.err
    assert f"listed in {tmp_path / 'over' / 'skipped_samples.jsonl'}" in over.err

    wrong = train(cli, ckpt, meta, tmp_path / "wrong", "--max_skipped_samples", "1.5")
    assert wrong.code == 2 and "--max_skipped_samples '1.5': give a count" in wrong.err


@pytest.mark.slow
def test_a_resumed_run_meets_the_same_skips_and_losses(tmp_path, cli, tiny_checkpoints, no_export):
    ckpt = tiny_checkpoints["internvl2-2b"]
    rows = [GOOD, BAD["missing_image"], GOOD, BAD["unknown_role"], GOOD, BAD["bad_json"], GOOD, BAD["corrupt_image"]]
    meta = write_data(tmp_path, rows)
    flags = ["--max_skipped_samples", "10", "--per_device_train_batch_size", "2", "--save_strategy", "steps",
             "--save_steps", "2", "--max_steps", "4"]
    full = tmp_path / "full"
    assert train(cli, ckpt, meta, full, *flags).code == 0
    records = (full / "skipped_samples.jsonl").read_text().splitlines()
    assert {json.loads(r)["step"] <= 2 for r in records} == {True, False}  # skips on both sides of the resume
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("checkpoint-4"))
    assert train(cli, ckpt, meta, resumed, *flags, "--resume_from_checkpoint", "auto").code == 0

    def losses(run):
        return [row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in row]

    assert losses(resumed) == losses(full) and len(losses(full)) == 4
    assert (resumed / "skipped_samples.jsonl").read_text().splitlines() == records
    results = [json.loads((run / "train_results.json").read_text()) for run in (full, resumed)]
    assert results[0]["skipped_samples"] == results[1]["skipped_samples"] == len(records)


def test_the_fraction_limit_follows_the_samples_seen(tmp_path):
    """``--max_skipped_samples 0.1``: at any step at most ceil(0.1 x samples seen so far) may have been skipped."""
    from internvl_tune.data.dataset import SkipRecord
    from internvl_tune.data.loading import Loaded
    from internvl_tune.dist import DistInfo
    from internvl_tune.errors import UserError
    from internvl_tune.train.skips import SkipLedger

    ledger = SkipLedger("0.1", tmp_path, DistInfo())
    bad = SkipRecord("d:3", "d.jsonl:3", "image not found: x.jpg", "check the path", True)
    assert ledger.take([Loaded("batch", [bad], 4)], 1) == ["batch"]  # 1 of 4 seen: ceil(0.4) = 1 allowed
    for step in range(2, 7):
        ledger.take([Loaded("batch", [], 4)], step)  # 24 seen
    ledger.take([Loaded("batch", [bad], 4)], 7)  # 2 of 28: ceil(2.8) = 3 allowed
    ledger.take([Loaded("batch", [bad], 4)], 8)  # 3 of 32: ceil(3.2) = 4 allowed
    with pytest.raises(UserError, match="5 samples of the 36 seen so far could not be used, more than "
                                        "--max_skipped_samples 0.1 allows"):
        ledger.take([Loaded("batch", [bad, bad], 4)], 9)  # 5 of 36: ceil(3.6) = 4 allowed
    assert ledger.state() == {"count": 5, "seen": 36, "truncated": 0, "named": 0}
    assert len((tmp_path / "skipped_samples.jsonl").read_text().splitlines()) == 5
    with pytest.raises(UserError, match="give a count"):
        SkipLedger("-1", tmp_path, DistInfo())


def _ranks_train(ckpt, meta, out, limit):
    """One rank of a 2-process run (spawned): the message of the UserError that stopped it, or None."""
    from internvl_tune.errors import UserError
    from internvl_tune.models.internvl_chat.recipe import ChatRecipe, ModelArgs
    from internvl_tune.train.config import RunConfig, TrainArgs
    from internvl_tune.train.trainer import Trainer, run

    Trainer.export = lambda self: self.output_dir
    from internvl_tune.data.config import DataConfig

    cfg = RunConfig(model=ModelArgs(model_name_or_path=str(ckpt)),
                    data=DataConfig(meta_path=str(meta), group_by_length=False),
                    train=TrainArgs(output_dir=str(out), max_steps=2, report_to="none", save_strategy="no",
                                    dataloader_num_workers=2, max_skipped_samples=limit, seed=3))
    try:
        run(ChatRecipe(cfg.model, cfg.data), cfg)
    except UserError as exc:
        return str(exc)
    return None


@pytest.mark.slow
def test_one_counter_over_ranks_and_the_same_stop_on_every_rank(tmp_path, tiny_checkpoints):
    """Two gloo ranks: rank 0's and rank 1's first samples are bad. Each rank sees one skip, the job two, which is
    over --max_skipped_samples 1: both ranks stop at step 1 (neither waits for the other in a collective) and
    rank 0 lists both records; with the default both stop on the first record, rank 0's own or not."""
    from train_helpers import spawn

    from internvl_tune.data.batching import GlobalBatchSampler

    order = GlobalBatchSampler([1] * 8, 1, 2, 0, 1, seed=3, group_by_length=False).global_order(0)
    first_step = order[0]  # [rank 0's sample, rank 1's sample]
    rows = [GOOD] * 8
    rows[first_step[0]] = BAD["missing_image"]
    rows[first_step[1]] = BAD["unknown_role"]
    meta = write_data(tmp_path, rows)
    ckpt = tiny_checkpoints["internvl2-2b"]
    message = spawn(2, _ranks_train, ckpt, meta, tmp_path / "one", "1")
    assert message.startswith("2 samples could not be used, more than --max_skipped_samples 1 allows")
    records = [json.loads(x) for x in (tmp_path / "one" / "skipped_samples.jsonl").read_text().splitlines()]
    assert [r["sample_id"] for r in records] == [f"d:{first_step[0] + 1}", f"d:{first_step[1] + 1}"]
    assert {r["step"] for r in records} == {1}
    message = spawn(2, _ranks_train, ckpt, meta, tmp_path / "zero", "0")
    assert message.startswith(f"{tmp_path / 'd.jsonl'}:{first_step[0] + 1}: image not found: gone.jpg")


def test_a_loader_item_survives_pinning():
    """On GPUs the DataLoader pins what it yields (``pin_memory=True``, a path CPU runs never take): a ``Loaded`` must
    come back a ``Loaded`` with its batch pinned (through the batch's own ``pin_memory``) and its records as they
    were, also when it carries no batch."""
    from torch.utils.data._utils.pin_memory import pin_memory

    from internvl_tune.data.dataset import SkipRecord
    from internvl_tune.data.loading import Loaded

    class Batch:
        pinned = False

        def pin_memory(self):
            done = Batch()
            done.pinned = True
            return done

    record = SkipRecord("d:3", "d.jsonl:3", "image not found: x.jpg", "check the path", True)
    out = pin_memory(Loaded(Batch(), [record], 3))
    assert type(out) is Loaded and out.batch.pinned and out.skipped == [record] and out.samples == 3
    assert pin_memory(Loaded(None, [], 2, "no batch")) == Loaded(None, [], 2, "no batch")


def test_a_resumed_list_keeps_the_records_up_to_its_step(tmp_path):
    """Records of steps the resumed run redoes go (it meets them again), so does a line a crash cut in half; a fresh
    run starts an empty list."""
    from internvl_tune.dist import DistInfo
    from internvl_tune.train.skips import SKIPPED_FILE, SkipLedger

    lines = [json.dumps({"step": s, "sample_id": f"d:{s}"}) for s in (1, 2, 3)] + ['{"step": 4, "sample_']
    (tmp_path / SKIPPED_FILE).write_text("\n".join(lines))
    SkipLedger("5", tmp_path, DistInfo(), resume_step=2, state={"count": 2, "seen": 8})
    assert (tmp_path / SKIPPED_FILE).read_text().splitlines() == lines[:2]
    SkipLedger("5", tmp_path, DistInfo())
    assert not (tmp_path / SKIPPED_FILE).exists()


def test_the_training_log_names_the_root_used_when_two_exist(tmp_path, cli, tiny_checkpoints, no_export, monkeypatch):
    """Issue 20.8: `"root": "images"` exists in the current directory and beside the meta file; the run uses the
    current directory's and its plan says so, once, in train.log."""
    data, work = tmp_path / "data", tmp_path / "work"
    write_data(data, [GOOD, GOOD])
    shutil.copytree(data / "images", work / "images")
    (data / "meta.json").write_text(json.dumps({"d": {"root": "images", "annotation": "d.jsonl"}}))
    monkeypatch.chdir(work)
    result = train(cli, tiny_checkpoints["internvl2-2b"], data / "meta.json", tmp_path / "run", "--max_steps", "1",
                   "--dataloader_num_workers", "0")
    assert result.code == 0, result.err
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("exists both") == 1
    assert (f"note: dataset 'd': root 'images' exists both in the current directory ({work / 'images'}) and beside "
            f"the meta file ({data / 'images'}); using {work / 'images'}") in log
