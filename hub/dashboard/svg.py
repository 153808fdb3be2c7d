"""Line charts as inline SVG, built on the server. Pure: series in, markup out.

    line_chart([Series("alcohol", [(t0, 0.01), (t1, 0.9), ...])], threshold=0.25,
               y_label="PSI", x_format=hhmm)

x values are numbers (epoch seconds on the dashboard), y values numbers or None (a gap: no
verdict in that bucket). The y axis starts at 0 and reaches past the threshold, so a line far
below it reads as "fine" at a glance. Every text is escaped; nothing from the data reaches the
markup unescaped. Each point carries a <title> (a browser shows it as a tooltip) with its
label when one is given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape

WIDTH = 480
HEIGHT = 180
MARGIN_LEFT = 48
MARGIN_RIGHT = 12
MARGIN_TOP = 12
MARGIN_BOTTOM = 30
Y_TICKS = 4
X_TICKS = 4
NICE_STEPS = (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)  # axis maxima, x 10^n
COLORS = ("#1f6feb", "#d97706", "#059669", "#9333ea")


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[tuple[float, float | None]]
    labels: Sequence[str] = field(default_factory=tuple)  # per point, for the tooltip


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def _nice_max(value: float) -> float:
    """The smallest of NICE_STEPS times a power of ten at or above `value` (> 0)."""
    exponent = math.floor(math.log10(value))
    for step in NICE_STEPS:
        candidate = step * 10.0**exponent
        if candidate >= value * (1 - 1e-12):
            return candidate
    return 10.0 ** (exponent + 1)  # pragma: no cover - the loop always returns


@dataclass(frozen=True)
class _Frame:
    """Data coordinates to the plot's pixels."""

    x_lo: float
    x_hi: float
    y_top: float
    plot_w: float
    plot_h: float

    def px(self, x: float) -> float:
        return MARGIN_LEFT + (x - self.x_lo) / (self.x_hi - self.x_lo) * self.plot_w

    def py(self, y: float) -> float:
        return MARGIN_TOP + self.plot_h - min(max(y, 0.0), self.y_top) / self.y_top * self.plot_h


def _y_ticks(f: _Frame) -> list[str]:
    out = []
    for i in range(Y_TICKS + 1):
        value = f.y_top * i / Y_TICKS
        y = f.py(value)
        out.append(
            f'<line x1="{MARGIN_LEFT - 4}" y1="{y:.1f}" x2="{MARGIN_LEFT + f.plot_w}" y2="{y:.1f}" '
            'stroke="#ddd" stroke-width="1"/>'
            f'<text x="{MARGIN_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_fmt(value)}</text>'
        )
    return out


def _x_ticks(f: _Frame, x_format: Callable[[float], str]) -> list[str]:
    out = []
    bottom = MARGIN_TOP + f.plot_h
    shown: set[str] = set()
    for i in range(X_TICKS + 1):
        value = f.x_lo + (f.x_hi - f.x_lo) * i / X_TICKS
        text = x_format(value)
        if text in shown:
            continue  # a short span: ticks closer than the format's resolution say nothing new
        shown.add(text)
        x = f.px(value)
        anchor = "start" if i == 0 else "end" if i == X_TICKS else "middle"
        out.append(
            f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" stroke="#555"/>'
            f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="{anchor}" class="tick x-tick">'
            f"{escape(text)}</text>"
        )
    return out


def _series(f: _Frame, s: Series, color: str) -> list[str]:
    """A polyline per run of values (None or NaN breaks the line) and a dot with a tooltip each."""
    out = []
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in s.points:
        if y is None or not math.isfinite(y):
            if runs[-1]:
                runs.append([])
            continue
        runs[-1].append((f.px(x), f.py(y)))
    for run in runs:
        if len(run) > 1:
            coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in run)
            out.append(
                f'<polyline class="series" data-series="{escape(s.name)}" points="{coords}" '
                f'fill="none" stroke="{color}" stroke-width="2"/>'
            )
    for i, (x, y) in enumerate(s.points):
        if y is None or not math.isfinite(y):
            continue
        label = s.labels[i] if i < len(s.labels) else f"{s.name}: {_fmt(y)}"
        out.append(
            f'<circle class="point" cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="3" fill="{color}">'
            f"<title>{escape(label)}</title></circle>"
        )
    return out


def line_chart(
    series: Sequence[Series],
    *,
    title: str = "",
    y_label: str = "",
    threshold: float | None = None,
    threshold_label: str = "",
    x_format: Callable[[float], str] = _fmt,
    width: int = WIDTH,
    height: int = HEIGHT,
) -> str:
    """An <svg> element: axes with ticks and labels, one polyline per series (broken at None),
    a dot per point, and a dashed threshold line. No points at all gives a chart saying so."""
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points if y is not None and math.isfinite(y)]
    plot_w = width - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = height - MARGIN_TOP - MARGIN_BOTTOM
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" aria-label="{escape(title)}">'
    ]
    if title:
        out.append(f"<title>{escape(title)}</title>")
    axis_x0, axis_y0 = MARGIN_LEFT, MARGIN_TOP + plot_h
    out.append(
        f'<path class="axis" d="M{axis_x0},{MARGIN_TOP} V{axis_y0} H{axis_x0 + plot_w}" '
        'fill="none" stroke="#555" stroke-width="1"/>'
    )
    if not xs or not ys:
        out.append(
            f'<text x="{MARGIN_LEFT + plot_w / 2:.1f}" y="{MARGIN_TOP + plot_h / 2:.1f}" '
            'text-anchor="middle" class="empty">no data</text></svg>'
        )
        return "".join(out)

    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1.0, x_hi + 1.0
    frame = _Frame(x_lo, x_hi, _nice_max(max([*ys, threshold or 0.0, 1e-12]) * 1.05), plot_w, plot_h)
    out += _y_ticks(frame)
    out += _x_ticks(frame, x_format)
    if y_label:
        middle = MARGIN_TOP + plot_h / 2
        out.append(
            f'<text x="12" y="{middle:.1f}" text-anchor="middle" class="label" '
            f'transform="rotate(-90 12 {middle:.1f})">{escape(y_label)}</text>'
        )
    if threshold is not None:
        y = frame.py(threshold)
        out.append(
            f'<line class="threshold" x1="{axis_x0}" y1="{y:.1f}" x2="{axis_x0 + plot_w}" y2="{y:.1f}" '
            'stroke="#dc2626" stroke-width="1" stroke-dasharray="4 3"/>'
        )
        if threshold_label:
            out.append(
                f'<text x="{axis_x0 + plot_w - 2}" y="{y - 4:.1f}" text-anchor="end" class="threshold-label" '
                f'fill="#dc2626">{escape(threshold_label)}</text>'
            )
    for n, one in enumerate(series):
        out += _series(frame, one, COLORS[n % len(COLORS)])
    out.append("</svg>")
    return "".join(out)
