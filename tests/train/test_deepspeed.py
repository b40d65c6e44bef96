"""``--deepspeed ds_config.json``: what maps onto FSDP2 is translated (and said in the plan), the rest refused by key.

The DeepSpeed files here are written by hand in the shapes the transformers Trainer and the reference scripts use
(``"auto"`` values, bucket sizes, offload sections).
"""

import argparse
import json
import os
from pathlib import Path

import pytest
import torch
from reference_fixtures import checkpoint

from internvl_tune.cli.train import sections
from internvl_tune.dist.parallelize import move_to_device
from internvl_tune.errors import UserError
from internvl_tune.models.internvl_chat.recipe import IGNORED_FLAGS
from internvl_tune.train.config import build_arg_parser, load_config
from internvl_tune.train.deepspeed import translate

ZERO3_AUTO = {  # the usual transformers-Trainer file: everything "auto", tuning knobs
    "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
                          "stage3_prefetch_bucket_size": 1e9, "stage3_gather_16bit_weights_on_model_save": True},
    "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto", "steps_per_print": 2000, "wall_clock_breakdown": False,
}


def _write(tmp_path: Path, config: dict, name="ds.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return str(path)


def _parse(argv):
    parser = build_arg_parser(argparse.ArgumentParser(), sections(), IGNORED_FLAGS)
    return load_config(parser.parse_args(argv), sections())


def test_an_all_auto_zero3_file_reshards_after_forward_and_changes_no_flag(tmp_path):
    t = translate(_write(tmp_path, ZERO3_AUTO))
    assert (t.stage, t.reshard_after_forward, t.offload, t.settings) == (3, True, False, {})
    assert {"zero_optimization.overlap_comm", "fp16.loss_scale", "steps_per_print"} <= set(t.not_applicable)
    line = t.plan_line(world_size=2)
    assert "ZeRO-3" in line and "reshard_after_forward=True" in line and "zero_optimization.overlap_comm" in line
    cfg = _parse(["--deepspeed", _write(tmp_path, ZERO3_AUTO), "--learning_rate", "3e-5"])
    assert cfg.train.learning_rate == 3e-5 and cfg.train.max_grad_norm == 1.0 and not cfg.train.bf16


def test_stage_2_with_offload_keeps_blocks_gathered_and_offloads(tmp_path):
    config = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}}}
    t = translate(_write(tmp_path, config))
    assert (t.stage, t.reshard_after_forward, t.offload, t.pin_memory) == (2, False, True, False)
    assert "CPUOffloadPolicy(pin_memory=False)" in t.plan_line(2)


def test_values_set_flags_and_a_disagreeing_flag_is_refused(tmp_path):
    config = {"bf16": {"enabled": True}, "gradient_clipping": 0.3, "train_micro_batch_size_per_gpu": 2,
              "gradient_accumulation_steps": 4, "train_batch_size": 8,
              "optimizer": {"type": "AdamW", "params": {"lr": 2e-5, "betas": [0.9, 0.95], "eps": 1e-6,
                                                       "weight_decay": 0.05}}}
    path = _write(tmp_path, config)
    cfg = _parse(["--deepspeed", path]).train
    assert (cfg.bf16, cfg.max_grad_norm, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == \
        (True, 0.3, 2, 4)
    assert (cfg.learning_rate, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon, cfg.weight_decay) == \
        (2e-5, 0.9, 0.95, 1e-6, 0.05)
    assert _parse(["--deepspeed", path, "--max_grad_norm", "0.3"]).train.max_grad_norm == 0.3  # the same: fine
    with pytest.raises(UserError, match=r"gradient_clipping=0.3 but --max_grad_norm 1.0"):
        _parse(["--deepspeed", path, "--max_grad_norm", "1.0"])


def test_train_batch_size_must_be_micro_times_accumulation_times_ranks(tmp_path, monkeypatch):
    path = _write(tmp_path, {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2})
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert _parse(["--deepspeed", path, "--gradient_accumulation_steps", "2"]).train.per_device_train_batch_size == 2
    with pytest.raises(UserError, match=r"train_batch_size=16 but 2 per device x 1 accumulation x 4 ranks = 8"):
        _parse(["--deepspeed", path])


def test_a_warmup_decay_scheduler_with_linear_warmup_maps_to_linear(tmp_path):
    config = {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-4,
                                                               "warmup_num_steps": 10, "total_num_steps": 100,
                                                               "warmup_type": "linear"}}}
    cfg = _parse(["--deepspeed", _write(tmp_path, config)]).train
    assert (cfg.lr_scheduler_type, cfg.learning_rate, cfg.warmup_steps, cfg.max_steps) == ("linear", 1e-4, 10, 100)


def test_what_cannot_be_honoured_is_refused_naming_every_key(tmp_path):
    config = {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/nvme"}},
              "fp16": {"enabled": True}, "optimizer": {"type": "Lamb", "params": {"lr": 1e-3}},
              "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5}},
              "pipeline": {"stages": 2}}
    with pytest.raises(UserError) as info:
        translate(_write(tmp_path, config))
    message = str(info.value)
    for key in ("zero_optimization.offload_param.device='nvme'", "fp16.enabled=true", "optimizer.type='Lamb'",
                "scheduler.params.warmup_type", "pipeline.stages"):
        assert key in message, key


def test_a_missing_file_is_an_error_unless_it_is_a_reference_file_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = translate("zero_stage3_config_100b_1e7_offload.json")  # the reference scripts' name, not in this folder
    assert (t.stage, t.offload) == (3, True) and "InternVL reference" in t.origin
    assert translate("zero_stage1_config.json").reshard_after_forward is False
    with pytest.raises(UserError, match="my_ds.json: file not found"):
        translate("my_ds.json")
    (tmp_path / "bad.json").write_text("{stage: 3")
    with pytest.raises(UserError, match="not valid JSON"):
        translate("bad.json")


def test_offload_placement_keeps_the_chosen_parameters_on_the_cpu():
    """CPU offload: FSDP2's shards stay on the CPU, everything else (frozen parameters, buffers) goes to the device
    (the meta device stands in for a GPU here)."""
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    module[1].weight.requires_grad_(False)
    move_to_device(module, "meta", keep_on_cpu=lambda p: p.requires_grad)
    assert module[0].weight.device.type == "cpu" and module[1].weight.device.type == "meta"
    assert module[1].running_mean.device.type == "meta"


def _two_steps(model: str, meta: str, out: str, per_device: int, deepspeed: str | None) -> list[tuple[float, float]]:
    from train_helpers import run_chat

    from internvl_tune.data.config import DataConfig
    from internvl_tune.models.internvl_chat.recipe import ModelArgs
    from internvl_tune.train.config import RunConfig, TrainArgs
    from internvl_tune.train.metrics import read_jsonl

    cfg = RunConfig(
        model=ModelArgs(model_name_or_path=model, grad_checkpoint="False"),
        data=DataConfig(meta_path=meta, max_dynamic_patch=2, max_seq_length=1024),
        train=TrainArgs(output_dir=out, max_steps=2, per_device_train_batch_size=per_device, learning_rate=1e-3,
                        lr_scheduler_type="constant", logging_steps=1, save_steps=1000, dataloader_num_workers=0,
                        report_to="none", seed=0, device="cpu", torch_compile="False", deepspeed=deepspeed))
    run_chat(cfg)
    if os.environ.get("RANK", "0") == "0":  # the plan line names the file only when one is given
        plan = (Path(out) / "train.log").read_text().split("step 1/")[0]
        assert ("ZeRO-2 -> FSDP2 keeps each block's parameters gathered" in plan) == (deepspeed is not None)
    return [(r["loss"], r["grad_norm"]) for r in read_jsonl(Path(out) / "metrics.jsonl") if "loss" in r]


def test_zero2_with_cpu_offload_on_two_ranks_trains_as_one_process(tmp_path, subset_meta):
    """Two gloo ranks with blocks kept gathered and CPU offload (the whole offload code path: CPU shards, the
    optimizer step where they live) give the losses and gradient norms of one process with the whole batch."""
    from train_helpers import spawn

    model, meta = str(checkpoint("internvl2-1b")), str(subset_meta(tmp_path, 4))
    ds = _write(tmp_path, {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})
    plain = _two_steps(model, meta, str(tmp_path / "plain"), 4, None)
    offloaded = spawn(2, _two_steps, model, meta, str(tmp_path / "offloaded"), 2, ds)
    assert len(plain) == 2 and plain[0][1] > 0
    for (loss_a, norm_a), (loss_b, norm_b) in zip(plain, offloaded):
        assert abs(loss_a - loss_b) <= 1e-5 * loss_a and abs(norm_a - norm_b) <= 1e-5 * norm_a


def test_the_memory_estimate_follows_resharding_and_offload():
    from internvl_tune.train.memory import estimate_training_memory

    blocks = [torch.nn.Linear(4, 4, bias=False) for _ in range(3)]  # 16 trainable weights each
    model = torch.nn.Sequential(*blocks)
    shape = dict(world_size=2, tokens_per_micro_batch=1, hidden=1, ffn=1, num_layers=1, grad_checkpoint=1.0)
    gib = 2**30
    zero3 = estimate_training_memory(model, blocks, **shape)
    assert zero3.model_states * gib == 48 * 16 / 2  # fp32 master + gradient + 2 moments, over 2 ranks
    assert zero3.gathered_params * gib == 2 * 16 * 2  # the biggest block and the prefetched next, in bf16
    zero2 = estimate_training_memory(model, blocks, reshard_after_forward=False, **shape)
    assert zero2.gathered_params * gib == 3 * 16 * 2  # every block, gathered until its backward
    offloaded = estimate_training_memory(model, blocks, cpu_offload=True, **shape)
    assert offloaded.model_states == 0 and offloaded.gathered_params == zero3.gathered_params
