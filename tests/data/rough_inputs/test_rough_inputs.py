"""The rough-inputs corpus (``rough_corpus.py``) through `internvl-tune data check` and a 1-step `internvl-tune train`.

A group's datasets share one meta JSON (BOM, CRLF, relative paths beside it, run from another directory), one
`data check` and one training step with the default data-loader workers whose batch holds every sample: the
assertions stay per case (its `file:line`, its words, no traceback), the cost is one run per group. Unusable samples
are listed with ``--max_skipped_samples`` so that one step meets them all (the default's stop at the first is the
same line: ``test_the_default_stops_at_the_first_unusable_sample`` and ``tests/reliability/
test_training_data_errors.py``); a refused meta JSON is one run per case, as it stops before any step.

Runs with data-loader workers are real processes (the console script), as users start them: worker processes
forked from a pytest process that has already run many in-process trainings crashed now and then (SIGSEGV in the
worker), which no separate run reproduced; in-process runs are kept for what never forks (`data check`, refusals).
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from rough_corpus import CASES, build

STEP = ["--report_to", "none", "--save_strategy", "no", "--max_steps", "1", "--per_device_train_batch_size", "64",
        "--max_seq_length", "512", "--learning_rate", "1e-3"]


@dataclass
class Run:
    code: int
    out: str
    err: str


def run_cli(*args) -> Run:
    """``internvl-tune ARGS`` in-process; a traceback anywhere fails the test that reads the result."""
    from internvl_tune.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
    return Run(code, out.getvalue(), err.getvalue())


def run_process(cwd: Path, *args) -> Run:
    """``internvl-tune ARGS`` as its own process, started in ``cwd``."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "internvl_tune.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    return Run(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The corpus, a tiny InternVL2-2B, and the directory the commands run from (not the corpus's)."""
    from internvl_tune.testing.tiny_chat import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("rough")
    metas = build(root / "corpus")
    ckpt = write_tiny_checkpoint("internvl2-2b", root / "tiny", seed=1)
    (root / "elsewhere").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root / "elsewhere")  # relative roots and annotations resolve beside their meta JSON
        yield metas, ckpt, root


@pytest.fixture(scope="module")
def checked(corpus):
    """`data check` of the trains and error groups (with the model: tokens and truncation too)."""
    metas, ckpt, _ = corpus
    return {g: run_cli("data", "check", metas[g], "--model_name_or_path", ckpt, "--max_seq_length", "512",
                       "--max_errors", "1000") for g in ("trains", "error")}


@pytest.fixture(scope="module")
def trained(corpus):
    """One training step per group, default workers, every sample in its batch."""
    metas, ckpt, root = corpus
    here = root / "elsewhere"
    runs = {"trains": run_process(here, "train", "--model_name_or_path", ckpt, "--meta_path", metas["trains"],
                                  "--output_dir", root / "run_trains", *STEP),
            "error": run_process(here, "train", "--model_name_or_path", ckpt, "--meta_path", metas["error"],
                                 "--output_dir", root / "run_error", "--max_skipped_samples", "1000", *STEP)}
    skipped = root / "run_error" / "skipped_samples.jsonl"
    records = [json.loads(x) for x in skipped.read_text().splitlines()] if skipped.exists() else []
    return runs, records


def reports(run: Run, case) -> list[str]:
    """The `data check` lines about ``case`` (its JSONL lines, or its dataset in the meta JSON)."""
    marks = (f"{case.name}.jsonl:", f"dataset '{case.name}'")
    return [line for line in run.out.splitlines() if line.startswith(("error ", "warning ")) and any(m in line for m in marks)]


def no_traceback(*runs: Run) -> bool:
    return not any("Traceback" in r.out + r.err or "DataLoader worker" in r.err for r in runs)


def test_the_corpus_has_every_kind_of_case():
    groups = [c.group for c in CASES]
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)
    assert groups.count("trains") >= 20 and groups.count("error") >= 20 and groups.count("refused") >= 8


@pytest.mark.parametrize("case", [c for c in CASES if c.group == "trains"], ids=lambda c: c.name)
def test_a_valid_rough_input_is_accepted_and_trains(case, checked, trained):
    check, (runs, _) = checked["trains"], trained
    found = reports(check, case)
    assert not [r for r in found if r.startswith("error ")], found
    if case.expect:
        assert any(r.startswith("warning ") and all(e in r for e in case.expect) for r in found), found
    else:
        assert not found, found
    assert check.code == 0 and runs["trains"].code == 0, runs["trains"].err[-3000:]
    assert "skipped train sample" not in runs["trains"].err and no_traceback(check, runs["trains"])


@pytest.mark.parametrize("case", [c for c in CASES if c.group == "error"], ids=lambda c: c.name)
def test_an_unusable_sample_is_named_alike_by_data_check_and_training(case, corpus, checked, trained):
    metas, _, root = corpus
    check, (runs, records) = checked["error"], trained
    where = f"{metas['error'].parent / case.name}.jsonl:{case.line}"
    errors = [r[len("error "):] for r in reports(check, case) if r.startswith("error ")]
    assert len(errors) == 1 and errors[0].startswith(f"{where}: ") and all(e in errors[0] for e in case.expect), errors
    mine = {f"{r['where']}: {r['reason']} — {r['fix']}" for r in records if r["where"] == where}
    assert mine == {errors[0]}  # training's record, word for word
    assert check.code == 1 and runs["error"].code == 0 and no_traceback(check, runs["error"])
    log = (root / "run_error" / "train.log").read_text(encoding="utf-8")
    assert f"skipped train sample {case.name}:{case.line} (" in log and errors[0] in log


def test_the_default_stops_at_the_first_unusable_sample(corpus, trained, checked):
    metas, ckpt, root = corpus
    run = run_process(root / "elsewhere", "train", "--model_name_or_path", ckpt, "--meta_path", metas["error"],
                      "--output_dir", root / "run_default", *STEP)
    record = json.loads((root / "run_default" / "skipped_samples.jsonl").read_text().splitlines()[0])
    line = f"{record['where']}: {record['reason']} — {record['fix']}"
    assert run.code == 2 and f"error: {line} [" in run.err and no_traceback(run)
    assert f"error {line}" in checked["error"].out


@pytest.mark.parametrize("case", [c for c in CASES if c.group == "refused"], ids=lambda c: c.name)
def test_a_refused_meta_json_gives_one_line_in_both(case, corpus):
    metas, ckpt, root = corpus
    meta = metas["refused"] / f"{case.name}.json"
    check = run_cli("data", "check", meta)
    errors = [line[len("error "):] for line in check.out.splitlines() if line.startswith("error ")]
    assert check.code == 1 and len(errors) == 1, check.out
    assert errors[0].startswith(f"{meta}:{case.line}: ") and all(e in errors[0] for e in case.expect), errors
    run = run_cli("train", "--model_name_or_path", ckpt, "--meta_path", meta, "--output_dir", root / f"run_{case.name}",
                  *STEP)
    assert run.code == 2 and run.err.splitlines()[-1] == f"error: {errors[0]}" and no_traceback(check, run)


def test_the_docs_table_lists_every_case():
    from rough_corpus import table

    docs = (Path(__file__).resolve().parents[3] / "docs" / "reliability.md").read_text(encoding="utf-8")
    assert table() in docs  # regenerate with `python tests/data/rough_inputs/rough_corpus.py`
