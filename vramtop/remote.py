"""Remote nodes over the user's own `ssh`: listing their agents and tunnelling to their sockets.

Nothing here speaks the SSH protocol. Every connection is the user's own
`ssh` binary (or `$VRAMTOP_SSH`, e.g. "ssh -F ~/.ssh/cluster.conf"), so keys,
agents, ProxyJump, ControlMaster and ~/.ssh/config work exactly as they do
for the user. `BatchMode=yes` is always passed: a password or host-key prompt
can never appear inside the TUI; ssh fails instead, and its last line becomes
ours.

- Listing: `ssh HOST -- sh -c '... vramtop ls --json'`; the JSON is parsed and
  validated (never unpickled, never evaluated).
- Tunnelling: `ssh -L LOCAL.sock:REMOTE HOST cat` where LOCAL.sock is a unix socket
  in a fresh 0700 directory inside this user's vramtop runtime directory and
  REMOTE is the agent's own ipc socket path (stream-local forward) or its
  127.0.0.1:PORT. Nothing listens on a TCP port on either side: on the node
  sshd connects to the agent's socket; here only this user can open the
  socket file. The ssh process is ours: started, watched, restarted with a
  backoff when it dies (the ZeroMQ sockets reconnect by themselves), ended
  on close(), and ended by itself if this process dies first (the remote
  `cat` reads our stdin pipe, which closes with us).

`RemoteSource` is `LiveSource`'s remote twin (poll/status/choices/choose/
describe/close) for the single-process dashboard; `vramtop.job_source`
uses `SshTunnel` with one forward per rank for a whole job.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING
from urllib.parse import urlsplit

from vramtop.errors import UserError
from vramtop.source import Source

if TYPE_CHECKING:  # pyzmq is imported when a RemoteSource attaches, not with this module
    from vramtop.subscriber import Subscriber

SSH_ENV = "VRAMTOP_SSH"  # the ssh command line, shell-split (default: "ssh")
REMOTE_ENV = "VRAMTOP_REMOTE_VRAMTOP"  # how to run vramtop on the node (default: vramtop, else python3 -m vramtop)
CONNECT_TIMEOUT_S = 10
LS_TIMEOUT_S = 45.0
MAX_LS_OUTPUT = 4 * 1024 * 1024
NOT_FOUND = 127  # the remote shell's "command not found"

# Options that hold for every ssh we start: never prompt, never forward more than asked.
_COMMON_OPTS = (
    "BatchMode=yes",
    f"ConnectTimeout={CONNECT_TIMEOUT_S}",
    "ForwardAgent=no",
    "ForwardX11=no",
    "ServerAliveInterval=5",
    "ServerAliveCountMax=3",
)
_TUNNEL_OPTS = (
    "ExitOnForwardFailure=yes",  # a forward that cannot bind ends ssh: we notice and retry
    "StreamLocalBindUnlink=yes",  # a socket file left by a killed ssh is replaced
    "StreamLocalBindMask=0177",  # the local socket: owner only (and its directory is 0700)
    "RequestTTY=no",
)


# --------------------------------------------------------------------- hosts


@dataclass(frozen=True)
class Host:
    """Where to ssh: `spec` as the user wrote it, `dest` for ssh, `port` when given in an ssh:// URL."""

    spec: str
    dest: str
    port: int | None = None

    def ssh_args(self) -> list[str]:
        """The destination part of an ssh command line (after the options)."""
        return (["-p", str(self.port)] if self.port else []) + ["--", self.dest]

    def __str__(self) -> str:
        return self.spec


_DEST_RE = re.compile(r"^(?:[A-Za-z0-9._%+~-]+@)?[A-Za-z0-9._:%\[\]-]+$")


def parse_host(spec: str) -> Host:
    """`user@host`, `host` (an ssh config alias), or `ssh://[user@]host[:port]`."""
    spec = (spec or "").strip()
    if not spec:
        raise UserError("empty host")
    if spec.startswith("ssh://"):
        parts = urlsplit(spec)
        try:
            port = parts.port
        except ValueError:
            raise UserError(f"bad port in {spec!r}") from None
        host = parts.hostname
        if not host or (parts.path not in ("", "/")):
            raise UserError(f"bad ssh URL {spec!r}: expected ssh://[user@]host[:port]")
        dest = f"{parts.username}@{host}" if parts.username else host
    else:
        if "://" in spec:
            raise UserError(f"bad host {spec!r}: expected user@host, an ssh config alias or ssh://user@host:port")
        dest, port = spec, None
    # A destination starting with '-' would be read by ssh as an option.
    if dest.startswith("-") or not _DEST_RE.match(dest):
        raise UserError(f"bad host {spec!r}: expected user@host, an ssh config alias or ssh://user@host:port")
    return Host(spec, dest, port)


def read_hosts_file(path: str) -> list[str]:
    """One host per line; blank lines and '#' comments ignored."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserError(f"cannot read hosts file {path}: {exc.strerror or exc}") from None
    hosts = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            hosts.extend(line.split())
    if not hosts:
        raise UserError(f"no hosts in {path}")
    return hosts


# --------------------------------------------------------------------- ssh


def ssh_program() -> list[str]:
    """The user's ssh, as a list: $VRAMTOP_SSH shell-split, else `ssh` on the PATH."""
    raw = os.environ.get(SSH_ENV, "").strip()
    argv = shlex.split(raw) if raw else ["ssh"]
    if not shutil.which(argv[0]):
        raise UserError(f"no ssh client found ({argv[0]!r}): install OpenSSH or set {SSH_ENV}")
    return argv


def _opts(opts) -> list[str]:
    out: list[str] = []
    for o in opts:
        out += ["-o", o]
    return out


def ls_command(host: Host, remote_vramtop: str | None = None, args: str = "ls --json") -> list[str]:
    """`vramtop ls --json` (or `vramtop ARGS`) on `host`, run by a POSIX sh whatever the login shell is."""
    remote_vramtop = remote_vramtop or os.environ.get(REMOTE_ENV) or None
    if remote_vramtop:
        script = f"exec {remote_vramtop} {args}"
    else:
        # A non-interactive ssh shell often lacks the PATH of a login: try the module too.
        script = (f"if command -v vramtop >/dev/null 2>&1; then exec vramtop {args}; "
                  f"elif python3 -c 'import vramtop' >/dev/null 2>&1; then exec python3 -m vramtop {args}; "
                  f"else echo 'vramtop: command not found' >&2; exit {NOT_FOUND}; fi")
    return [*ssh_program(), *_opts(_COMMON_OPTS), "-T", "-n", *host.ssh_args(), "sh -c " + shlex.quote(script)]


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def remote_ls(host: Host | str, remote_vramtop: str | None = None, timeout: float = LS_TIMEOUT_S) -> list[dict]:
    """The agents running on `host` (`vramtop ls --json` over ssh), each tagged with `ssh_host`.

    Raises UserError with one line when the host cannot be reached or has no vramtop.
    """
    host = parse_host(host) if isinstance(host, str) else host
    cmd = ls_command(host, remote_vramtop)
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                              start_new_session=True)  # no controlling terminal: ssh cannot prompt
    except subprocess.TimeoutExpired:
        raise UserError(f"{host}: no answer from `vramtop ls` over ssh within {timeout:.0f} s") from None
    except OSError as exc:
        raise UserError(f"cannot run ssh: {exc}") from None
    err = proc.stderr.decode(errors="replace")
    out = proc.stdout[:MAX_LS_OUTPUT].decode(errors="replace")
    if proc.returncode == 255:
        why = _last_line(err) or "ssh failed"
        hint = ""
        if "Host key verification failed" in why:
            hint = " (connect once with plain `ssh` to check and accept its host key)"
        elif "Permission denied" in why:
            hint = " (vramtop never asks for a password: use a key or an ssh agent)"
        raise UserError(f"cannot reach {host} over ssh: {why}{hint}")
    if proc.returncode == NOT_FOUND or "No module named vramtop" in err or (
            proc.returncode != 0 and "not found" in err and "vramtop" in err):
        raise UserError(f"vramtop is not installed on {host} (or not on the PATH of a non-interactive ssh shell): "
                        f"pip install vramtop there, or pass --remote-vramtop /path/to/vramtop")
    if proc.returncode != 0:
        raise UserError(f"`vramtop ls` failed on {host} (exit {proc.returncode}): {_last_line(err) or 'no message'}")
    return parse_ls_output(out, host)


def parse_ls_output(out: str, host: Host) -> list[dict]:
    """The JSON list that `vramtop ls --json` printed (after any noise from the remote's shell rc files)."""
    data = None
    for line in reversed(out.strip().splitlines()):
        line = line.strip()
        if line.startswith("["):
            try:
                data = json.loads(line)
            except ValueError:
                continue
            break
    if not isinstance(data, list):
        raise UserError(f"unexpected output from `vramtop ls --json` on {host}: {_last_line(out) or 'nothing'}")
    agents = []
    for item in data:
        agent = _clean_info(item)
        if agent is not None:
            agent["ssh_host"] = host.spec
            agents.append(agent)
    return agents


def _clean_info(item) -> dict | None:
    """A discovery record from another machine: typed fields only, a connectable endpoint."""
    from vramtop_agent import discovery

    if not isinstance(item, dict) or discovery.check_info(dict(item)) is None:
        return None
    endpoint, pid = item.get("endpoint"), item.get("pid")
    if not isinstance(endpoint, str) or not isinstance(pid, int) or isinstance(pid, bool):
        return None
    if not (endpoint.startswith("ipc:///") or endpoint.startswith("tcp://")):
        return None
    out: dict = {"pid": pid, "endpoint": endpoint}
    for key, types in (("host", str), ("node", str), ("rank", int), ("local_rank", int), ("world_size", int),
                       ("start_time", (int, float)), ("proc_start", (int, float)), ("device", str),
                       ("device_name", str), ("gpu", (int, str)), ("gpu_name", str)):
        v = item.get(key)
        if isinstance(v, types) and not isinstance(v, bool):
            out[key] = v
    cmd = item.get("cmdline")
    if isinstance(cmd, list):
        out["cmdline"] = [str(c)[:500] for c in cmd[:100]]
    return out


_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/+@%=,~-]+$")
_SAFE_HOST = re.compile(r"^[A-Za-z0-9._-]+$")


def remote_target(endpoint: str) -> str:
    """What ssh forwards to on the node: the agent's socket path or HOST:PORT.

    The endpoint comes from the other machine: anything that could change how
    ssh reads the -L argument (a ':' in a path, spaces, an odd host) is refused.
    """
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        if not _SAFE_PATH.match(path):
            raise UserError(f"refusing to forward to the agent socket {path[:80]!r}: unexpected characters")
        return path
    parts = urlsplit(endpoint)
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or "127.0.0.1"
    if host in ("0.0.0.0", "*", "::", ""):
        host = "127.0.0.1"
    if port is None or not (_SAFE_HOST.match(host) or ":" in host and re.match(r"^[0-9a-fA-F:]+$", host)):
        raise UserError(f"refusing to forward to the agent endpoint {endpoint[:80]!r}")
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


def local_socket_dir() -> Path:
    """A fresh 0700 directory for tunnel sockets, short enough for sun_path."""
    from vramtop_agent import discovery

    base = discovery.runtime_dir()
    d = Path(tempfile.mkdtemp(prefix="ssh-", dir=base))
    if len(str(d)) > 80:  # sun_path is ~104-108 bytes; leave room for the socket name
        os.rmdir(d)
        d = Path(tempfile.mkdtemp(prefix="vt-", dir="/tmp"))
    os.chmod(d, 0o700)
    return d


# --------------------------------------------------------------------- tunnel


class SshTunnel:
    """One ssh carrying unix-socket forwards to one host; kept alive until close().

    `ensure()` never blocks: call it often (the sources call it on every poll).
    A dead ssh is restarted after a backoff (0.5 s doubling to 10 s; reset
    once a tunnel has lived 10 s).
    """

    def __init__(self, host: Host, forwards: list[tuple[str, str]], *, min_backoff: float = 0.5,
                 max_backoff: float = 10.0):
        self.host = host
        self.forwards = list(forwards)  # (local socket path, remote target)
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.last_error: str | None = None
        self.min_backoff, self.max_backoff = min_backoff, max_backoff
        self._backoff = min_backoff
        self._next_start = 0.0
        self._started_at = 0.0
        self._log: IO[bytes] | None = None  # ssh's stderr, for the last line of why it ended
        self._closed = False

    @property
    def restarts(self) -> int:
        return max(self.starts - 1, 0)

    def command(self) -> list[str]:
        fwd: list[str] = []
        for local, remote in self.forwards:
            fwd += ["-L", f"{local}:{remote}"]
        # Not `-N`: a remote `cat` that reads our stdin pipe. If this process dies without
        # closing the tunnel (SIGKILL, a crash), the pipe closes, cat ends, and so does ssh:
        # no orphaned tunnel, on any OS, without preexec_fn tricks.
        return [*ssh_program(), *_opts(_COMMON_OPTS), *_opts(_TUNNEL_OPTS), *fwd, *self.host.ssh_args(),
                "cat >/dev/null"]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def up(self) -> bool:
        """ssh runs and has bound every local socket (so it has authenticated)."""
        return self.alive() and all(os.path.exists(local) for local, _ in self.forwards)

    def ensure(self) -> None:
        if self._closed:
            return
        if self.proc is not None and self.proc.poll() is not None:
            self._reap()
        if self.proc is None and time.monotonic() >= self._next_start:
            self._start()

    def _reap(self) -> None:
        rc = self.proc.returncode if self.proc else None
        if self.proc is not None and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self.last_error = self._read_log() or f"ssh exited with status {rc}"
        lived = time.monotonic() - self._started_at
        self._backoff = self.min_backoff if lived > 10.0 else min(self._backoff * 2, self.max_backoff)
        self._next_start = time.monotonic() + self._backoff
        self.proc = None

    def _read_log(self) -> str:
        if self._log is None:
            return ""
        try:
            self._log.seek(0)
            return _last_line(self._log.read().decode(errors="replace"))
        except Exception:
            return ""
        finally:
            try:
                self._log.close()
            except Exception:
                pass
            self._log = None

    def _start(self) -> None:
        for local, _ in self.forwards:
            try:
                os.unlink(local)  # a socket file a killed ssh left behind
            except OSError:
                pass
        self._log = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would stall ssh
        try:
            # stdin: a pipe we never write to and close only by ending (see command()).
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=self._log, start_new_session=True)
        except (OSError, UserError) as exc:
            self.last_error = str(exc)
            self.proc = None
            self._next_start = time.monotonic() + self.max_backoff
            return
        self.starts += 1
        self._started_at = time.monotonic()

    def describe(self) -> str:
        if self._closed:
            return "closed"
        if self.up:
            return "tunnel up" + (f" (re-established {self.restarts}x)" if self.restarts else "")
        if self.alive():
            return "tunnel connecting"
        wait = max(self._next_start - time.monotonic(), 0.0)
        err = f": {self.last_error}" if self.last_error else ""
        return f"tunnel down{err}; retrying in {wait:.0f} s"

    def close(self) -> None:
        self._closed = True
        proc, self.proc = self.proc, None
        if proc is not None and proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=3)
            except (OSError, subprocess.TimeoutExpired):
                try:
                    proc.kill()
                    proc.wait(timeout=3)
                except (OSError, subprocess.TimeoutExpired):
                    pass
        self._read_log()
        for local, _ in self.forwards:
            try:
                os.unlink(local)
            except OSError:
                pass


# --------------------------------------------------------------------- source


class RemoteSource(Source):
    """One agent on another machine, through an SSH tunnel; the same shape as LiveSource.

    With several agents on the host, `choices` lists them (the app shows its
    picker and calls `choose`); with none, it keeps listing every `rescan_s`
    until one appears. Listings run in a worker thread: poll() never waits on ssh.
    """

    def __init__(self, host: Host | str, agents: list[dict] | None = None, *, remote_vramtop: str | None = None,
                 pid: int | None = None, rescan_s: float = 3.0):
        from vramtop.subscriber import Subscriber  # noqa: F401  (fail early if pyzmq is missing)

        self.host = parse_host(host) if isinstance(host, str) else host
        self.remote_vramtop = remote_vramtop
        self.want_pid = pid
        self.rescan_s = rescan_s
        self.sub: Subscriber | None = None
        self.tunnel: SshTunnel | None = None
        self.info: dict | None = None
        self.pid: int | None = None
        self.choices: list[dict] = []
        self.status = f"listing the agents on {self.host} over ssh"
        self._dir: Path | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vramtop-ls")
        self._scan: concurrent.futures.Future | None = None
        self._last_scan = 0.0
        self._last_frame = time.monotonic()
        self._gone = False
        self._listed_once = False
        if agents is not None:
            self._take_listing(agents)
        else:
            self._start_scan()

    # ------------------------------------------------------------------ listing

    def _start_scan(self) -> None:
        if self._scan is None:
            self._last_scan = time.monotonic()
            self._scan = self._pool.submit(remote_ls, self.host, self.remote_vramtop)

    def _scan_result(self) -> None:
        if self._scan is None or not self._scan.done():
            return
        fut, self._scan = self._scan, None
        try:
            agents = fut.result()
        except UserError as exc:
            self.status = f"{exc}; retrying"
            return
        except Exception as exc:  # noqa: BLE001 - a listing bug must not kill the view
            self.status = f"listing {self.host} failed: {exc}"
            return
        self._take_listing(agents)

    def _take_listing(self, agents: list[dict]) -> None:
        self._listed_once = True
        if self.want_pid is not None:
            agents = [a for a in agents if a.get("pid") == self.want_pid]
        if self.sub is not None:
            # Attached: the listing only tells whether our process still runs.
            mine = [a for a in agents if a.get("pid") == self.pid and a.get("rank") == (self.info or {}).get("rank")]
            self._gone = not mine
            return
        what = f"pid {self.want_pid}" if self.want_pid else "vramtop agent"
        self.offer_agents(agents, f"on {self.host}",
                          f"no {what} on {self.host} yet: waiting (listing every {self.rescan_s:.0f} s)")

    # ------------------------------------------------------------------ attaching

    def choose(self, info: dict) -> None:
        from vramtop.subscriber import Subscriber

        self._teardown()
        self._dir = local_socket_dir()
        local = str(self._dir / f"{info['pid']}-{info.get('rank', 0)}.sock")
        self.tunnel = SshTunnel(self.host, [(local, remote_target(info["endpoint"]))])
        self.tunnel.ensure()
        self.sub = Subscriber("ipc://" + local)  # ZeroMQ keeps reconnecting while ssh (re)binds it
        self.info = info
        self.pid = info.get("pid")
        self.choices = []
        self._gone = False
        self._last_frame = time.monotonic()
        self.status = f"connecting to pid {self.pid} on {self.host} through ssh"

    @property
    def describe(self) -> str:
        if self.info is None:
            return f"via ssh {self.host}"
        t = self.tunnel.describe() if self.tunnel else ""
        return f"via ssh {self.host} ({self.info.get('node') or self.info.get('host') or '?'}) {t}"

    # ------------------------------------------------------------------ polling

    def poll(self) -> list[dict]:
        self._scan_result()
        now = time.monotonic()
        if self.sub is None or self.tunnel is None:  # attached: both set by choose(), cleared by _teardown()
            if not self.choices and now - self._last_scan >= self.rescan_s:
                self._start_scan()
            return []
        self.tunnel.ensure()
        msgs = self.sub.poll(0)
        if msgs:
            self._last_frame = now
            self.status = f"attached to pid {self.pid} on {self.host}: {self.tunnel.describe()}"
        elif not self.tunnel.up:
            self.status = f"pid {self.pid} on {self.host}: {self.tunnel.describe()}"
        elif now - self._last_frame > 3.0:
            # Quiet with the tunnel up: is the process still there?
            if now - self._last_scan >= max(self.rescan_s, 5.0):
                self._start_scan()
            err = f" (ssh: {self.tunnel.last_error})" if self.tunnel.last_error else ""
            self.status = f"no data from pid {self.pid} on {self.host} for {now - self._last_frame:.0f} s{err}"
        return msgs

    def process_gone(self) -> bool:
        """True once a listing of the host no longer shows the attached process."""
        if not self._gone:
            return False
        if self.want_pid is None and self.sub is not None:
            # Follow the job to its next incarnation, like LiveSource does locally.
            self.status = f"process {self.pid} on {self.host} exited: waiting for a new agent"
            self._teardown()
            self._gone = False
            self._start_scan()
        return True

    @property
    def rejected(self) -> tuple[int, str | None]:
        if self.sub is None:
            return 0, None
        return self.sub.rejected, self.sub.last_rejection

    def list_agents(self) -> list[dict]:
        """For the app's agent picker: a fresh listing of the host (blocks on ssh)."""
        try:
            return remote_ls(self.host, self.remote_vramtop)
        except UserError as exc:
            self.status = str(exc)
            return []

    def _teardown(self) -> None:
        if self.sub is not None:
            self.sub.close()
            self.sub = None
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self.info = None
        self.pid = None

    def close(self) -> None:
        self._teardown()
        self._pool.shutdown(wait=False, cancel_futures=True)
