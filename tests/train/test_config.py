"""Training flags: reference names, booleans with optional values, YAML presets and precedence."""

import argparse

import pytest

from internvl_tune.cli.train import sections
from internvl_tune.errors import UserError
from internvl_tune.models.internvl_chat.recipe import IGNORED_FLAGS
from internvl_tune.train.config import build_arg_parser, load_config


def _parse(argv):
    return load_config(build_arg_parser(argparse.ArgumentParser(), sections(), IGNORED_FLAGS).parse_args(argv), sections())


def test_reference_style_flags():
    cfg = _parse(["--freeze_backbone", "True", "--freeze_llm", "False", "--bf16", "--use_llm_lora", "16",
                  "--deepspeed", "zero_stage1_config.json", "--learning_rate", "2e-5", "--conv_style", "Hermes-2"])
    assert cfg.model.freeze_backbone and not cfg.model.freeze_llm and cfg.train.bf16
    assert cfg.model.use_llm_lora == 16 and cfg.train.learning_rate == 2e-5 and cfg.data.conv_style == "Hermes-2"


def test_yaml_sections_flat_keys_and_flag_precedence(tmp_path):
    preset = tmp_path / "run.yaml"
    preset.write_text("model:\n  use_llm_lora: 8\ndata:\n  max_seq_length: 4096\nlearning_rate: 1e-4\nbf16: true\n")
    cfg = _parse(["--config", str(preset), "--max_seq_length", "2048"])
    assert cfg.model.use_llm_lora == 8 and cfg.train.learning_rate == 1e-4 and cfg.train.bf16
    assert cfg.data.max_seq_length == 2048  # the flag beats the file
    assert cfg.train.seed == 42  # untouched defaults stay


def test_unknown_yaml_key_and_bad_value_are_user_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lerning_rate: 1e-4\n")
    with pytest.raises(UserError, match="lerning_rate"):
        _parse(["--config", str(bad)])
    bad.write_text("train:\n  bf16: maybe\n")
    with pytest.raises(UserError, match="bf16"):
        _parse(["--config", str(bad)])
