"""The objectives registry: one entry per objective gives its flags, its recipe and its data reader; the train
command, the run config and `data check` are built from it, and a new entry is all a new objective needs."""

import dataclasses
from dataclasses import dataclass

import pytest

from internvl_tune.data.dataset import SupervisedDataset
from internvl_tune.data.preference import PreferenceDataset
from internvl_tune.errors import UserError
from internvl_tune.models.internvl_chat import objectives
from internvl_tune.models.internvl_chat.objectives import OBJECTIVES, Objective, build_recipe, objective_section
from internvl_tune.models.internvl_chat.objectives.preference import PreferenceRecipe
from internvl_tune.models.internvl_chat.recipe import ChatRecipe, ModelArgs
from internvl_tune.options import option


def test_each_entry_names_its_recipe_flags_and_reader():
    assert list(OBJECTIVES) == ["sft", "dpo", "mpo", "grpo", "gspo"]
    assert (OBJECTIVES["sft"].recipe, OBJECTIVES["sft"].args, OBJECTIVES["sft"].reader) == \
        (ChatRecipe, None, SupervisedDataset)
    assert OBJECTIVES["mpo"].recipe is PreferenceRecipe and OBJECTIVES["mpo"].reader is PreferenceDataset


def test_the_train_command_has_one_flag_per_registered_field(capsys):
    from internvl_tune.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for entry in OBJECTIVES.values():
        assert f"{entry.name} (" in out
        for f in dataclasses.fields(entry.args) if entry.args else ():
            if f.metadata.get("flag", True):
                assert out.count(f"--{f.name} ") >= 1, f.name
    assert "--beta BETA dpo, mpo: KL coefficient of the preference losses (default: 0.1)" in out


def test_a_flag_of_another_objective_is_refused_naming_its_objectives():
    section = objective_section()
    with pytest.raises(UserError, match=r"--rpo_alpha is a flag of --objective dpo / mpo, not of sft: add "
                                        r"--objective dpo"):
        section(objective="sft", rpo_alpha=1.0).resolve()
    assert section(objective="sft").resolve() is None
    mpo = section(objective="mpo", beta=0.5).resolve()
    assert (mpo.objective, mpo.beta, mpo.rpo_alpha, mpo.losses) == ("mpo", 0.5, 1.0, ("sigmoid", "bco_pair"))


def test_yaml_and_flags_fill_the_objective_section(tmp_path):
    from internvl_tune.cli.train import sections
    from internvl_tune.train.config import build_arg_parser, load_config

    yaml = tmp_path / "run.yaml"
    yaml.write_text("objective: dpo\nbeta: 0.3\nmodel:\n  model_name_or_path: m\n")
    parser = build_arg_parser(__import__("argparse").ArgumentParser(), sections(), {})
    cfg = load_config(parser.parse_args(["--config", str(yaml), "--loss_type", "sigmoid,bco_pair"]), sections())
    assert (cfg.objective.objective, cfg.objective.beta, cfg.objective.loss_type) == ("dpo", 0.3, "sigmoid,bco_pair")
    assert cfg.to_dict()["objective"]["objective"] == "dpo"


def test_build_recipe_passes_the_resolved_flags_and_the_collectives(tiny_1b):
    from internvl_tune.data.config import DataConfig
    from internvl_tune.models.internvl_chat.objectives import Collectives

    summed = []
    model, data = ModelArgs(model_name_or_path=str(tiny_1b)), DataConfig(meta_path="m.json")
    sft = build_recipe(model, data, objective_section()(objective="sft"))
    assert type(sft) is ChatRecipe
    dpo = build_recipe(model, data, objective_section()(objective="dpo", beta=0.2),
                       Collectives(all_reduce_sum=summed.append))
    assert type(dpo) is PreferenceRecipe and dpo.preference.beta == 0.2 and dpo.preference.loss_type == "sigmoid"
    dpo.all_reduce_sum(7)
    assert summed == [7]


@dataclass
class ToyArgs:
    """A new objective's flags: one shared with dpo/mpo (same name, same type), one of its own."""

    objective: str = option("toy", "set by --objective", flag=False)
    beta: float | None = option(None, "toy KL coefficient (default: 1)")
    toy_temperature: float | None = option(None, "how warm the toy is (default: 2)")

    def resolve(self):
        return dataclasses.replace(self, beta=1.0 if self.beta is None else self.beta,
                                   toy_temperature=2.0 if self.toy_temperature is None else self.toy_temperature)


class ToyRecipe(ChatRecipe):
    @classmethod
    def from_objective(cls, model, data, args, collectives):
        recipe = cls(model, data)
        recipe.toy = args
        return recipe


def test_a_new_objective_is_one_registry_entry(monkeypatch, capsys):
    from internvl_tune.cli import main

    monkeypatch.setitem(OBJECTIVES, "toy", Objective("toy", "a toy objective", ToyRecipe, ToyArgs))
    objective_section.cache_clear()
    try:
        section = objective_section()
        assert {f.name for f in dataclasses.fields(section)} >= {"objective", "beta", "toy_temperature", "rpo_alpha"}
        toy = section(objective="toy", beta=0.5).resolve()
        assert (toy.beta, toy.toy_temperature) == (0.5, 2.0)
        with pytest.raises(UserError, match="--toy_temperature is a flag of --objective toy"):
            section(objective="dpo", toy_temperature=3.0).resolve()
        with pytest.raises(SystemExit):
            main(["train", "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "toy (a toy objective)" in out and "--toy_temperature TOY_TEMPERATURE toy: how warm" in out
        assert "--beta BETA dpo, mpo: KL coefficient of the preference losses (default: 0.1); grpo, gspo:" in out
        assert "; toy: toy KL coefficient (default: 1)" in out
    finally:
        objective_section.cache_clear()


def test_a_shared_flag_must_keep_one_type(monkeypatch):
    @dataclass
    class Clash:
        objective: str = option("clash", "", flag=False)
        beta: int | None = option(None, "an integer beta")

    monkeypatch.setitem(OBJECTIVES, "clash", Objective("clash", "clashing", ChatRecipe, Clash))
    objective_section.cache_clear()
    try:
        with pytest.raises(TypeError, match="Clash.beta: a shared objective flag needs one type"):
            objective_section()
    finally:
        objective_section.cache_clear()


def test_registry_lives_in_the_library():
    # the registry is library code: it must not need the application layer (train/, dist/, cli/, bench/)
    import ast
    import pathlib

    folder = pathlib.Path(objectives.__file__).parent
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    assert not name.startswith(tuple(f"internvl_tune.{p}" for p in ("train", "dist", "cli", "bench"))), \
                        (path.name, name)
