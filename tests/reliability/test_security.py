"""Security rules as tests: no remote code, no pickle, safe YAML, no eval of user strings, paths kept in their root.

The grep tests read the source tree (comments and docstrings included, so a rule cannot hide in a string); the
pickle test proves that a malicious ``pytorch_model.bin`` is refused without running its payload.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src" / "internvl_tune"
PY_FILES = sorted(SRC.rglob("*.py"))
SHELL_FILES = sorted((REPO / "shell").rglob("*.sh")) + [REPO / "evaluate.sh"]


def hits(pattern: str, files) -> list[str]:
    regex = re.compile(pattern)
    return [f"{f.relative_to(REPO)}:{n}: {text.strip()}" for f in files
            for n, text in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if regex.search(text)]


def test_the_scanned_trees_are_not_empty():
    assert len(PY_FILES) > 50 and len(SHELL_FILES) > 5


def test_no_trust_remote_code():
    assert hits(r"trust_remote_code\s*=\s*True|trust_remote_code=", PY_FILES) == []


def test_no_pickle_loading():
    assert hits(r"\bimport pickle\b|\bpickle\.loads?\(|\bcPickle\b|\bdill\b|joblib\.load", PY_FILES) == []
    calls = hits(r"torch\.load\(", PY_FILES)
    assert calls, "expected the legacy .bin readers"
    assert [c for c in calls if "weights_only=True" not in c] == []
    assert hits(r"weights_only\s*=\s*False", PY_FILES) == []


def test_yaml_only_through_safe_load():
    assert hits(r"yaml\.(load|unsafe_load|full_load|load_all)\(", PY_FILES) == []
    assert hits(r"yaml\.safe_load\(", PY_FILES)  # the config readers do use it


def test_no_eval_or_exec_of_strings():
    assert hits(r"(?<![\w.])(eval|exec)\(", PY_FILES) == []
    assert hits(r"shell\s*=\s*True|os\.system\(|os\.popen\(", PY_FILES) == []


def test_shell_scripts_never_eval_user_strings():
    assert hits(r"(^\s*|[;&|(]\s*|\b(then|do|else)\s+)eval\s", SHELL_FILES) == []  # the builtin, not `internvl-tune eval`
    assert hits(r"bash\s+-c\s+\"?\$|sh\s+-c\s+\"?\$", SHELL_FILES) == []
    # "$@" passes user arguments as separate words; an unquoted $@ or $* would split and glob them.
    assert [h for h in hits(r"\$[@*]", SHELL_FILES) if '"$@"' not in h.split(":", 2)[2]] == []


class _Payload:
    """Unpickling this runs ``exec``: what a hostile pytorch_model.bin does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.fixture
def hostile_bin(tiny_checkpoints, tmp_path):
    """A checkpoint whose weights are a pytorch_model.bin that creates ``marker`` when unpickled."""
    from safetensors.torch import load_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["internvl2-2b"], ckpt)
    state = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        state.update(load_file(str(shard)))
        shard.unlink()
    (ckpt / "model.safetensors.index.json").unlink()
    marker = tmp_path / "created_by_pickle"
    state["payload"] = _Payload(marker)
    torch.save(state, ckpt / "pytorch_model.bin")
    return ckpt, marker


def test_malicious_bin_is_refused_and_not_executed(hostile_bin, tmp_path, cli):
    ckpt, marker = hostile_bin
    result = cli("convert", ckpt, tmp_path / "out", "--to", "native")
    assert result.code == 2 and "pytorch_model.bin: cannot read legacy .bin weights" in result.err
    assert "convert it to safetensors" in result.err
    assert not marker.exists()
    # Control: the file really is hostile, so the refusal above is what kept the marker away.
    torch.load(ckpt / "pytorch_model.bin", weights_only=False)  # noqa: S614 (deliberate, on our own test file)
    assert marker.read_text() == "pwned"


def test_malicious_bin_is_refused_by_the_internvl_cg_loader(hostile_bin):
    from internvl_tune.errors import CheckpointError
    from internvl_tune.models.internvl_cg import loading

    ckpt, marker = hostile_bin
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        list(loading.iter_file_tensors(ckpt / "pytorch_model.bin"))
    assert not marker.exists()
