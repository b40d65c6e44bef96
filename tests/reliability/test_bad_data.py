"""The bad-input corpus for datasets, driven through ``internvl-tune data check`` as a user meets it.

One JSONL line per mistake; a single ``data check`` run over the corpus must report each at its ``file:line`` with
the field and the fix (error or warning as listed), exit 1, and never print a traceback. Tokenizer-dependent cases
(zero supervised tokens, image tokens past ``--max_seq_length``, a template the tokenizer lacks) get runs of their own.
"""

from __future__ import annotations

import json

import pytest
from reliability_media import write_bad_media


def turns(question="<image>\nWhat is this?", answer="A thing."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def line(**item):
    item.setdefault("conversations", turns())
    return json.dumps(item).encode()


# (case id, raw JSONL line, "error"/"warning", fragments the report must contain for that line)
CORPUS = [
    ("malformed_json", b'{"image": "ok.jpg", "conversations": [', "error", ["invalid JSON", "one complete JSON object"]),
    ("trailing_comma", b'{"conversations": [],}', "error", ["invalid JSON", "no trailing commas"]),
    ("json_list_line", b"[1, 2]", "error", ["JSON list, not an object"]),
    ("json_null_line", b"null", "error", ["JSON NoneType, not an object"]),
    ("deeply_nested", b'{"conversations": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "error", ["nested too deeply"]),
    ("latin1_line", '{"conversations": [{"from": "human", "value": "café"}]}'.encode("latin-1"), "error",
     ["not UTF-8 text", "save the file as UTF-8"]),
    ("no_conversations", line(conversations=None), "error", ["`conversations` must be a non-empty list"]),
    ("empty_conversations", line(conversations=[]), "error", ["`conversations` must be a non-empty list"]),
    ("wrong_turn_keys", line(conversations=[{"role": "user", "content": "hi"}]), "error",
     ['keys "from" and "value"']),
    ("unknown_role", line(conversations=[{"from": "user", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}]),
     "error", ["conversations[0].from is 'user'"]),
    ("value_not_string", line(conversations=[{"from": "human", "value": 5}, {"from": "gpt", "value": "x"}]), "error",
     ["conversations[0].value must be a string"]),
    ("no_assistant_turn", line(conversations=[{"from": "human", "value": "<image>\nhi"}]), "error", ["no gpt turn"]),
    ("only_assistant_turn", line(conversations=[{"from": "gpt", "value": "x"}]), "error", ["no gpt turn"]),
    ("empty_answer", line(conversations=turns(answer="")), "error", ["conversations[1].value is empty"]),
    ("empty_question", line(conversations=turns(question="")), "error", ["conversations[0].value is empty"]),
    ("not_alternating", line(conversations=turns() + [{"from": "gpt", "value": "again"}]), "error", ["alternate"]),
    ("reserved_token_in_text", line(conversations=turns(answer="x <|im_end|> y")), "error", ["reserved token"]),
    ("image_not_a_path", line(image=123), "error", ["`image` must be a path or a list of paths, got int"]),
    ("video_not_a_path", line(video=["a.mp4"], conversations=turns("<video>\nx")), "error",
     ["`video` must be a path string"]),
    ("two_placeholders_one_image", line(image="ok.jpg", conversations=turns("<image>\n<image>\nTwo?")), "error",
     ["single-image sample has 2 <image> placeholder(s)"]),
    ("image_count_mismatch", line(image=["ok.jpg", "ok.jpg"]), "error",
     ["`image` lists 2 image(s) but the human turns hold 1 <image>"]),
    ("placeholder_without_image", line(), "error", ["pure-text sample", "contains 1 placeholder"]),
    ("placeholder_in_answer", line(image="ok.jpg", conversations=turns(answer="see <image>")), "error", ["<image>"]),
    ("missing_image", line(image="nope.jpg"), "error", ["image not found: nope.jpg (looked for", "media/nope.jpg)", "relative to the dataset's root"]),
    ("zero_byte_image", line(image="zero.jpg"), "error", ["cannot decode image", "zero.jpg", "re-encode it"]),
    ("truncated_image", line(image="truncated.jpg"), "error", ["cannot decode image", "truncated.jpg"]),
    ("html_saved_as_jpg", line(image="not_an_image.jpg"), "error", ["cannot decode image", "not_an_image.jpg"]),
    ("decompression_bomb", line(image="bomb.png"), "error", ["bomb.png is too large to decode safely", "resize it"]),
    ("over_pixel_limit", line(image="big.png"), "error", ["big.png is too large to decode safely"]),
    ("gray16_image", line(image="gray16.png"), "warning", ["I;16 image", "clips them at 255", "convert it to 8-bit"]),
    ("exif_rotated_image", line(image="exif_rotated.jpg"), "warning", ["EXIF orientation 6 is not applied",
                                                                       "exif_transpose"]),
    ("width_not_int", line(image="ok.jpg", width="64", height=48), "warning", ["width/height must be integers"]),
    ("width_wrong", line(image="ok.jpg", width=640, height=480), "warning", ["width/height say 640x480",
                                                                            "the image is 64x48"]),
    ("missing_video", line(video="nope.mp4", conversations=turns("<video>\nx")), "error", ["video not found"]),
    ("zero_byte_video", line(video="zero.mp4", conversations=turns("<video>\nx")), "error",
     ["cannot decode video", "zero.mp4: the file is empty (0 bytes)"]),
    ("garbage_video", line(video="garbage.mp4", conversations=turns("<video>\nx")), "error",
     ["cannot decode video", "garbage.mp4: Invalid data found when processing input — re-encode"]),
    ("dotdot_escape", line(image="../../../../etc/passwd"), "error",
     ["'../../../../etc/passwd' points outside the dataset root", "--allow_outside_root"]),
    ("absolute_path", line(image="/etc/passwd"), "error", ["'/etc/passwd' points outside the dataset root"]),
    ("symlink_escape", line(image="escape_link.jpg"), "error", ["points outside the dataset root",
                                                                 "through a symlink to /etc/hostname"]),
    ("leading_gpt_turn", line(image="ok.jpg", conversations=[{"from": "gpt", "value": "x"}] + turns()), "warning",
     ["dropped"]),
]
# Decodable oddities that are converted to RGB exactly as the reference does (documented, not reported).
ACCEPTED = [("cmyk_image", line(image="cmyk.jpg")), ("palette_transparency", line(image="palette.png")),
            ("rgba_image", line(image="rgba.png")), ("good_image", line(image="ok.jpg"))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_bad_media(root / "media")
    rows = [raw for _, raw, *_ in CORPUS] + [raw for _, raw in ACCEPTED]
    (root / "bad.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    meta = {"bad": {"root": str(root / "media"), "annotation": str(root / "bad.jsonl"), "data_augment": False,
                    "repeat_time": 1}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def report(corpus):
    """One ``data check`` run over the whole corpus: (exit code, {line number: [reported lines]})."""
    import contextlib
    import io

    from internvl_tune.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["data", "check", str(corpus / "meta.json"), "--max_errors", "1000"])
    assert "Traceback" not in out.getvalue() + err.getvalue()
    by_line: dict[int, list[str]] = {}
    prefix = f"{corpus / 'bad.jsonl'}:"
    for text in out.getvalue().splitlines():
        kind, _, rest = text.partition(" ")
        if kind in ("error", "warning") and rest.startswith(prefix):
            number = int(rest[len(prefix):].split(":", 1)[0])
            by_line.setdefault(number, []).append(f"{kind} {rest}")
    return code, by_line, out.getvalue()


@pytest.mark.parametrize("number, case", list(enumerate(CORPUS, start=1)), ids=[c[0] for c in CORPUS])
def test_each_bad_line_is_reported_with_line_and_fix(report, number, case):
    code, by_line, _ = report
    name, _, severity, fragments = case
    assert code == 1
    reported = by_line.get(number, [])
    assert any(r.startswith(severity) and all(f in r for f in fragments) for r in reported), (name, reported)
    assert all(" — " in r for r in reported), reported  # every problem carries its fix
    assert not any("Errno" in r for r in reported), reported  # words, not FFmpeg's error numbers


def test_accepted_oddities_are_not_reported_and_totals_add_up(report):
    code, by_line, out = report
    accepted = range(len(CORPUS) + 1, len(CORPUS) + len(ACCEPTED) + 1)
    assert not [by_line[n] for n in accepted if n in by_line]
    errors = sum(c[2] == "error" for c in CORPUS)
    warnings = sum(c[2] == "warning" for c in CORPUS)
    assert f"problems found: {errors} error(s), {warnings} warning(s)" in out


def test_outside_root_is_allowed_only_when_asked(corpus, cli, tmp_path):
    (tmp_path / "inside").mkdir()
    write_bad_media(tmp_path / "outside")
    rows = [line(image="../outside/ok.jpg"), line(image=str(tmp_path / "outside" / "ok.jpg"))]
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    meta = {"d": {"root": str(tmp_path / "inside"), "annotation": str(tmp_path / "d.jsonl")}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    denied = cli("data", "check", tmp_path / "meta.json")
    assert denied.code == 1 and "2 error(s)" in denied.out and "--allow_outside_root" in denied.out
    assert cli("data", "check", tmp_path / "meta.json", "--allow_outside_root").code == 0


def test_root_that_is_a_symlink_still_works(tmp_path, cli):
    write_bad_media(tmp_path / "disk")
    (tmp_path / "linked_root").symlink_to(tmp_path / "disk")
    (tmp_path / "d.jsonl").write_bytes(line(image="ok.jpg") + b"\n")
    meta = {"d": {"root": str(tmp_path / "linked_root"), "annotation": str(tmp_path / "d.jsonl")}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert cli("data", "check", tmp_path / "meta.json").code == 0


@pytest.mark.parametrize("content, fragments", [
    (b'{"d": {"root": ".", "annotation": "d.jsonl", "repeat_time": 1,}}', ["meta.json:1: invalid JSON"]),
    ('{"d": {"root": "é", "annotation": "d.jsonl"}}'.encode("latin-1"), ["not UTF-8 text", "save it as UTF-8"]),
    (b'["d.jsonl"]', ["must be an object mapping dataset names"]),
    (b'{"d": {"root": ".", "anotation": "d.jsonl"}}', ["unknown key(s) ['anotation']"]),
    (b'{"d": {"root": "."}}', ["annotation"]),
    (b'{"d": {"root": ".", "annotation": "d.json"}}', ["is not a .jsonl file"]),
    (b'{"d": {"root": ".", "annotation": "d.jsonl", "repeat_time": "2"}}', ["repeat_time"]),
    (b'{"d": {"root": ".", "annotation": "gone.jsonl"}}', ["annotation file not found", "gone.jsonl"]),
], ids=["trailing_comma", "latin1", "list", "misspelled_key", "missing_annotation", "not_jsonl",
        "repeat_time_string", "annotation_missing_file"])
def test_meta_json_mistakes(tmp_path, cli, content, fragments):
    (tmp_path / "d.jsonl").write_bytes(line() + b"\n")
    (tmp_path / "meta.json").write_bytes(content)
    result = cli("data", "check", tmp_path / "meta.json")
    assert result.code in (1, 2), result
    assert all(f in result.out + result.err for f in fragments), result


def test_meta_path_mistakes(tmp_path, cli):
    missing = cli("data", "check", tmp_path / "nope.json")
    folder = cli("data", "check", tmp_path)
    assert missing.code in (1, 2) and "meta file not found" in missing.out + missing.err
    assert folder.code in (1, 2) and "cannot read the meta JSON" in folder.out + folder.err


def test_unknown_conv_style_is_refused_by_the_parser(corpus, cli, capsys):
    result = cli("data", "check", corpus / "meta.json", "--conv_style", "chatml")
    assert result.code == 2 and "invalid choice: 'chatml'" in result.err


def test_bad_corpus_through_the_console_script_has_no_traceback(corpus):
    """The same corpus through a real process: exit 1, problems on stdout, nothing on stderr."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "internvl_tune.cli", "data", "check", str(corpus / "meta.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "problems found" in proc.stdout


@pytest.fixture
def token_corpus(tmp_path):
    from PIL import Image

    Image.new("RGB", (900, 448)).save(tmp_path / "wide.jpg")  # 2 tiles with dynamic tiling, 1 at the least
    rows = [line(image="wide.jpg"), line(conversations=turns("Hi " * 400, "Hello."))]
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"root": str(tmp_path), "annotation": str(tmp_path / "d.jsonl")}}))
    return tmp_path


def test_image_tokens_past_max_seq_length(token_corpus, tiny_checkpoints, cli):
    result = cli("data", "check", token_corpus / "meta.json", "--model_name_or_path",
                 tiny_checkpoints["internvl2-2b-448"], "--max_seq_length", "200")
    assert result.code == 1
    assert f"{token_corpus / 'd.jsonl'}:1: the image tokens alone reach past --max_seq_length 200" in result.out
    assert "raise --max_seq_length" in result.out


def test_zero_supervised_tokens_after_truncation(token_corpus, tiny_checkpoints, cli):
    """The "loss is 0" trap: a sample whose answer is cut away is flagged, with the token count that fits."""
    result = cli("data", "check", token_corpus / "meta.json", "--model_name_or_path",
                 tiny_checkpoints["internvl2-2b-448"], "--max_seq_length", "600", "--dynamic_image_size", "True")
    assert result.code == 1
    assert f"{token_corpus / 'd.jsonl'}:2: no answer token is left within --max_seq_length 600" in result.out
    # 2 tiles and the thumbnail the checkpoint's config asks for; a warning, not an error
    assert f"{token_corpus / 'd.jsonl'}:1: re-tiled from 3 to 1 tiles" in result.out
    assert "1 error(s), 1 warning(s)" in result.out


def test_data_check_takes_tile_size_and_template_from_the_checkpoint(token_corpus, tiny_checkpoints, cli):
    small = cli("data", "check", token_corpus / "meta.json", "--model_name_or_path", tiny_checkpoints["internvl2-2b"])
    released = cli("data", "check", token_corpus / "meta.json", "--model_name_or_path",
                   tiny_checkpoints["internvl2-2b-448"])
    assert "56 px tiles x 4 tokens" in small.out and "448 px tiles x 256 tokens" in released.out
    assert "template internlm2-chat" in small.out and "dynamic tiles 1-12 + thumbnail" in small.out  # the config's
    phi3 = cli("data", "check", token_corpus / "meta.json", "--model_name_or_path", tiny_checkpoints["internvl2-4b"])
    assert "template phi3-chat" in phi3.out
    wrong = cli("data", "check", token_corpus / "meta.json", "--model_name_or_path", tiny_checkpoints["internvl2-2b"],
                "--force_image_size", "448")
    assert wrong.code == 2 and "--force_image_size 448 differs" in wrong.err and "pass --force_image_size 56" in wrong.err


def test_template_that_does_not_match_the_tokenizer(token_corpus, tiny_checkpoints, cli):
    """phi3-chat on an InternLM2 tokenizer (InternVL #388): one error naming the missing token and the right style."""
    result = cli("data", "check", token_corpus / "meta.json", "--model_name_or_path", tiny_checkpoints["internvl2-2b"],
                 "--conv_style", "phi3-chat")
    assert result.code == 1 and "1 error(s)" in result.out
    assert "the tokenizer has no special token <|" in result.out and "InternLM2: internlm2-chat" in result.out


def test_training_dataset_refuses_a_mismatched_template_at_start(token_corpus, tiny_checkpoints):
    from internvl_tune.data.config import RELEASE_DEFAULTS, DataConfig
    from internvl_tune.data.dataset import SupervisedDataset
    from internvl_tune.errors import DataError
    from internvl_tune.models.internvl_chat.tokenizers import load_tokenizer

    tok = load_tokenizer(tiny_checkpoints["internvl2-2b"])
    with pytest.raises(DataError, match="phi3-chat template needs"):
        SupervisedDataset(token_corpus / "meta.json", tok, DataConfig(conv_style="phi3-chat").resolve(RELEASE_DEFAULTS))


def test_data_check_prints_no_tokenizer_length_warning(token_corpus, tiny_checkpoints, cli):
    """A 400-word text is longer than --max_seq_length 200 (and the tokenizer's model_max_length): data check fits it
    itself, so transformers' "Token indices sequence length is longer" warning is noise (issue 20)."""
    import logging

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    keep = Keep()
    logging.getLogger("transformers").addHandler(keep)  # its own handler writes to the stderr of import time
    try:
        result = cli("data", "check", token_corpus / "meta.json", "--model_name_or_path",
                     tiny_checkpoints["internvl2-2b"], "--max_seq_length", "200")
    finally:
        logging.getLogger("transformers").removeHandler(keep)
    assert result.code == 1 and "no answer token is left within --max_seq_length 200" in result.out
    assert not [m for m in keep.messages if "sequence length is longer" in m], keep.messages


def test_data_check_without_a_model_tiles_as_training_on_a_released_checkpoint(token_corpus, tiny_checkpoints, cli):
    """wide.jpg (900x448) gets 2 tiles and a thumbnail from a released checkpoint's config (dynamic tiling 1-12 with
    a thumbnail); without a model, data check used to assume one tile per image."""
    bare = cli("data", "check", token_corpus / "meta.json")
    with_model = cli("data", "check", token_corpus / "meta.json", "--model_name_or_path",
                     tiny_checkpoints["internvl2-2b-448"])
    assert "tiles per image (video frames count as 1): 3 tiles: 1" in bare.out
    assert "tiles per image (video frames count as 1): 3 tiles: 1" in with_model.out
    assert "dynamic tiles 1-12 + thumbnail; no model given: the released checkpoints' settings" in bare.out
