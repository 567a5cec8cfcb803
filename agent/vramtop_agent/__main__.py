"""`python -m vramtop_agent [OPTIONS] script.py ARGS` (or `-m module ARGS`): run a script with the agent.

The script runs as `python script.py ARGS` would: `sys.argv` is
`[script.py, *ARGS]`, `sys.path[0]` is the script's directory, it runs as
`__main__`, its exit status is the process's, and its exceptions propagate
unchanged (same type, same exit status 1, a traceback showing only the
script's frames). The agent is started the zero-code way (see _autostart.py):
it appears at the first training forward, with the root module found
automatically and the optimizer adopted at its first step. VRAMTOP=1 is set
for the script's own Python subprocesses (multiprocessing spawn, torchrun
started from the script), which start their own agents where the .pth or
`vramtop run`'s bootstrap is present.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

USAGE = """usage: python -m vramtop_agent [--record PATH] [--endpoint ENDPOINT] [--sample-hz HZ] \
(script.py | -m module) [ARGS ...]

Run a training script with the vramtop agent watching it (no code change).
  --record PATH        also record the stream to PATH (a vramtop recording; {rank}, {pid} allowed)
  --endpoint ENDPOINT  publish on ENDPOINT (default: an ipc socket found by `vramtop attach`)
  --sample-hz HZ       samples per second (default 10)
"""


def _parse(argv: list[str]) -> tuple[dict, str, str, list[str]]:
    """Options up to the script (or -m module); everything after belongs to the script."""
    opts: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            sys.stdout.write(USAGE)
            raise SystemExit(0)
        if arg == "--":
            i += 1
            break
        if arg == "-m":
            if i + 1 >= len(argv):
                break
            return opts, "module", argv[i + 1], argv[i + 2:]
        name, eq, value = arg.partition("=")
        if name in ("--record", "--endpoint", "--sample-hz"):
            if not eq:
                if i + 1 >= len(argv):
                    _usage_error(f"{name} needs a value")
                value = argv[i + 1]
                i += 1
            key = name[2:].replace("-", "_")
            if key == "sample_hz":
                try:
                    opts[key] = float(value)
                except ValueError:
                    _usage_error(f"--sample-hz: not a number: {value!r}")
            else:
                opts[key] = value
            i += 1
            continue
        if arg.startswith("-") and arg != "-":
            _usage_error(f"unknown option {arg}")
        break
    if i >= len(argv):
        _usage_error("no script given")
    return opts, "script", argv[i], argv[i + 1:]


def _usage_error(message: str) -> NoReturn:
    sys.stderr.write(USAGE.splitlines()[0] + "\n")
    sys.stderr.write(f"python -m vramtop_agent: error: {message}\n")
    raise SystemExit(2)


def _hide_own_frames() -> None:
    """Tracebacks of the script's uncaught exceptions start at the script, as with `python script.py`."""
    import runpy

    skip = {os.path.abspath(__file__), os.path.abspath(runpy.__file__), "<frozen runpy>"}
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        try:
            while tb is not None and (tb.tb_frame.f_code.co_filename in skip
                                      or os.path.abspath(tb.tb_frame.f_code.co_filename) in skip):
                tb = tb.tb_next
            if exc is not None and tb is not None:
                exc.__traceback__ = tb  # Python prints the exception's own traceback
        except Exception:
            pass
        return previous(exc_type, exc, tb)

    sys.excepthook = hook


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts, kind, target, args = _parse(argv)

    import runpy

    from vramtop_agent import _autostart

    if opts.get("record"):
        os.environ["VRAMTOP_RECORD"] = os.path.abspath(opts["record"])
    if opts.get("endpoint"):
        os.environ["VRAMTOP_ENDPOINT"] = opts["endpoint"]
    if opts.get("sample_hz"):
        os.environ["VRAMTOP_SAMPLE_HZ"] = str(opts["sample_hz"])
    os.environ["VRAMTOP"] = "1"
    _autostart.start()  # reads the options above from the environment, once the root is found

    if kind == "module":
        sys.argv = [target, *args]  # runpy sets argv[0] to the module's file
        _hide_own_frames()
        runpy.run_module(target, run_name="__main__", alter_sys=True)
        return
    if not os.path.exists(target):
        sys.stderr.write(f"{sys.executable}: can't open file {os.path.abspath(target)!r}: "
                         "[Errno 2] No such file or directory\n")
        raise SystemExit(2)
    sys.argv = [target, *args]
    script_dir = os.path.dirname(os.path.abspath(target)) if not os.path.isdir(target) else os.path.abspath(target)
    if sys.path and sys.path[0] in ("", os.getcwd()):
        sys.path[0] = script_dir
    else:
        sys.path.insert(0, script_dir)
    _hide_own_frames()
    runpy.run_path(os.path.abspath(target), run_name="__main__")  # python shows the script's absolute path too


if __name__ == "__main__":
    main()
