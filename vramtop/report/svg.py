"""The report's plots as inline SVG (no script, no external resource): blocks stacked over time,
lines, and grouped bars. Labels from the recording are HTML-escaped."""

from __future__ import annotations

import html
import math
from typing import Any

from vramtop_agent.vocabulary import BLOCK_KEYS, PHASE_STYLE, fmt_bytes
from vramtop_agent.vocabulary import COLOURS as BLOCK_COLORS

# The dashboard's block colours, so the report and the TUI read alike.
COLORS = {
    **{k: BLOCK_COLORS[k] for k in BLOCK_KEYS},
    "forward": PHASE_STYLE["forward"][1],
    "backward": PHASE_STYLE["backward"][1],
    "optimizer_phase": PHASE_STYLE["optimizer"][1],
    "reserved": BLOCK_COLORS["cache"],
    "allocated": "#4e79a7",
    "rss": BLOCK_COLORS["process"],
}


def fmt_tick(seconds: float) -> str:
    """Short time-axis labels: 12.5s, 3:20, 4:48h."""
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    if seconds < 3600:
        m, s = divmod(int(round(seconds)), 60)
        return f"{m}:{s:02d}"
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{h}:{rem // 60:02d}h"


W, H = 860, 260
ML, MR, MT, MB = 70, 20, 20, 40


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    unit = 1
    for u in (1 << 10, 1 << 20, 1 << 30, 1 << 40):
        if v >= u:
            unit = u
    scaled = v / unit
    for step in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10, 15, 20, 25, 30, 40, 50, 60, 80, 100, 150, 200, 250, 300, 400,
                 500, 600, 800, 1000, 1024):
        if scaled <= step:
            return step * unit
    return v  # pragma: no cover


def _axes(x_max: float, y_max: float, x_label: str, x_fmt, integer_x: bool = False) -> list[str]:
    out = [f'<rect x="{ML}" y="{MT}" width="{W - ML - MR}" height="{H - MT - MB}" fill="#fafafa" stroke="#ccc"/>']
    for i in range(5):
        v = y_max * i / 4
        y = H - MB - (H - MT - MB) * i / 4
        out.append(f'<line x1="{ML}" y1="{y:.1f}" x2="{W - MR}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{ML - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{esc(fmt_bytes(v))}</text>')
    if integer_x:  # steps: whole numbers only, each once (not 0, 0, 1, 1, 2 over a short run)
        every = max(1, math.ceil(x_max / 5))
        ticks = [float(v) for v in range(0, int(x_max) + 1, every)]
    else:
        ticks = [x_max * i / 5 for i in range(6)]
    for v in ticks:
        x = ML + (W - ML - MR) * v / max(x_max, 1e-9)
        out.append(f'<text x="{x:.1f}" y="{H - MB + 16}" text-anchor="middle" class="tick">{esc(x_fmt(v))}</text>')
    out.append(f'<text x="{(ML + W - MR) / 2:.0f}" y="{H - 6}" text-anchor="middle" class="label">'
               f'{esc(x_label)}</text>')
    return out


def _legend(items: list[tuple[str, str]]) -> str:
    parts = []
    x = ML
    for name, color in items:
        parts.append(f'<rect x="{x}" y="4" width="10" height="10" fill="{color}"/>'
                     f'<text x="{x + 14}" y="13" class="tick">{esc(name)}</text>')
        x += 16 + 7 * len(name) + 14
    return "".join(parts)


def svg_stacked(points: list[dict], t0: float, marks: list[tuple[float, str, str]]) -> str:
    if not points:
        return "<p>No samples.</p>"
    xs = [p["t"] - t0 for p in points]
    x_max = max(xs[-1], 1e-3)
    tops = [sum((p[k] or 0) for k in BLOCK_KEYS) for p in points]
    y_max = _nice_max(max(tops))
    pw, ph = W - ML - MR, H - MT - MB

    def X(x):
        return ML + pw * x / x_max

    def Y(y):
        return H - MB - ph * y / y_max

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" role="img" '
           'aria-label="memory blocks stacked over time">', _legend([(k, COLORS[k]) for k in BLOCK_KEYS])]
    out += _axes(x_max, y_max, "time into the recording", fmt_tick)
    base = [0.0] * len(points)
    for k in BLOCK_KEYS:
        upper = [b + (p[k] or 0) for b, p in zip(base, points)]
        if len(points) == 1:
            xs_draw, up, lo = [xs[0], xs[0] + x_max * 0.01], upper * 2, base * 2
        else:
            xs_draw, up, lo = xs, upper, base
        pts = [f"{X(x):.1f},{Y(y):.1f}" for x, y in zip(xs_draw, up)]
        pts += [f"{X(x):.1f},{Y(y):.1f}" for x, y in zip(reversed(xs_draw), reversed(lo))]
        out.append(f'<polygon points="{" ".join(pts)}" fill="{COLORS[k]}" fill-opacity="0.85">'
                   f'<title>{esc(k)}</title></polygon>')
        base = upper
    for t, label, color in marks:
        x = X(min(max(t - t0, 0), x_max))
        out.append(f'<line x1="{x:.1f}" y1="{MT}" x2="{x:.1f}" y2="{H - MB}" stroke="{color}" stroke-width="1.5" '
                   f'stroke-dasharray="4 3"/><text x="{x + 3:.1f}" y="{MT + 12}" class="mark" fill="{color}">'
                   f'{esc(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def svg_lines(xs: list[float], series: list[tuple[str, str, list]], x_label: str, x_fmt, aria: str,
              dots: bool = False, integer_x: bool = False) -> str:
    vals = [v for _, _, ys in series for v in ys if v is not None]
    if not xs or not vals:
        return "<p>No data.</p>"
    x_lo, x_hi = min(xs), max(xs)
    x_span = max(x_hi - x_lo, 1e-3)
    y_max = _nice_max(max(vals))
    pw, ph = W - ML - MR, H - MT - MB

    def X(x):
        return ML + pw * (x - x_lo) / x_span

    def Y(y):
        return H - MB - ph * y / y_max

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" role="img" aria-label="{esc(aria)}">',
           _legend([(n, c) for n, c, _ in series])]
    out += _axes(x_span, y_max, x_label, lambda v: x_fmt(v + x_lo), integer_x)
    for i, (name, color, ys) in enumerate(series):
        pts = [f"{X(x):.1f},{Y(y):.1f}" for x, y in zip(xs, ys) if y is not None]
        if not pts:
            continue
        out.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{color}" '
                   f'stroke-width="{_line_width(i, len(series))}"><title>{esc(name)}</title></polyline>')
        if dots and len(pts) <= 200:
            for pt in pts:
                cx, cy = pt.split(",")
                out.append(f'<circle cx="{cx}" cy="{cy}" r="2.2" fill="{color}"/>')
    out.append("</svg>")
    return "".join(out)


def _line_width(i: int, n: int) -> str:
    """Earlier series drawn wider: a forward-peak line equal to the backward one drawn over it still shows."""
    return f"{1.6 + 1.6 * (n - 1 - i) / max(n - 1, 1):.1f}"


def svg_bars(xs: list[float], series: list[tuple[str, str, list]], aria: str) -> str:
    """Grouped bars: one group per step, one bar per phase."""
    vals = [v for _, _, ys in series for v in ys if v is not None]
    if not xs or not vals:
        return "<p>No steps.</p>"
    y_max = _nice_max(max(vals))
    pw, ph = W - ML - MR, H - MT - MB
    n = len(xs)
    group = pw / n
    bar = max(group * 0.8 / len(series), 0.5)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" role="img" aria-label="{esc(aria)}">',
           _legend([(name, c) for name, c, _ in series])]
    out += _axes(1.0, y_max, "step", lambda v: "")
    every = max(1, -(-n // 12))
    for i, x in enumerate(xs):
        gx = ML + group * i + group * 0.1
        for j, (name, color, ys) in enumerate(series):
            y = ys[i]
            if y is None:
                continue
            h = ph * y / y_max
            out.append(f'<rect x="{gx + j * bar:.1f}" y="{H - MB - h:.1f}" width="{bar:.2f}" height="{h:.1f}" '
                       f'fill="{color}"><title>step {x:.0f} {esc(name)}: {esc(fmt_bytes(y))}</title></rect>')
        if i % every == 0:
            out.append(f'<text x="{ML + group * (i + 0.5):.1f}" y="{H - MB + 16}" text-anchor="middle" '
                       f'class="tick">{x:.0f}</text>')
    out.append("</svg>")
    return "".join(out)

