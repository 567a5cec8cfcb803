"""Job invariance: a training job behaves the same with vramtop watching it as without.

A shared harness (not a test module): give it a small training script and its
arguments; it runs the script bare and watched in each mode, each run in a
real subprocess with its own private runtime dir, working dir and TMPDIR, and
compares what the job itself can observe:

- the per-step losses (the script prints them with `vt_loss`, as float.hex):
  bit-identical to the bare run's;
- stdout (besides the `rss` lines): identical;
- stderr: identical to the bare run's, except lines the caller expects
  (`extra_stderr`: regexes, each matching exactly one extra line);
- the exit code: identical;
- RSS growth between the script's `vt_rss("start")` and `vt_rss("end")`
  marks: within `rss_bound` bytes of the bare run's growth;
- files left behind: none in the runtime dir, the working dir (besides the
  script's own outputs named in `allow_files`) or TMPDIR, except the
  requested recording and what the bare run leaves there too (torch's
  TMPDIR caches).

Modes:
  bare        python script.py ARGS
  watch       python script.py ARGS with VT_WATCH=1: `vt_watch(model, opt)` calls
              vramtop_agent.watch() (options from `watch_options`, as JSON in VT_WATCH_OPTIONS)
  run         vramtop run --no-tui -- python script.py ARGS   (zero-code, sitecustomize bootstrap)
  module      python -m vramtop_agent script.py ARGS          (zero-code)
  record      python script.py ARGS with VRAMTOP_RECORD=<workdir>/job.vramtop (zero-code;
              the bootstrap is put on PYTHONPATH so the .pth is not needed)
  run_record  vramtop run --record <workdir>/job.vramtop -- python script.py ARGS
              (vramtop's own "vramtop: recording pid N to PATH" line is not the job's: dropped)

The script gets a small prelude (PRELUDE) that defines:
  vt_watch(model=None, optimizer=None, **kw) -> context manager; watches only in mode "watch"
  vt_loss(x)      prints "loss <float.hex>" (x a float or a one-element tensor)
  vt_rss(tag)     prints "rss <tag> <bytes>" (from /proc/self/statm; imports nothing)
  VT_MODE         the mode name (a script must not behave differently on it, except to
                  decide things like "watch twice" in tests of the agent itself)

Typical use:

    from invariance import assert_invariant  # tests/ is on sys.path (rootdir conftest)
    runs = assert_invariant(tmp_path, SCRIPT, args=["20"], modes=("watch", "run", "record"))
    runs["record"].recording  # the Path of the recording, for further checks

`run_script` and `launch` give single runs (launch returns the running
process, e.g. to send it a signal); `compare` lists the differences between a
bare run and a watched one without asserting.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

MODES = ("bare", "watch", "run", "module", "record", "run_record")
WATCHED_MODES = ("watch", "run", "module", "record", "run_record")
RECORDING_NAME = "job.vramtop"
DEFAULT_RSS_BOUND = 48 * 1024 * 1024

PRELUDE = textwrap.dedent('''
    # --- vramtop job-invariance prelude (tests/invariance.py) ---
    import contextlib as _vt_contextlib
    import json as _vt_json
    import os as _vt_os
    VT_MODE = _vt_os.environ.get("VT_MODE", "bare")
    def vt_watch(model=None, optimizer=None, **kw):
        if _vt_os.environ.get("VT_WATCH") != "1":
            return _vt_contextlib.nullcontext()
        import vramtop_agent
        opts = _vt_json.loads(_vt_os.environ.get("VT_WATCH_OPTIONS") or "{}")
        opts.update(kw)
        return vramtop_agent.watch(model, optimizer, **opts)
    def vt_loss(x):
        x = x.item() if hasattr(x, "item") else x
        print("loss " + float(x).hex(), flush=True)
    def vt_rss(tag):
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        print("rss %s %d" % (tag, pages * _vt_os.sysconf("SC_PAGE_SIZE")), flush=True)
    # --- end of prelude ---
''')

_LAUNCHER_LINE = re.compile(r"^vramtop: recording pid \d+ to .*$")
_ENV_DROP = ("VRAMTOP", "VRAMTOP_RECORD", "VRAMTOP_ENDPOINT", "VRAMTOP_SAMPLE_HZ", "VRAMTOP_CURVE_SECRET_KEY",
             "VT_WATCH", "VT_WATCH_OPTIONS", "VT_MODE")


@dataclass
class RunResult:
    mode: str
    returncode: int
    stdout: str
    stderr: str
    workdir: Path
    runtime_dir: Path
    tmpdir: Path
    recording: Path | None = None
    leftovers: list[str] = field(default_factory=list)

    @property
    def losses(self) -> list[str]:
        """The float.hex strings the script printed with vt_loss, in order."""
        return [ln.split()[1] for ln in self.stdout.splitlines() if ln.startswith("loss ")]

    @property
    def rss(self) -> dict[str, int]:
        out = {}
        for ln in self.stdout.splitlines():
            parts = ln.split()
            if len(parts) == 3 and parts[0] == "rss":
                out[parts[1]] = int(parts[2])
        return out

    @property
    def rss_growth(self) -> int | None:
        marks = self.rss
        if "start" in marks and "end" in marks:
            return marks["end"] - marks["start"]
        return None

    @property
    def plain_stdout(self) -> str:
        """stdout without the rss lines (they differ run to run)."""
        return "".join(ln for ln in self.stdout.splitlines(keepends=True) if not ln.startswith("rss "))

    def stderr_lines(self) -> list[str]:
        lines = self.stderr.splitlines()
        if self.mode == "run_record":
            lines = [ln for ln in lines if not _LAUNCHER_LINE.match(ln)]
        return lines

    def describe(self) -> str:
        return (f"[{self.mode}] exit {self.returncode}\n--- stdout (tail)\n{self.stdout[-1500:]}"
                f"\n--- stderr (tail)\n{self.stderr[-3000:]}")


def write_script(tmp_path: Path, script: str, name: str = "job.py") -> Path:
    """The script with the prelude, at one absolute path shared by every mode (tracebacks name it)."""
    d = Path(tmp_path) / "script"
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    path.write_text(PRELUDE + textwrap.dedent(script))
    return path


def job_env(mode: str, workdir: Path, runtime_dir: Path, tmpdir: Path, watch_options: dict | None = None,
            env: dict | None = None) -> dict:
    """The environment of one run: the caller's, minus vramtop's variables, plus the mode's."""
    e = dict(os.environ)
    for key in _ENV_DROP:
        e.pop(key, None)
    e.update({
        "VRAMTOP_RUNTIME_DIR": str(runtime_dir),
        "TMPDIR": str(tmpdir),
        "PYTHONUNBUFFERED": "1",
        "PYTHONHASHSEED": "0",
        "OMP_NUM_THREADS": "1",  # same in every mode: losses depend on the reduction order
        "TOKENIZERS_PARALLELISM": "false",
        "VT_MODE": mode,
    })
    if mode == "watch":
        e["VT_WATCH"] = "1"
        e["VT_WATCH_OPTIONS"] = json.dumps(watch_options or {})
    if mode == "record":
        from vramtop.commands.run import boot_dir

        e["VRAMTOP_RECORD"] = str(workdir / RECORDING_NAME)
        e["PYTHONPATH"] = os.pathsep.join([boot_dir(), *[p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p]])
    if env:
        e.update(env)
    return e


def command(mode: str, script: Path, args=(), workdir: Path | None = None) -> list[str]:
    py = sys.executable
    args = [str(a) for a in args]
    if mode in ("bare", "watch", "record"):
        return [py, str(script), *args]
    if mode == "run":
        return [py, "-m", "vramtop", "run", "--no-tui", "--", py, str(script), *args]
    if mode == "run_record":
        return [py, "-m", "vramtop", "run", "--record", str(Path(workdir) / RECORDING_NAME), "--", py, str(script),
                *args]
    if mode == "module":
        return [py, "-m", "vramtop_agent", str(script), *args]
    raise ValueError(f"unknown mode {mode!r}; one of {MODES}")


@dataclass
class Launched:
    """A running job; `result()` waits for it and collects what it left."""

    mode: str
    proc: subprocess.Popen
    workdir: Path
    runtime_dir: Path
    tmpdir: Path
    allow_files: tuple = ()

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def result(self, timeout: float = 180.0) -> RunResult:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            err += f"\n[invariance harness: killed after {timeout} s]"
        rec = self.workdir / RECORDING_NAME
        res = RunResult(self.mode, self.proc.returncode, out, err, self.workdir, self.runtime_dir, self.tmpdir,
                        recording=rec if rec.exists() else None)
        res.leftovers = leftovers(res, self.allow_files)
        return res


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def launch(tmp_path: Path, script: Path | str, args=(), mode: str = "bare", watch_options: dict | None = None,
           env: dict | None = None, allow_files=(), stdin=subprocess.DEVNULL, tag: str = "",
           new_session: bool = False) -> Launched:
    """Start one run of `script` (a path from write_script, or the script's text) in `mode`.

    new_session: start it in a session of its own, without a controlling terminal (as under a supervisor),
    with SIGINT's default action: a shell's background job (`cmd &` without job control, as a CI runner's
    may be) ignores SIGINT, every process under it inherits that, and a supervisor's SIGINT would then
    reach no one, with or without vramtop.
    """
    tmp_path = Path(tmp_path)
    if not isinstance(script, Path):
        script = write_script(tmp_path, script)
    base = tmp_path / f"{mode}{tag}"
    workdir, runtime_dir, tmpdir = base / "work", base / "rt", base / "tmp"
    for d in (workdir, tmpdir):
        d.mkdir(parents=True, exist_ok=True)
    e = job_env(mode, workdir, runtime_dir, tmpdir, watch_options, env)
    proc = subprocess.Popen(command(mode, script, args, workdir), cwd=workdir, env=e, stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                            start_new_session=new_session, preexec_fn=_default_sigint if new_session else None)
    return Launched(mode, proc, workdir, runtime_dir, tmpdir, tuple(allow_files))


def run_script(tmp_path: Path, script: Path | str, args=(), mode: str = "bare", watch_options: dict | None = None,
               env: dict | None = None, allow_files=(), timeout: float = 180.0, tag: str = "") -> RunResult:
    """Run `script` once in `mode` and collect the result."""
    return launch(tmp_path, script, args, mode, watch_options, env, allow_files, tag=tag).result(timeout)


def leftovers(res: RunResult, allow_files=()) -> list[str]:
    """Files the run left: anything in its runtime dir or TMPDIR; in its workdir anything but the
    recording and `allow_files` (names relative to the workdir). Waits briefly for a forked child."""
    def runtime_files():
        return sorted(res.runtime_dir.iterdir()) if res.runtime_dir.exists() else []

    for _ in range(20):
        if not runtime_files():
            break
        time.sleep(0.1)
    found = [f"runtime dir: {p.name}" for p in runtime_files()]
    found += [f"TMPDIR: {p.name}" for p in sorted(res.tmpdir.iterdir())]  # top level: caches differ inside
    allowed = {RECORDING_NAME, *map(str, allow_files)}
    found += [f"workdir: {p.relative_to(res.workdir)}" for p in sorted(res.workdir.rglob("*"))
              if str(p.relative_to(res.workdir)) not in allowed]
    return found


def compare(bare: RunResult, watched: RunResult, rss_bound: int = DEFAULT_RSS_BOUND,
            extra_stderr=(), check_stdout: bool = True) -> list[str]:
    """What differs between a bare run and a watched one (an empty list: invariant)."""
    problems = []
    tag = f"[{watched.mode}]"
    if watched.returncode != bare.returncode:
        problems.append(f"{tag} exit code {watched.returncode} != bare {bare.returncode}")
    if watched.losses != bare.losses:
        first = next((i for i, (a, b) in enumerate(zip(bare.losses, watched.losses)) if a != b),
                     min(len(bare.losses), len(watched.losses)))
        problems.append(f"{tag} losses differ from step {first}: {len(watched.losses)} vs bare {len(bare.losses)}; "
                        f"{watched.losses[first:first + 2]} vs {bare.losses[first:first + 2]}")
    elif not bare.losses:
        problems.append("the script printed no losses (use vt_loss)")
    if check_stdout and watched.plain_stdout != bare.plain_stdout:
        problems.append(f"{tag} stdout differs:\n{watched.plain_stdout[-800:]}\n--- bare:\n{bare.plain_stdout[-800:]}")
    problems += _stderr_problems(bare, watched, extra_stderr)
    gb, gw = bare.rss_growth, watched.rss_growth
    if gb is not None and gw is not None and gw - gb > rss_bound:
        problems.append(f"{tag} RSS grew {gw / 2**20:.1f} MiB, bare {gb / 2**20:.1f} MiB "
                        f"(bound +{rss_bound / 2**20:.0f} MiB)")
    elif (gb is None) != (gw is None):
        problems.append(f"{tag} rss marks missing: bare {bare.rss}, watched {watched.rss}")
    # What the bare job leaves too (torch's TMPDIR caches, the script's own files) is the job's.
    left = [f for f in watched.leftovers if f not in bare.leftovers]
    if left:
        problems.append(f"{tag} left files behind: {left}")
    return problems


def _stderr_problems(bare: RunResult, watched: RunResult, extra_stderr) -> list[str]:
    want = list(bare.stderr_lines())
    extra = []
    for line in watched.stderr_lines():
        if want and line == want[0]:
            want.pop(0)
        else:
            extra.append(line)
    problems = []
    tag = f"[{watched.mode}]"
    patterns = [re.compile(p) for p in extra_stderr]
    for pat in patterns:
        hits = [ln for ln in extra if pat.search(ln)]
        if len(hits) != 1:
            problems.append(f"{tag} expected exactly one stderr line matching {pat.pattern!r}, got {len(hits)}")
        extra = [ln for ln in extra if not pat.search(ln)]
    if extra or want:
        problems.append(f"{tag} stderr differs from bare: extra {extra[:10]}, missing {want[:10]}")
    return problems


def assert_invariant(tmp_path: Path, script: str, args=(), modes=WATCHED_MODES, watch_options: dict | None = None,
                     env: dict | None = None, rss_bound: int = DEFAULT_RSS_BOUND, extra_stderr=None,
                     allow_files=(), check_stdout: bool = True, timeout: float = 180.0,
                     parallel: bool = True) -> dict[str, RunResult]:
    """Run the script bare and in each mode; assert every watched run is invariant. Returns the runs by mode.

    extra_stderr: regexes of stderr lines every watched run must add (each exactly once), or a dict
    mode -> regexes. parallel: start all runs at once (each has its own dirs; losses do not depend on
    timing), which roughly halves the wall time of the interpreter and torch start-ups.
    """
    path = write_script(tmp_path, script)
    names = ["bare", *modes]
    if parallel:
        started = {m: launch(tmp_path, path, args, m, watch_options, env, allow_files) for m in names}
        runs = {m: started[m].result(timeout) for m in names}
    else:
        runs = {m: run_script(tmp_path, path, args, m, watch_options, env, allow_files, timeout) for m in names}
    problems = []
    for mode in modes:
        res = runs[mode]
        expected = extra_stderr.get(mode, ()) if isinstance(extra_stderr, dict) else (extra_stderr or ())
        found = compare(runs["bare"], res, rss_bound, expected, check_stdout)
        if found:
            problems += found + [res.describe()]
    if problems:
        raise AssertionError("job not invariant under vramtop:\n" + "\n".join(problems)
                             + "\n" + runs["bare"].describe())
    return runs


__all__ = ["MODES", "WATCHED_MODES", "PRELUDE", "RECORDING_NAME", "RunResult", "Launched", "write_script", "job_env",
           "command", "launch", "run_script", "leftovers", "compare", "assert_invariant", "signal"]
