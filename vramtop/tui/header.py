"""The dashboard's three header lines, as lists of fields: SessionState in, Rich Text out.

Each line is a list of field functions `(state, ctx) -> Text | None` (None: not
shown). A line joins its fields with two spaces and is cut to the width with
"…", never wrapped (Textual would wrap a long Text inside the widget whatever
its no_wrap says). To show something new in the header, add a field function
to one of the lists in `LINES`, in the order of importance: a line loses its
last fields first when the terminal is narrow.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text

from vramtop.state import SessionState, byte_count
from vramtop.tui.render import fmt_count, text_field
from vramtop_agent.vocabulary import PHASE_STYLE, is_number

_CONN_STYLE = {"live": "bold green", "stale": "bold yellow", "waiting": "yellow", "ended": "bold red",
               "gone": "bold red", "replay": "bold cyan", "paused": "bold yellow"}


@dataclass
class HeaderContext:
    """What the header needs besides the state: where the data comes from and how it is being viewed.

    mode: "live" (a running agent) or "replay" (a recording); paused: the view (live) or the
    playback (replay) is paused.
    """

    source: str = ""
    mode: str = "live"
    paused: bool = False


def badge(state: SessionState, ctx: HeaderContext) -> tuple[str, str]:
    """The bracketed state of the view: (text, style)."""
    conn = state.connection()
    if conn == "ended":
        return f"agent ended ({text_field((state.bye or {}).get('reason'), 40)})", _CONN_STYLE["ended"]
    if conn == "gone":
        return "process exited", _CONN_STYLE["gone"]
    if ctx.paused:
        return "paused", _CONN_STYLE["paused"]
    if ctx.mode == "replay":
        return "replay", _CONN_STYLE["replay"]
    if conn == "stale":
        since = state.seconds_since_frame()
        return (f"stale: no data for {since:.0f}s" if since is not None else "stale"), _CONN_STYLE["stale"]
    return conn, _CONN_STYLE[conn]


# --------------------------------------------------------------------- line 1: who and how


def _identity(state: SessionState, ctx: HeaderContext) -> Text:
    h, s = state.hello or {}, state.sample or {}
    t = Text()
    t.append("vramtop ", style="bold")
    t.append(f"pid {s.get('pid', h.get('pid', '-'))}", style="bold cyan")
    t.append(f"@{text_field(h.get('host'), 40)}")
    return t


def _badge(state: SessionState, ctx: HeaderContext) -> Text:
    text, style = badge(state, ctx)
    t = Text("[")
    t.append(text, style=style)
    t.append("]")
    return t


def _source(state: SessionState, ctx: HeaderContext) -> Text | None:
    return Text(ctx.source, style="dim") if ctx.source else None


def _rank(state: SessionState, ctx: HeaderContext) -> Text | None:
    h = state.hello or {}
    world = h.get("world_size", 1)
    return Text(f"rank {h.get('rank', 0)}/{world}") if is_number(world) and world > 1 else None


def _cmdline(state: SessionState, ctx: HeaderContext) -> Text | None:
    cmd = " ".join(c for c in ((state.hello or {}).get("cmdline") or []) if isinstance(c, str))
    return Text(cmd, style="dim") if cmd else None


# --------------------------------------------------------------------- line 2: what is trained


def _device(state: SessionState, ctx: HeaderContext) -> Text:
    h, s = state.hello or {}, state.sample or {}
    dev = text_field(h.get("device") or s.get("device"), 40)
    name = text_field(h.get("device_name"), 60, "")
    t = Text("device ", style="dim")
    t.append(dev + (f" ({name})" if name and dev.startswith("cuda") else ""), style="bold")
    return t


def _model(state: SessionState, ctx: HeaderContext) -> Text:
    model = (state.hello or {}).get("model") or {}
    t = Text("model ", style="dim")
    t.append(text_field(model.get("class"), 60), style="bold")
    return t


def _method(state: SessionState, ctx: HeaderContext) -> Text | None:
    model = (state.hello or {}).get("model") or {}
    summary = model.get("summary") or model.get("method")
    return Text(text_field(summary, 60), style="magenta") if model and summary else None


def _params(state: SessionState, ctx: HeaderContext) -> Text | None:
    model = (state.hello or {}).get("model") or {}
    if not model:
        return None
    return Text(f"params {fmt_count(model.get('params_trainable'))} trainable / "
                f"{fmt_count(model.get('params_total'))}")


def _dtype(state: SessionState, ctx: HeaderContext) -> Text | None:
    model = (state.hello or {}).get("model") or {}
    dtype = model.get("dtype")
    t = Text(text_field(dtype, 30)) if isinstance(dtype, str) else None
    if t is not None and model.get("grad_ckpt"):
        t.append("  grad-ckpt", style="cyan")
    return t


# --------------------------------------------------------------------- line 3: where it is now


def input_shape(state: SessionState) -> tuple[str, str]:
    """(label, value) for the input: batch×seq for token ids, the input shape otherwise."""
    s = state.sample or {}
    batch = s.get("batch")
    shape = "×".join(str(x) for x in batch) if isinstance(batch, list) and batch else "-"
    model = (state.hello or {}).get("model") or {}
    takes_tokens = bool(model.get("lora") or model.get("method") in ("lora", "qlora") or
                        "CausalLM" in str(model.get("class") or "") or not model)
    if not isinstance(batch, list) or not batch or (len(batch) == 2 and takes_tokens):
        return "batch×seq", shape
    return "input", shape


def _batch(state: SessionState, ctx: HeaderContext) -> Text:
    label, value = input_shape(state)
    t = Text(f"{label} ", style="dim")
    t.append(value, style="bold")
    return t


def _step(state: SessionState, ctx: HeaderContext) -> Text:
    t = Text("step ", style="dim")
    t.append(str((state.sample or {}).get("step", "-")), style="bold")
    injected = _injected(state, ctx)
    if injected is not None:  # beside the step number it qualifies, so a narrow header never cuts it alone
        t.append(" (")
        t.append_text(injected)
        t.append(")", style="yellow")
    return t


def _injected(state: SessionState, ctx: HeaderContext) -> Text | None:
    injected = (state.hello or {}).get("injected")
    if not isinstance(injected, dict):
        return None
    # Started mid-run by `vramtop attach PID`: nothing is known before the first whole step.
    first = injected.get("first_step")
    return Text(f"injected: steps before {first} unknown" if isinstance(first, int) else
                "injected: waiting for the next optimizer step", style="yellow")


def _phase(state: SessionState, ctx: HeaderContext) -> Text:
    t = Text("phase ", style="dim")
    if state.connection() in ("ended", "gone"):
        t.append("ended", style="bold red")
        return t
    ph = text_field((state.sample or {}).get("phase"), 20, "-")
    t.append(ph, style=PHASE_STYLE.get(ph, ("", "white"))[1])
    return t


def _step_time(state: SessionState, ctx: HeaderContext) -> Text:
    last = state.last_step()
    t = Text("step time ", style="dim")
    t.append(f"{last['step_time'] * 1000:.0f} ms" if last and is_number(last.get("step_time")) else "-", style="bold")
    return t


def _dropped(state: SessionState, ctx: HeaderContext) -> Text:
    n = (byte_count((state.sample or {}).get("dropped")) or 0) + state.missed_events
    t = Text("dropped ", style="dim")
    t.append(str(n), style="bold red" if n else "")
    return t


def _rejected(state: SessionState, ctx: HeaderContext) -> Text | None:
    return Text(f"rejected {state.rejected_frames}", style="bold red") if state.rejected_frames else None


def _agent_errors(state: SessionState, ctx: HeaderContext) -> Text | None:
    s = state.sample or {}
    return Text(f"agent errors {s['errors']}", style="bold red") if byte_count(s.get("errors")) else None


LINES: list[list] = [
    [_identity, _badge, _source, _rank, _cmdline],
    [_device, _model, _method, _params, _dtype],
    [_batch, _step, _phase, _step_time, _dropped, _rejected, _agent_errors],
]


def header_lines(state: SessionState, ctx: HeaderContext | None = None, width: int | None = None) -> list[Text]:
    """The three header lines, each cut to `width` cells with "…" (no cut when width is None)."""
    ctx = ctx or HeaderContext()
    out = []
    for fields in LINES:
        line = Text(no_wrap=True, overflow="ellipsis")
        for field in fields:
            part = field(state, ctx)
            if part is None or not part.plain:
                continue
            if line.plain:
                line.append("  ")
            line.append_text(part)
        if width is not None and line.cell_len > width:
            line.truncate(max(width, 1), overflow="ellipsis")
        out.append(line)
    return out
