"""Chart of the recorded benchmark results: ``internvl-tune bench plot docs/perf``.

Reads the ``bench_*.json`` files that ``bench train --out`` wrote and draws tokens/s and MFU per variant
into ``<folder>/throughput.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from internvl_tune.cli.flags import description


def plot(folder: Path) -> Path:
    """Write ``throughput.png`` (tokens/s bars, MFU labels) from the ``bench_*.json`` files in ``folder``."""
    from internvl_tune.environment import require

    matplotlib = require("matplotlib", "bench plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for path in sorted(folder.glob("bench_*.json")):
        rows += json.loads(path.read_text())
    devices = sorted({r.get("device", "GPU") for r in rows})
    short = {d: d.replace("NVIDIA ", "").split()[0] for d in devices}  # "NVIDIA H100 80GB HBM3" -> "H100"
    labels = [f"{r['shape'].replace('internvl2-', '').upper()}  {r['variant']}"
              + (f"  [{short[r.get('device', 'GPU')]}]" if len(devices) > 1 else "") for r in rows]
    values = [r["tokens_per_s"] for r in rows]
    colors = ["#999999" if r["variant"].startswith("plain") else "#1f77b4" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2), dpi=110)
    bars = ax.barh(range(len(rows)), values, color=colors)
    for bar, r in zip(bars, rows):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                f" {r['tokens_per_s']:,.0f} tok/s, MFU {r['mfu']:.0%}, {r['peak_gib']:.0f} GiB", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("training tokens/s on one GPU (grey: plain transformers loop)")
    ax.set_xlim(0, max(values) * 1.45)
    ax.set_title(f"InternVL2 fine-tuning throughput, {', '.join(devices) or 'GPU'}", fontsize=10)
    fig.tight_layout()
    out = folder / "throughput.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", type=Path, default=Path("docs/perf"),
                        help="folder holding the bench_*.json files; the chart is written there (default: docs/perf)")
    return parser


def main(argv: list[str] | None = None) -> int:
    print(plot(build_parser().parse_args(argv).folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
