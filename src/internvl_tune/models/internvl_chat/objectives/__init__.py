"""Training objectives of InternVL2 chat models (``--objective``): one registry entry each.

| objective    | flags section    | recipe             | data reader (lines)                               |
|--------------|------------------|--------------------|---------------------------------------------------|
| ``sft``      | none             | ``ChatRecipe``     | ``SupervisedDataset`` (conversations)             |
| ``dpo, mpo`` | ``PreferenceArgs`` | ``PreferenceRecipe`` | ``PreferenceDataset`` (question / chosen / rejected) |
| ``grpo, gspo`` | ``GRPOArgs``   | ``GRPORecipe``     | ``PromptDataset`` (conversations ending with the question) |

An entry names the recipe class (its ``dataset_class`` is the data reader: training and ``data check`` read lines
with it) and the dataclass of the objective's flags. Adding an objective is one module (a flags dataclass with an
``objective`` field that is not a flag and a ``resolve()``, and a recipe with ``from_objective``) plus one line in
:data:`OBJECTIVES`.

The command line has one flag per field name: :func:`objective_section` merges the fields of every registered flags
section into the run config's ``objective`` section (objectives that share a trl name, such as ``--beta`` or
``--loss_type``, share the flag; every such field defaults to None, filled in by the objective's ``resolve``), and
:meth:`ObjectiveArgs.resolve <objective_section>` refuses a flag that the chosen objective does not have.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

from internvl_tune.errors import UserError
from internvl_tune.models.internvl_chat.objectives.grpo import GRPORecipe
from internvl_tune.models.internvl_chat.objectives.grpo_loss import GRPOArgs
from internvl_tune.models.internvl_chat.objectives.preference import PreferenceRecipe
from internvl_tune.models.internvl_chat.objectives.preference_loss import PreferenceArgs
from internvl_tune.models.internvl_chat.recipe import ChatRecipe
from internvl_tune.options import is_flag, option


@dataclass(frozen=True)
class Collectives:
    """The collectives an objective's recipe may use, given by the application (``internvl_tune.dist``): the library
    never imports it. The defaults are those of one process.

    Attributes:
        all_reduce_sum: a tensor summed over ranks.
        all_gather_objects: a list of JSON-like objects per rank -> their concatenation in rank order.
        gathered: ``gathered(module)`` is a context in which the module's parameters are whole on every rank and stay
            so between forward calls (FSDP2 shards them otherwise; generation runs many small forwards).
    """

    all_reduce_sum: Callable = lambda x: x
    all_gather_objects: Callable = list
    gathered: Callable = lambda module: nullcontext()


@dataclass(frozen=True)
class Objective:
    """One training objective: its name, its ``--help`` line, its recipe class and its flags dataclass (None: no
    flags of its own)."""

    name: str
    help: str
    recipe: type
    args: type | None = None

    @property
    def reader(self) -> type:
        """The dataset class that reads this objective's lines (training and ``data check``)."""
        return self.recipe.dataset_class


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("sft", "next-token loss on conversations", ChatRecipe),
    Objective("dpo", "the sigmoid preference loss (DPO) on preference lines (question / chosen / rejected)",
              PreferenceRecipe, PreferenceArgs),
    Objective("mpo", "mixed preference optimisation (preference + quality + generation losses) on preference lines",
              PreferenceRecipe, PreferenceArgs),
    Objective("grpo", "online RL on prompt lines: completions sampled from the policy, scored by --reward_funcs, a "
                      "clipped token-level policy loss on group-normalised advantages (GRPO)", GRPORecipe, GRPOArgs),
    Objective("gspo", "grpo with one importance ratio per completion (GSPO)", GRPORecipe, GRPOArgs),
)}


def _owners(field_name: str) -> list[str]:
    return [o.name for o in OBJECTIVES.values() if o.args is not None and
            field_name in {f.name for f in dataclasses.fields(o.args)}]


def _resolve(section):
    """The chosen objective's own flags dataclass, resolved (None for objectives without flags)."""
    entry = OBJECTIVES[section.objective]
    own = {f.name for f in dataclasses.fields(entry.args)} if entry.args is not None else set()
    for f in dataclasses.fields(section):
        if f.name != "objective" and getattr(section, f.name) is not None and f.name not in own:
            owners = _owners(f.name)
            raise UserError(f"--{f.name} is a flag of --objective {' / '.join(owners)}, not of {section.objective}: "
                            f"add --objective {owners[0]} (with its data), or drop it")
    if entry.args is None:
        return None
    given = {name: getattr(section, name) for name in own if name != "objective"}
    return entry.args(objective=section.objective, **given).resolve()


@functools.cache
def objective_section() -> type:
    """The run config's ``objective`` section: ``--objective`` and the flags of every registered flags dataclass,
    each flag once (a field several objectives share gets one help text per objective)."""
    merged: dict[str, tuple[type, str, list[str]]] = {}
    for args in dict.fromkeys(o.args for o in OBJECTIVES.values() if o.args is not None):
        names = [o.name for o in OBJECTIVES.values() if o.args is args]
        hints = typing.get_type_hints(args)
        for f in dataclasses.fields(args):
            if not is_flag(f):
                continue
            if f.default is not None:
                raise TypeError(f"{args.__name__}.{f.name}: objective flags default to None (resolve() fills them)")
            text = f"{', '.join(names)}: {f.metadata['help']}"
            if f.name in merged:
                tp, old, _ = merged[f.name]
                if tp != hints[f.name]:
                    raise TypeError(f"{args.__name__}.{f.name}: a shared objective flag needs one type")
                text = f"{old}; {text}"
            merged[f.name] = (hints[f.name], text, names)
    fields = [("objective", str, option("sft", "training objective: " + "; ".join(
        f"{o.name} ({o.help})" for o in OBJECTIVES.values()), tuple(OBJECTIVES)))]
    fields += [(name, tp, option(None, text)) for name, (tp, text, _) in merged.items()]
    return dataclasses.make_dataclass("ObjectiveArgs", fields, namespace={"resolve": _resolve, "__doc__": (
        "The training objective (``--objective``) and the flags of every registered objective.")})


def build_recipe(model, data, objective, collectives: Collectives = Collectives()):
    """The recipe of a run: ``objective`` is the run config's objective section (:func:`objective_section`)."""
    entry = OBJECTIVES[objective.objective]
    return entry.recipe.from_objective(model, data, objective.resolve(), collectives)
