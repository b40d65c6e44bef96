"""The rough-inputs corpus (issue 20): datasets as people really have them, written by code into a folder.

Every case is one dataset (its own JSONL file) of one of three groups, each written with its own meta JSON:

- ``trains``: valid but rough (odd image formats, blank lines, BOM, CRLF, unicode paths, symlinks, ...): `data check`
  reports no error (a warning where ``expect`` is given) and training uses the sample.
- ``error``: one unusable sample: `data check` reports ``expect`` at ``file:line``, and training skips it with the
  same words (the default stops at the first one with that line; the group runs with ``--max_skipped_samples``).
- ``refused``: the whole meta JSON is refused (`data check` exit 1, `train` exit 2) with ``expect`` at ``file:line``.

``python tests/data/rough_inputs/rough_corpus.py`` prints the table of docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, when run as a script
from reliability.reliability_media import png_claiming  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[3] / "examples" / "sample"
GROUPS = ("trains", "error", "refused")


def turns(question="<image>\nWhat is in the picture?", answer="Something small."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def img(path, **extra):
    return {"image": path, "conversations": turns(), **extra}


def vid(path, **extra):
    return {"video": path, "conversations": turns("<video>\nWhat happens?"), **extra}


@dataclass(frozen=True)
class Case:
    """One rough input.

    Attributes:
        name: the dataset name (and JSONL file name).
        group: ``trains``, ``error`` or ``refused``.
        what: the input, in words (the docs table).
        jsonl: the annotation file: a list of lines (dicts are JSON-encoded; bytes are written as they are) joined by
            newlines, or raw bytes.
        expect: fragments of the message (an error, or for ``trains`` a warning); empty: nothing is reported.
        line: the line of the JSONL file (``error``) or meta JSON (``refused``) the message names.
        entry: extra meta JSON keys of the dataset (``repeat_time``, another ``root``).
        meta: ``refused`` only: the whole meta JSON (str), where ``{name}`` is the dataset name.
    """

    name: str
    group: str
    what: str
    jsonl: list | bytes = ()
    expect: tuple[str, ...] = ()
    line: int = 1
    entry: tuple[tuple[str, object], ...] = ()
    meta: str | None = None

    def content(self) -> bytes:
        if isinstance(self.jsonl, bytes):
            return self.jsonl
        return b"".join((r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode()) + b"\n"
                        for r in self.jsonl)


BOM = "\ufeff".encode()
CASES = [
    # ---- valid but rough: trains ----------------------------------------------------------------------------------
    Case("png_alpha", "trains", "RGBA PNG (transparency)", [img("rgba.png")]),
    Case("cmyk_jpeg", "trains", "CMYK JPEG", [img("cmyk.jpg")]),
    Case("one_pixel", "trains", "1x1 image", [img("one_pixel.png")]),
    Case("huge_aspect", "trains", "4000x2 image (aspect ratio 2000)", [img("wide.png")]),
    Case("exif_rotated", "trains", "JPEG with EXIF orientation 6", [img("exif.jpg")],
         ("EXIF orientation 6 is not applied",)),
    Case("gif_image", "trains", "animated GIF as an image (first frame)", [img("anim.gif")]),
    Case("palette_png", "trains", "palette PNG with a transparent colour", [img("palette.png")]),
    Case("gray16_png", "trains", "16-bit grayscale PNG", [img("gray16.png")], ("clips them at 255",)),
    Case("grayscale_jpeg", "trains", "8-bit grayscale JPEG", [img("gray.jpg")]),
    Case("png_named_jpg", "trains", "PNG bytes in a .jpg file", [img("png_named.jpg")]),
    Case("webp", "trains", "WebP image", [img("photo.webp")]),
    Case("upper_extension", "trains", "file name in capitals (.JPG)", [img("PHOTO.JPG")]),
    Case("unicode_spaces_path", "trains", "path with spaces and non-ASCII letters", [img("my photos/猫 1.jpg")]),
    Case("symlinked_image", "trains", "symlink to an image inside the root", [img("link.jpg")]),
    Case("dotdot_inside_root", "trains", "`sub/../ok.jpg` (stays inside the root)", [img("sub/../ok.jpg")]),
    Case("crlf", "trains", "CRLF line endings", b"".join(json.dumps(img("ok.jpg")).encode() + b"\r\n" for _ in range(2))),
    Case("bom_jsonl", "trains", "UTF-8 BOM at the start of the JSONL", BOM + json.dumps(img("ok.jpg")).encode() + b"\n"),
    Case("blank_lines", "trains", "blank and whitespace-only lines, and `echo >>` after the last",
         b"\n" + json.dumps(img("ok.jpg")).encode() + b"\n   \n\t\n" + json.dumps(img("ok.jpg")).encode() + b"\n\n"),
    Case("no_final_newline", "trains", "no newline after the last line", json.dumps(img("ok.jpg")).encode()),
    Case("spaces_around_object", "trains", "spaces around the JSON object", b"   " + json.dumps(img("ok.jpg")).encode() + b"  \n"),
    Case("numeric_id_extra_keys", "trains", "numeric `id` and unknown extra keys",
         [img("ok.jpg", id=7, source="web", score=0.5)]),
    Case("unicode_text", "trains", "Chinese text and emoji", [img("ok.jpg", conversations=turns("<image>\n这是什么？🐱", "一只猫。"))]),
    Case("grounding", "trains", "grounding tags `<ref>` / `<box>`",
         [img("ok.jpg", conversations=turns("<image>\nWhere is <ref>the cat</ref>?", "<box>[[10, 20, 500, 600]]</box>"))]),
    Case("multi_turn", "trains", "three question-answer rounds",
         [img("ok.jpg", conversations=turns() + turns("And the colour?", "Grey.") + turns("Size?", "Small."))]),
    Case("no_placeholder", "trains", "single image without `<image>` (prepended)",
         [img("ok.jpg", conversations=turns("What is it?"))]),
    Case("list_of_one_image", "trains", "`image` as a list of one", [img(["ok.jpg"])]),
    Case("multi_image", "trains", "three images, three placeholders",
         [img(["ok.jpg", "rgba.png", "gray.jpg"], conversations=turns("<image>\n<image>\n<image>\nCompare."))]),
    Case("empty_image_list", "trains", "`image: []` on a text sample", [{"image": [], "conversations": turns("Hi")}]),
    Case("empty_video_string", "trains", "`video: \"\"` on a text sample", [{"video": "", "conversations": turns("Hi")}]),
    Case("pure_text", "trains", "text only, with `width`/`height` null", [{"conversations": turns("Hi"), "width": None}]),
    Case("video_mp4", "trains", "MP4 video", [vid("clip.mp4")]),
    Case("gif_video", "trains", "animated GIF as a video", [vid("anim.gif")]),
    Case("frame_folder", "trains", "a folder of `name_<n>.jpg` frames as a video", [vid("frames")]),
    Case("leading_gpt_turn", "trains", "conversation that starts with gpt",
         [img("ok.jpg", conversations=[{"from": "gpt", "value": "Hello."}] + turns())], ("dropped",)),
    Case("last_turn_human", "trains", "conversation that ends with a question",
         [img("ok.jpg", conversations=turns() + [{"from": "human", "value": "More?"}])], ("the last turn is from human",)),
    Case("long_text", "trains", "an answer longer than --max_seq_length (its tail is cut)",
         [{"conversations": turns("Tell a story.", "word " * 2000)}], ("truncated from",)),
    Case("wrong_width_height", "trains", "`width`/`height` that are not the image's", [img("ok.jpg", width=640, height=480)],
         ("width/height say 640x480",)),
    Case("width_as_string", "trains", "`width` as a string", [img("ok.jpg", width="64", height=48)],
         ("width/height must be integers",)),
    Case("per_line_length", "trains", "a `length` per line", [img("ok.jpg", length=40)]),
    Case("repeat_half", "trains", "`repeat_time: 0.5`", [img("ok.jpg"), img("rgba.png")], entry=(("repeat_time", 0.5),)),
    Case("repeat_zero_beside_others", "trains", "one dataset with `repeat_time: 0` among others", [img("ok.jpg")],
         ("contributes no samples",), entry=(("repeat_time", 0),)),
    Case("empty_file_beside_others", "trains", "one empty JSONL among others", b"", ("contributes no samples",)),
    Case("root_with_spaces", "trains", "`root` with spaces and non-ASCII letters", [img("ok.jpg")],
         entry=(("root", "my media 图片"),)),
    Case("symlinked_root", "trains", "`root` that is a symlink to another disk", [img("ok.jpg")],
         entry=(("root", "linked_media"),)),
    # ---- one unusable sample: error ---------------------------------------------------------------------------------
    Case("truncated_line", "error", "a line cut off in the middle", [b'{"image": "ok.jpg", "conversations": ['],
         ("invalid JSON", "one complete JSON object")),
    Case("trailing_comma", "error", "trailing comma", [b'{"image": "ok.jpg", "conversations": [],}'], ("invalid JSON",)),
    Case("single_quotes", "error", "Python dict with single quotes", [b"{'image': 'ok.jpg'}"], ("invalid JSON", "double quotes")),
    Case("latin1_line", "error", "Latin-1 (non-UTF-8) line",
         ['{"conversations": [{"from": "human", "value": "café"}, {"from": "gpt", "value": "x"}]}'.encode("latin-1")],
         ("not UTF-8 text", "save the file as UTF-8")),
    Case("nul_bytes", "error", "NUL bytes inside a line", [b'{"conversations": [{"from": "human", "value": "a\x00b"}]}'],
         ("invalid JSON", "Invalid control character")),
    Case("nul_line", "error", "a line of NUL bytes (a file preallocated by a crashed writer)", [b"\x00" * 40],
         ("invalid JSON",)),
    Case("json_array", "error", "a JSON list instead of an object", [[1, 2]], ("the line is a JSON list, not an object",)),
    Case("error_after_blank_lines", "error", "a bad line after blank lines keeps its own line number",
         b"\n\n" + b'{"image": 5}\n', ("`image` must be a path",), line=3),
    Case("missing_conversations", "error", "no `conversations`", [{"image": "ok.jpg"}],
         ("`conversations` must be a non-empty list",)),
    Case("conversations_string", "error", "`conversations` is a string", [{"conversations": "Hi"}],
         ("`conversations` must be a non-empty list",)),
    Case("role_content_keys", "error", "OpenAI-style `role`/`content` turns",
         [{"conversations": [{"role": "user", "content": "Hi"}]}], ('conversations[0] must be an object with keys "from"',)),
    Case("unknown_role", "error", "role `user`",
         [img("ok.jpg", conversations=[{"from": "user", "value": "Hi"}, {"from": "gpt", "value": "x"}])],
         ("conversations[0].from is 'user'",)),
    Case("not_alternating", "error", "two gpt turns in a row", [img("ok.jpg", conversations=turns() + [{"from": "gpt", "value": "x"}])],
         ("turns must alternate",)),
    Case("empty_value", "error", "empty answer", [img("ok.jpg", conversations=turns(answer=""))],
         ("conversations[1].value is empty",)),
    Case("whitespace_value", "error", "answer of spaces only (stripped by the template)",
         [img("ok.jpg", conversations=turns(answer="   "))], ("conversations[1].value is empty",)),
    Case("null_value", "error", "`value: null`", [img("ok.jpg", conversations=turns(answer=None))],
         ("conversations[1].value must be a string",)),
    Case("no_gpt_turn", "error", "question without an answer", [img("ok.jpg", conversations=turns()[:1])], ("no gpt turn",)),
    Case("system_turn", "error", "a system turn with a template that has none",
         [{"conversations": [{"from": "system", "value": "Be brief."}] + turns("Hi")}], ('conversations[0].from is "system"',)),
    Case("reserved_token", "error", "`<|im_end|>` inside a message", [img("ok.jpg", conversations=turns(answer="a <|im_end|> b"))],
         ("reserved token",)),
    Case("image_count_mismatch", "error", "two images, one `<image>`", [img(["ok.jpg", "rgba.png"])],
         ("`image` lists 2 image(s) but the human turns hold 1 <image>",)),
    Case("two_placeholders_one_image", "error", "one image, two `<image>`",
         [img("ok.jpg", conversations=turns("<image>\n<image>\nWhat?"))], ("single-image sample has 2 <image>",)),
    Case("placeholder_in_answer", "error", "`<image>` inside an answer",
         [img("ok.jpg", conversations=turns(answer="See <image>."))], ("a gpt answer contains <image>",)),
    Case("placeholder_without_image", "error", "`<image>` on a text sample", [{"conversations": turns()}],
         ("pure-text sample", "contains 1 placeholder")),
    Case("image_and_video", "error", "both `image` and `video`", [img("ok.jpg", video="clip.mp4")],
         ("both `image` and `video`",)),
    Case("image_list_with_null", "error", "image list holding a null", [img(["ok.jpg", None],
                                                                            conversations=turns("<image>\n<image>\nx"))],
         ("`image` list must hold non-empty path strings",)),
    Case("image_not_a_string", "error", "`image` is a number", [img(123)], ("`image` must be a path or a list of paths",)),
    Case("preference_line", "error", "a DPO line in a supervised dataset",
         [{"image": "ok.jpg", "question": "<image>\nQ", "chosen": "a", "rejected": "b"}], ("a preference line",)),
    Case("bad_clip", "error", "`clip` that is not [start, end]", [vid("clip.mp4", clip="0-5")], ("`clip` must be [start_seconds",)),
    Case("missing_image", "error", "image file not there", [img("nope.jpg")], ("image not found: nope.jpg (looked for",)),
    Case("zero_byte_image", "error", "empty image file", [img("zero.jpg")], ("cannot decode image", "the file is empty (0 bytes)")),
    Case("truncated_jpeg", "error", "JPEG cut off in the middle", [img("truncated.jpg")], ("cannot decode image", "truncated")),
    Case("html_as_jpeg", "error", "an HTML error page saved as .jpg", [img("html.jpg")], ("cannot decode image", "html.jpg")),
    Case("decompression_bomb", "error", "PNG claiming 40000x40000 pixels", [img("bomb.png")], ("too large to decode safely",)),
    Case("directory_as_image", "error", "a folder where an image should be", [img("sub")], ("is a folder, not a file",)),
    Case("dotdot_outside", "error", "`../` path leaving the root", [img("../outside.jpg")], ("points outside the dataset root",)),
    Case("absolute_outside", "error", "absolute path outside the root", [img("/etc/hostname")], ("points outside the dataset root",)),
    Case("symlink_outside", "error", "symlink inside the root to a file outside it", [img("escape.jpg")],
         ("through a symlink to",)),
    Case("zero_byte_video", "error", "empty video file", [vid("zero.mp4")], ("cannot decode video", "the file is empty (0 bytes)")),
    Case("garbage_video", "error", "random bytes as .mp4", [vid("garbage.mp4")],
         ("cannot decode video", "Invalid data found when processing input")),
    Case("missing_video", "error", "video file not there", [vid("nope.mp4")], ("video not found: nope.mp4 (looked for",)),
    Case("empty_frame_folder", "error", "an empty folder as a video", [vid("no_frames")], ("holds no frames",)),
    # ---- the meta JSON itself: refused ------------------------------------------------------------------------------
    Case("duplicate_dataset_name", "refused", "the same dataset name twice in the meta JSON", [img("ok.jpg")],
         ("dataset name 'duplicate_dataset_name' is given twice (also at line 2)",), line=3,
         meta='{{\n "{name}": {{"root": "media", "annotation": "{name}.jsonl"}},\n'
              ' "{name}": {{"root": "media", "annotation": "{name}.jsonl"}}\n}}\n'),
    Case("duplicate_key", "refused", "`root` twice in one dataset", [img("ok.jpg")], ("key 'root' is given twice",), line=3,
         meta='{{\n "{name}": {{"root": "media",\n  "root": "media", "annotation": "{name}.jsonl"}}\n}}\n'),
    Case("meta_bom_crlf", "trains", "meta JSON with a BOM and CRLF line endings (this group's own meta JSON)", [img("ok.jpg")]),
    Case("only_empty_file", "refused", "the only dataset is an empty file", b"",
         ("the meta JSON gives no samples: dataset 'only_empty_file' has 0 line(s)",)),
    Case("only_blank_lines", "refused", "the only dataset holds blank lines only", b"\n \n\r\n",
         ("gives no samples", "has 0 line(s)")),
    Case("all_repeat_zero", "refused", "every dataset has `repeat_time: 0`", [img("ok.jpg")],
         ("gives no samples", "repeat_time 0"), entry=(("repeat_time", 0),)),
    Case("annotation_missing", "refused", "annotation file not there (both places named)", [img("ok.jpg")],
         ("annotation file not found: gone.jsonl (looked for",), entry=(("annotation", "gone.jsonl"),)),
    Case("annotation_is_folder", "refused", "annotation that is a folder", [img("ok.jpg")], ("is a folder",),
         entry=(("annotation", "media.jsonl"),)),
    Case("meta_trailing_comma", "refused", "trailing comma in the meta JSON", [img("ok.jpg")], ("invalid JSON",), line=2,
         meta='{{"{name}": {{"root": "media", "annotation": "{name}.jsonl",\n}}}}\n'),
    Case("meta_latin1", "refused", "meta JSON in Latin-1", [img("ok.jpg")], ("the meta JSON is not UTF-8 text",),
         meta='{{"{name}": {{"root": "médias", "annotation": "{name}.jsonl"}}}}'),
    Case("meta_list", "refused", "meta JSON that is a list", [img("ok.jpg")], ("must be an object mapping dataset names",),
         meta='["{name}.jsonl"]'),
    Case("misspelled_key", "refused", "`anotation` misspelled", [img("ok.jpg")], ("unknown key(s) ['anotation']",),
         meta='{{"{name}": {{"root": "media", "anotation": "{name}.jsonl"}}}}'),
]


def write_media(folder: Path) -> None:
    """The image and video files the cases name."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    photo = Image.open(SAMPLE / "images" / "chelsea.jpg").convert("RGB").resize((64, 48))
    photo.save(folder / "ok.jpg")
    photo.convert("RGBA").save(folder / "rgba.png")
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    photo.convert("L").save(folder / "gray.jpg")
    photo.save(folder / "photo.webp")
    photo.save(folder / "PHOTO.JPG")
    photo.save(folder / "png_named.jpg", format="PNG")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "one_pixel.png")
    Image.new("RGB", (4000, 2), (10, 200, 10)).save(folder / "wide.png")
    exif = photo.getexif()
    exif[0x0112] = 6
    photo.save(folder / "exif.jpg", exif=exif.tobytes())
    photo.save(folder / "anim.gif", save_all=True, append_images=[photo.rotate(90), photo.rotate(180)], duration=100)
    palette = photo.convert("P")
    palette.save(folder / "palette.png", transparency=0)
    Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)).save(folder / "gray16.png")
    (folder / "my photos").mkdir(exist_ok=True)
    photo.save(folder / "my photos" / "猫 1.jpg")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "frames").mkdir(exist_ok=True)
    for k in range(1, 5):
        photo.rotate(10 * k).save(folder / "frames" / f"frame_{k}.jpg")
    (folder / "no_frames").mkdir(exist_ok=True)
    shutil.copy(SAMPLE / "videos" / "chelsea_short.mp4", folder / "clip.mp4")
    good = (folder / "ok.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "html.jpg").write_bytes(b"<html><body>404 Not Found</body></html>\n" * 8)
    (folder / "bomb.png").write_bytes(png_claiming(40_000, 40_000))
    (folder / "zero.mp4").write_bytes(b"")
    (folder / "garbage.mp4").write_bytes(bytes(range(256)) * 8)
    os.symlink("ok.jpg", folder / "link.jpg")
    os.symlink("/etc/hostname", folder / "escape.jpg")
    photo.save(folder.parent / "outside.jpg")


def build(root: Path) -> dict[str, Path]:
    """Write the corpus under ``root``; returns the meta JSON of each group (``refused``: a folder of meta JSONs)."""
    metas = {}
    for group in ("trains", "error"):
        folder = root / group
        write_media(folder / "media")
        entries = {}
        for case in (c for c in CASES if c.group == group):
            (folder / f"{case.name}.jsonl").write_bytes(case.content())
            entries[case.name] = {"root": "media", "annotation": f"{case.name}.jsonl", **dict(case.entry)}
        if group == "error":  # usable samples to replace the broken ones with
            (folder / "good.jsonl").write_bytes(Case("good", "trains", "", [img("ok.jpg")] * 3).content())
            entries["good"] = {"root": "media", "annotation": "good.jsonl"}
        else:
            shutil.copytree(folder / "media", folder / "my media 图片", symlinks=True)
            os.symlink(folder / "media", folder / "linked_media")
        # relative paths beside the meta file (the tests run from another directory); BOM and CRLF as Windows writes
        text = json.dumps(entries, indent=1, ensure_ascii=False).replace("\n", "\r\n")
        (folder / "meta.json").write_bytes(BOM + text.encode())
        metas[group] = folder / "meta.json"
    folder = root / "refused"
    write_media(folder / "media")
    for case in (c for c in CASES if c.group == "refused"):
        (folder / f"{case.name}.jsonl").write_bytes(case.content())
        if case.meta is not None:
            text = case.meta.format(name=case.name)
        else:
            text = json.dumps({case.name: {"root": "media", "annotation": f"{case.name}.jsonl", **dict(case.entry)}})
        (folder / f"{case.name}.json").write_bytes(text.encode("latin-1" if case.name == "meta_latin1" else "utf-8"))
    (folder / "media.jsonl").mkdir()
    metas["refused"] = folder
    return metas


def table() -> str:
    """The docs/reliability.md table of every case and what a user gets."""
    rows = ["| case | input | `data check` | `train` (default workers) |", "|---|---|---|---|"]
    for c in CASES:
        said = "; ".join(f"`{e}`" for e in c.expect)
        if c.group == "trains":
            check = f"warning {said}" if said else "clean"
            train = "trains"
        elif c.group == "error":
            check = f"error at `file:{c.line}`: {said}"
            train = "exit 2 with the same line (skipped and listed with `--max_skipped_samples`)"
        else:
            check = f"error at `meta.json:{c.line}`: {said}"
            train = "exit 2 with the same line"
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in (c.name, c.what, check, train)) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
