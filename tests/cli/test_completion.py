"""``internvl-tune completion bash|zsh``: the script completes commands, sub-commands, flags and flag values, run
by bash itself."""

import shutil
import subprocess

import pytest

from internvl_tune.cli import main


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["completion", "bash"]) == 0
    path = tmp_path_factory.mktemp("completion") / "internvl-tune.bash"
    path.write_text(out.getvalue())
    return path


def _complete(script, *words: str) -> list[str]:
    line = " ".join(f"'{w}'" for w in ("internvl-tune", *words))
    probe = f'source {script}; COMP_WORDS=({line}); COMP_CWORD=$((${{#COMP_WORDS[@]}}-1)); _internvl_tune; ' \
            'printf "%s\\n" "${COMPREPLY[@]}"'
    return subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("words, wanted", [
    (("ev",), ["eval"]),
    (("eval", "c"), ["caption", "chat"]),
    (("convert", "--to", ""), ["native", "original"]),
    (("train", "--model_name_or_path", "x", "--use_llm"), ["--use_llm_lora"]),
    (("export", "--ch"), ["--check"]),
    (("bench", "ver"), ["verify"]),
])
def test_bash_completes_commands_flags_and_values(script, words, wanted):
    assert sorted(_complete(script, *words)) == wanted


def test_hidden_aliases_are_not_offered_and_zsh_loads_bashcompinit(script, capsys):
    assert "--max-new-tokens" not in script.read_text() and "--max_new_tokens" in script.read_text()
    assert main(["completion", "zsh"]) == 0
    assert capsys.readouterr().out.startswith("autoload -U +X bashcompinit && bashcompinit\n")
