"""Plant realistic bugs one at a time in a scratch copy of the repository and check that the tests catch each one.

    python tools/mutants.py                 # every mutant; exit status 1 when one survives or cannot be planted
    python tools/mutants.py --only itm      # mutants whose name contains "itm"
    python tools/mutants.py --list          # the mutants and the tests that must catch them
    make mutants

Each mutant is an exact-text patch: when a refactor moves or rewrites the patched line, the tool says "not planted"
(and fails) instead of passing silently; update the patch with the code. A mutant counts as caught when at least one
of its tests *fails* (an error while collecting or a skipped test does not count); the tests of every mutant are
first run on the unmodified copy, which must pass. The chosen tests are a fast subset of what ``make test`` runs
(no opt-in markers), so a caught mutant is caught by ``make test`` too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    """A bug: ``edits`` are (old text, new text) in ``file``; each old text must occur exactly once."""

    name: str
    what: str
    file: str
    edits: tuple[tuple[str, str], ...]
    tests: tuple[str, ...]


CHAT_FIXTURES = "tests/models/test_reference_chat.py"
CG_FIXTURES = "tests/models_cg/test_reference_cg.py"
MUTANTS = [
    Mutant(
        "internlm2-wqkv-plain",
        "InternLM2 wqkv split and joined as a plain [q|k|v] (the same way in both directions)",
        "src/internvl_tune/models/internvl_chat/key_map.py",
        (("    grouped = tensor.reshape(spec.num_kv_heads, per_group + 2, spec.head_dim, *tensor.shape[1:])\n",
          "    return tensor.split([spec.num_heads * spec.head_dim] + [spec.num_kv_heads * spec.head_dim] * 2)\n"),
         ("    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)\n",
          "    return torch.cat([q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)])\n")),
        ("tests/models/test_key_layout.py", CHAT_FIXTURES + "::test_logits_and_vision_features_equal_the_reference"),
    ),
    Mutant(
        "itm-labels-swapped",
        "InternVL-G ITM loss with the positive and negative labels swapped",
        "src/internvl_tune/models/internvl_cg/loss.py",
        (("labels = torch.cat([torch.zeros(B, dtype=torch.long), torch.ones(B, dtype=torch.long)])",
          "labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)])"),),
        ("tests/retrieval/test_loss.py", CG_FIXTURES),
    ),
    Mutant(
        "qllama-rope-base",
        "QLLaMA RoPE base 1e4 -> 1e6",
        "src/internvl_tune/models/internvl_cg/qllama.py",
        (("ROPE_BASE = 10000.0", "ROPE_BASE = 1000000.0"),),
        (CG_FIXTURES,),
    ),
    Mutant(
        "accumulation-per-micro-batch",
        "gradient accumulation normalising each micro-batch by its own weight",
        "src/internvl_tune/train/step.py",
        (('            (out["loss"] * scale).backward()',
          '            (out["loss"] * self.info.world_size / max(batch.weight, 1e-30) / len(micro_batches)).backward()'),),
        ("tests/train/test_grad_accumulation.py",),
    ),
    Mutant(
        "pixel-shuffle-v1-v2",
        "pixel shuffle v1 and v2 swapped (the v1 transpose applied to v2 checkpoints)",
        "src/internvl_tune/models/internvl_chat/chat.py",
        (('        if self.ps_version == "v1":', '        if self.ps_version == "v2":'),),
        (CHAT_FIXTURES + "::test_logits_and_vision_features_equal_the_reference",),
    ),
    Mutant(
        "vision-drops-last-token",
        "the image features drop the last patch token instead of the CLS token",
        "src/internvl_tune/models/internvl_chat/chat.py",
        (("        hidden = hidden[:, 1:, :]  # drop CLS", "        hidden = hidden[:, :-1, :]  # drop CLS"),),
        (CHAT_FIXTURES + "::test_logits_and_vision_features_equal_the_reference",),
    ),
    Mutant(
        "label-mask-off-by-one",
        "the supervised-position mask read from the current token's label instead of the next one's",
        "src/internvl_tune/data/batching.py",
        (("    target = labels[:, 1:]\n    mask = target != IGNORE_INDEX\n",
          "    target = labels[:, :-1]\n    mask = target != IGNORE_INDEX\n"),),
        (CHAT_FIXTURES + "::test_training_loss_and_gradients_equal_the_reference",),
    ),
    Mutant(
        "lora-scaling-alpha",
        "LoRA scaling alpha instead of alpha / r (folded into the original-layout adapter's B)",
        "src/internvl_tune/models/internvl_chat/lora.py",
        (("                return alpha / rank", "                return alpha"),),
        ("tests/models/test_key_layout.py",),
    ),
    Mutant(
        "itc-hard-targets",
        "ITC targets not normalised over the captions of one image (duplicate image ids count twice)",
        "src/internvl_tune/models/internvl_cg/loss.py",
        (("    targets = positives / positives.sum(dim=1, keepdim=True)", "    targets = positives"),),
        ("tests/retrieval/test_loss.py", CG_FIXTURES),
    ),
    Mutant(
        "qllama-queries-causal",
        "InternVL-G captioning with causal attention among the query tokens",
        "src/internvl_tune/models/internvl_cg/qllama.py",
        (("        blocked[:, :n, :n] = False", "        blocked[:, :n, :n] &= True"),),
        (CG_FIXTURES + "::test_captions_equal_the_reference_tokens",),
    ),
    Mutant(
        "phi3-longrope-attention-scale",
        "Phi-3's long-RoPE attention scale (sqrt(1 + ln(max / original) / ln original)) dropped to 1",
        "src/internvl_tune/models/internvl_chat/config.py",
        (('            "original_max_position_embeddings": llm.get("original_max_position_embeddings", 4096),\n',
          '            "original_max_position_embeddings": llm.get("original_max_position_embeddings", 4096),\n'
          '            "attention_factor": 1.0,\n'),),
        (CHAT_FIXTURES + "::test_a_prompt_past_the_original_rope_window_equals_the_reference",),
    ),
    Mutant(
        "moe-routing-weights-dropped",
        "mixture-of-experts: the experts' outputs summed without their routing weights",
        "src/internvl_tune/models/common/moe.py",
        (("    out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(out.dtype)\n", ""),),
        ("tests/models/test_moe.py", CHAT_FIXTURES + "::test_logits_and_vision_features_equal_the_reference"),
    ),
    Mutant(
        "gpt-oss-sinks-dropped",
        "GPT-OSS packed attention without its per-head sink logit",
        "src/internvl_tune/models/common/varlen_attention.py",
        (("    probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]",
          "    probs = torch.softmax(logits, dim=-1)"),),
        ("tests/models/test_moe_attention.py",),
    ),
    Mutant(
        "grpo-advantages-not-centred",
        "GRPO advantages without subtracting their group's mean reward",
        "src/internvl_tune/models/internvl_chat/objectives/grpo_loss.py",
        (("    centred = grouped - torch.nanmean(grouped, dim=1, keepdim=True)",
          "    centred = grouped.clone()"),),
        ("tests/objectives/test_grpo_loss.py",),
    ),
]


def scratch_copy(dest: Path) -> Path:
    """The tracked and untracked-but-not-ignored files of the repository (what ``git`` would commit), in ``dest``."""
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def plant(root: Path, mutant: Mutant) -> str | None:
    """Apply the mutant's edits; returns why it could not be planted (None when planted)."""
    path = root / mutant.file
    if not path.is_file():
        return f"{mutant.file} does not exist"
    text = path.read_text()
    for old, new in mutant.edits:
        count = text.count(old)
        if count != 1:
            return f"{mutant.file}: the text to patch occurs {count} times (expected once): {old.strip()[:60]!r}"
        text = text.replace(old, new)
    path.write_text(text)
    return None


def run_tests(root: Path, tests: tuple[str, ...], report: Path, timeout: int) -> dict:
    """Run ``tests`` in ``root`` with its own ``src`` first on the path; counts of passed / failed / errors / skipped."""
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", f"--junitxml={report}",
           *tests]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        output = proc.stdout[-3000:] + proc.stderr[-2000:]
    except subprocess.TimeoutExpired:
        return {"failed": 0, "errors": 0, "passed": 0, "skipped": 0, "seconds": timeout, "output": "timed out",
                "failing": []}
    counts = {"failed": 0, "errors": 0, "passed": 0, "skipped": 0, "failing": []}
    if report.is_file():
        for case in ET.parse(report).getroot().iter("testcase"):
            kinds = {child.tag for child in case}
            if "failure" in kinds:
                counts["failed"] += 1
                counts["failing"].append(f"{case.get('classname')}::{case.get('name')}")
            elif "error" in kinds:
                counts["errors"] += 1
            elif "skipped" in kinds:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
    return {**counts, "seconds": time.time() - start, "output": output}


def _short(case: str) -> str:
    """``tests.models.test_x::test_y[p]`` -> ``test_x.py::test_y[p]``."""
    module, _, name = case.partition("::")
    return f"{module.rpartition('.')[2]}.py::{name}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="run the mutants whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed to one mutant's tests")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy (its path is printed)")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if args.only is None or args.only in m.name]
    if args.list:
        for m in mutants:
            print(f"{m.name}: {m.what}\n  {m.file}\n  tests: {' '.join(m.tests)}")
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="internvl-tune-mutants-"))
    root = scratch_copy(scratch / "repo")
    print(f"scratch copy: {root}", flush=True)
    rows, ok = [], True
    try:
        tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        base = run_tests(root, tests, scratch / "baseline.xml", args.timeout)
        if base["failed"] or base["errors"] or not base["passed"]:
            print(f"the tests fail on the unmodified copy; fix them first:\n{base['output']}")
            return 2
        print(f"baseline: {base['passed']} tests pass ({base['seconds']:.0f} s)", flush=True)
        for m in mutants:
            original = (root / m.file).read_text() if (root / m.file).is_file() else None
            why = plant(root, m)
            if why:
                rows.append((m, "NOT PLANTED", why, 0.0))
                ok = False
            else:
                result = run_tests(root, m.tests, scratch / f"{m.name}.xml", args.timeout)
                caught = result["failed"] > 0
                ok &= caught
                total = result["failed"] + result["passed"] + result["errors"] + result["skipped"]
                detail = f"{result['failed']} of {total} tests fail"
                detail += f", e.g. {_short(result['failing'][0])}" if caught else \
                    f" ({result['errors']} errors, {result['skipped']} skipped)"
                rows.append((m, "caught" if caught else "SURVIVED", detail, result["seconds"]))
            if original is not None:
                (root / m.file).write_text(original)
            print(f"{m.name}: {rows[-1][1]} ({rows[-1][3]:.0f} s) {rows[-1][2]}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    print("\n| mutant | planted bug | file | result | failing tests |\n|---|---|---|---|---|")
    for m, status, detail, _ in rows:
        cells = (m.name, m.what, m.file.removeprefix("src/internvl_tune/"), status, detail)
        print("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
