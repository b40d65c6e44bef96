"""Line charts as inline SVG: no JavaScript, no fonts to fetch, sharp at any zoom, a few KB each.

One chart holds several series (a run's raw and smoothed loss, or the same curve of several runs); the x axis is
the optimizer step, with the epoch marked along the top when the run has epochs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
WIDTH, HEIGHT = 600, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 28, 40, 44


@dataclass
class Series:
    """One line: ``points`` are (x, y); ``faint`` draws it thin and light (the raw line under a smoothed one);
    ``markers`` draws its points (sparse series such as the eval loss)."""

    label: str
    points: list[tuple[float, float]]
    color: str = PALETTE[0]
    faint: bool = False
    markers: bool = False


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2, 2.5 or 5 times a power of ten) covering ``[low, high]``."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(low / step + 1e-9) * step
    ticks, value = [], first
    while not ticks or ticks[-1] < high - step * 1e-9:  # the last tick reaches the top of the data
        ticks.append(round(value, 12))
        value += step
    return ticks


def format_number(value: float) -> str:
    """Short tick labels: 1.2k, 3.4M, 0.0005 -> 5e-4, 12.5."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e6:
        return f"{value / 1e6:g}M"
    if magnitude >= 1e4:
        return f"{value / 1e3:g}k"
    if magnitude < 1e-2:
        return f"{value:.0e}".replace("e-0", "e-")
    return f"{value:.4g}"


def line_chart(series: list[Series], title: str, y_label: str = "", x_label: str = "optimizer step",
               epochs: list[tuple[float, float]] | None = None) -> str:
    """An SVG chart of ``series``; ``epochs`` are (step, epoch) pairs that put an epoch scale along the top."""
    series = [s for s in series if s.points]
    body = [f'<text x="{WIDTH / 2}" y="16" class="title">{escape(title)}</text>']
    if not series:
        body.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" class="empty">no data</text>')
        return _svg(body, title)
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points if math.isfinite(y)]
    if not ys:
        ys = [0.0]
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x0, x1 = min(x_ticks[0], min(xs)), max(x_ticks[-1], max(xs))
    y0, y1 = min(y_ticks[0], min(ys)), max(y_ticks[-1], max(ys))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / ((x1 - x0) or 1) * plot_w

    def py(y: float) -> float:
        return TOP + plot_h - (y - y0) / ((y1 - y0) or 1) * plot_h

    for t in y_ticks:
        body.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{py(t):.1f}" y2="{py(t):.1f}" class="grid"/>'
                    f'<text x="{LEFT - 6}" y="{py(t) + 4:.1f}" class="ytick">{format_number(t)}</text>')
    for t in x_ticks:
        body.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{TOP}" y2="{TOP + plot_h}" class="grid"/>'
                    f'<text x="{px(t):.1f}" y="{TOP + plot_h + 16}" class="xtick">{format_number(t)}</text>')
    if epochs:
        body += _epoch_axis(epochs, px)
    body.append(f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" class="frame"/>')
    body.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 6}" class="label">{escape(x_label)}</text>')
    if y_label:
        body.append(f'<text transform="translate(14 {TOP + plot_h / 2}) rotate(-90)" class="label">'
                    f'{escape(y_label)}</text>')
    for s in series:
        finite = [(x, y) for x, y in s.points if math.isfinite(y)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in finite)
        width, opacity = (1, 0.35) if s.faint else (2, 1)
        body.append(f'<polyline points="{path}" fill="none" stroke="{s.color}" stroke-width="{width}" '
                    f'stroke-opacity="{opacity}"><title>{escape(s.label)}</title></polyline>')
        if s.markers or len(finite) == 1:
            body += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{s.color}"/>' for x, y in finite]
    body += _legend(series)
    return _svg(body, title)


def _epoch_axis(epochs: list[tuple[float, float]], px) -> list[str]:
    """Epoch ticks along the top edge, where each whole epoch (half or quarter, for short runs) is reached; the
    epoch grows linearly with the step, at the rate of the last logged point."""
    step_at, last = max(epochs)
    if last <= 0:
        return []
    per_epoch = step_at / last
    every = 1.0 if last >= 2 else 0.5 if last >= 1 else 0.25
    out = []
    for k in range(1, int(last / every + 1e-9) + 1):
        x = px(k * every * per_epoch)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP - 4}" y2="{TOP}" class="axis"/>'
                   f'<text x="{x:.1f}" y="{TOP - 7}" class="etick">epoch {k * every:g}</text>')
    return out


def _legend(series: list[Series]) -> list[str]:
    out, x = [], LEFT + 8
    for s in series:
        out.append(f'<line x1="{x}" x2="{x + 16}" y1="{TOP + 12}" y2="{TOP + 12}" stroke="{s.color}" '
                   f'stroke-width="{1 if s.faint else 2}" stroke-opacity="{0.35 if s.faint else 1}"/>'
                   f'<text x="{x + 20}" y="{TOP + 16}" class="legend">{escape(s.label)}</text>')
        x += 28 + 6.5 * len(s.label)
    return out


def _svg(body: list[str], title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
            f'height="{HEIGHT}" role="img" aria-label="{escape(title)}" class="chart">' + "".join(body) + "</svg>")
