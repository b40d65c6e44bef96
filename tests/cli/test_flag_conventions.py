"""One spelling per concept in every command's ``--help`` (the training command's), and every older spelling still
parses to the same value (the seeds' ``clip_benchmark/cli.py`` and ``evaluate.sh`` command lines, scripts, docs)."""

from __future__ import annotations

import argparse

import pytest

from internvl_tune.cli import COMMANDS, GROUPS, build_parser
from internvl_tune.cli.completion import command_words

# canonical spelling -> the other spellings of the same concept, which must never be shown
CONCEPTS = {
    "--model_name_or_path": {"--model", "--checkpoint", "--pretrained"},
    "--output_dir": {"--out_dir", "--out", "--output"},
    "--output_file": {"--out", "--output"},
    "--overwrite_output_dir": {"--overwrite"},
    "--data_root": {"--root"},
    "--dynamic_image_size": {"--dynamic"},
    "--max_dynamic_patch": {"--max_num", "--max_tiles"},
    "--amp": {"--no_amp"},
    "--verbose": {"--quiet"},
    "--dataloader_num_workers": {"--num_workers"},
    "--use_llm_lora": {"--lora_rank"},
}
# clip_benchmark's --model is a model *name* (internvl_c_retrieval_hf), another concept, kept as its users type it
OTHER_CONCEPT = {("eval retrieval", "--model")}

# the canonical spellings each command must show, by hand from the commands' jobs
EXPECTED = {
    "train": {"--model_name_or_path", "--output_dir", "--overwrite_output_dir", "--dynamic_image_size",
              "--max_dynamic_patch"},
    "retrieval-train": {"--model_name_or_path", "--output_dir", "--overwrite_output_dir", "--data_root"},
    "data check": {"--model_name_or_path", "--dynamic_image_size", "--max_dynamic_patch"},
    "data prepare": {"--data_root"},
    "eval chat": {"--model_name_or_path", "--output_dir", "--dtype", "--data_root", "--dynamic_image_size",
                  "--max_dynamic_patch", "--dataloader_num_workers"},
    "eval caption": {"--model_name_or_path", "--output_dir", "--dtype", "--data_root", "--dynamic_image_size",
                     "--max_dynamic_patch", "--dataloader_num_workers"},
    "eval retrieval": {"--model_name_or_path", "--output_file", "--dtype", "--amp", "--verbose",
                       "--dataloader_num_workers"},
    "chat": {"--dtype", "--max_dynamic_patch"},  # (the model is its first word, as for convert and merge-lora)
    "convert": {"--dtype", "--overwrite_output_dir"},
    "merge-lora": {"--output_dir", "--dtype", "--overwrite_output_dir"},
    "tiny-model": {"--output_dir"},
    "report": {"--output_file"},
    "demo": {"--output_dir", "--use_llm_lora"},
}
PATHS = [(name,) for name, _, _ in COMMANDS if name not in GROUPS]
PATHS += [(group, name) for group, commands in GROUPS.items() for name, _, _ in commands]


def _parser(path: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = build_parser(list(path))
    for name in path:
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = sub.choices[name]
    return parser


def _shown(parser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS
            and not isinstance(a, argparse._HelpAction)]


def _parse(argv: list[str]) -> dict:
    values = vars(build_parser(argv).parse_args(argv))
    values.pop("func")
    return values


@pytest.mark.parametrize("path", PATHS, ids=" ".join)
def test_each_concept_has_its_canonical_spelling_in_help(path):
    command = " ".join(path)
    parser = _parser(path)
    shown = {opt for action in _shown(parser) for opt in action.option_strings}
    others = {opt: canonical for canonical, spellings in CONCEPTS.items() for opt in spellings}
    wrong = [f"{opt} (spell it {others[opt]})" for opt in sorted(shown)
             if opt in others and (command, opt) not in OTHER_CONCEPT]
    assert wrong == []
    assert EXPECTED.get(command, set()) <= shown
    for action in _shown(parser):
        # one style of boolean: --flag, --flag True, --flag False (no bare store_true / store_false switches)
        assert not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)), action.option_strings
        if "--dtype" in action.option_strings:  # one choice set; auto or keep where the command has them
            assert {"bf16", "fp16", "fp32"} <= set(action.choices) <= {"auto", "keep", "bf16", "fp16", "fp32"}
            assert [action.type(t) for t in ("bfloat16", "float16", "float32", "BF16")] == ["bf16", "fp16", "fp32",
                                                                                           "bf16"]


def test_completion_offers_only_the_canonical_spellings():
    others = {opt for spellings in CONCEPTS.values() for opt in spellings}
    for path, (words, _) in command_words().items():
        offered = {w for w in words if w.startswith("--")} & others
        assert offered <= {opt for command, opt in OTHER_CONCEPT if command == path}, (path, offered)


# (older spellings, canonical spellings): the same parsed values
SAME = [
    # the InternVL README's clip_benchmark command line, as clip_benchmark/cli.py forwards it
    (["eval", "retrieval", "--model_type", "internvl", "--language", "en", "--task", "zeroshot_retrieval", "--dataset",
      "flickr30k", "--dataset_root", "./data/flickr30k", "--model", "internvl_c_retrieval_hf", "--pretrained",
      "./work_dirs/ft/", "--output", "result_ft.json", "--no_amp", "--quiet", "--dtype", "float16"],
     ["eval", "retrieval", "--model_type", "internvl", "--language", "en", "--task", "zeroshot_retrieval", "--dataset",
      "flickr30k", "--dataset_root", "./data/flickr30k", "--model", "internvl_c_retrieval_hf", "--model_name_or_path",
      "./work_dirs/ft/", "--output_file", "result_ft.json", "--amp", "False", "--verbose", "False", "--dtype", "fp16"]),
    # what evaluate.sh passed, and the reference's evaluate scripts' flags
    (["eval", "caption", "--model", "m", "--datasets", "coco", "--out-dir", "o", "--dynamic", "--max-num", "4",
      "--dtype", "bfloat16"],
     ["eval", "caption", "--model_name_or_path", "m", "--datasets", "coco", "--output_dir", "o",
      "--dynamic_image_size", "True", "--max_dynamic_patch", "4", "--dtype", "bf16"]),
    (["eval", "caption", "--checkpoint", "m", "--out_dir", "o", "--max_num", "2"],
     ["eval", "caption", "--model_name_or_path", "m", "--output_dir", "o", "--max_dynamic_patch", "2"]),
    (["eval", "chat", "--model", "m", "--meta_path", "v.json", "--out_dir", "o", "--dtype", "float32"],
     ["eval", "chat", "--model_name_or_path", "m", "--meta_path", "v.json", "--output_dir", "o", "--dtype", "fp32"]),
    (["merge-lora", "a", "--out", "o", "--overwrite", "--dtype", "bfloat16"],
     ["merge-lora", "a", "--output_dir", "o", "--overwrite_output_dir", "True", "--dtype", "bf16"]),
    (["convert", "s", "d", "--to", "native", "--overwrite", "--dtype", "float16"],
     ["convert", "s", "d", "--to", "native", "--overwrite_output_dir", "--dtype", "fp16"]),
    (["chat", "m", "hi", "--max_tiles", "3", "--dtype", "float32"],
     ["chat", "m", "hi", "--max_dynamic_patch", "3", "--dtype", "fp32"]),
    (["data", "prepare", "coco", "--root", "d"], ["data", "prepare", "coco", "--data_root", "d"]),
    (["tiny-model", "--like", "internvl2-1b", "--out", "o"], ["tiny-model", "--like", "internvl2-1b", "--output_dir", "o"]),
    (["report", "r", "--out", "x.html"], ["report", "r", "--output_file", "x.html"]),
    (["demo", "--out", "o"], ["demo", "--output_dir", "o"]),
    (["demo", "--lora_rank", "8"], ["demo", "--use_llm_lora", "8"]),
    (["eval", "caption", "--model_name_or_path", "m", "--num_workers", "3"],
     ["eval", "caption", "--model_name_or_path", "m", "--dataloader_num_workers", "3"]),
]


@pytest.mark.parametrize("old, new", SAME, ids=[f"{i}-{'-'.join(old[:2])}" for i, (old, _) in enumerate(SAME)])

def test_older_spellings_parse_to_the_same_values(old, new):
    assert _parse(old) == _parse(new)


def test_the_seed_retrieval_command_reads_as_clip_benchmark_meant_it():
    values = _parse(SAME[0][0])
    assert (values["model"], values["model_name_or_path"], values["output_file"], values["amp"], values["verbose"],
            values["dtype"]) == ("internvl_c_retrieval_hf", "./work_dirs/ft/", "result_ft.json", False, False, "fp16")


def test_a_required_flag_is_met_by_any_spelling_and_missing_names_the_canonical_one(capsys):
    assert _parse(["eval", "caption", "--checkpoint", "m"])["model_name_or_path"] == "m"
    with pytest.raises(SystemExit) as stop:
        _parse(["eval", "retrieval"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--model_name_or_path" in err and "--pretrained" not in err


def test_chat_reads_model_and_question_with_flags_between():
    values = _parse(["chat", "m", "--image", "a.jpg", "--max_tiles", "2", "Who?"])
    assert (values["model"], values["question"], values["image"], values["max_dynamic_patch"]) == ("m", "Who?",
                                                                                                   ["a.jpg"], 2)

