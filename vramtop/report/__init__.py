"""The postmortem of a recording: where and when the peak was, what grew before an OOM, what to do.

One module per job:

- `analysis.analyze()` turns a Recording into a plain dict (numbers and short
  strings; tests and `--json` read it), with `advice.advice()` its rules;
- `text.render_text()` prints it for a terminal;
- `page.render_html()` fills the page template `report.html` with inline SVG
  plots from `svg` (no script, no external resource):
  - the blocks stacked over time (parameters, gradients, optimizer,
    activations, other), with the peak and any OOM marked;
  - each step's forward / backward / optimizer peak;
  - reserved vs allocated (CUDA) or tracked tensors vs process RSS (CPU).

Everything taken from the file is untrusted: text is stripped of control
characters for the terminal and HTML-escaped for the page.
"""

from __future__ import annotations

from vramtop.report.advice import advice
from vramtop.report.analysis import analyze
from vramtop.report.page import render_html
from vramtop.report.svg import svg_bars, svg_lines, svg_stacked
from vramtop.report.text import render_text
from vramtop_agent.vocabulary import fmt_bytes

__all__ = ["advice", "analyze", "fmt_bytes", "render_html", "render_text", "svg_bars", "svg_lines", "svg_stacked"]
