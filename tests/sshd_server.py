"""A real OpenSSH server on loopback for the remote tests: throwaway keys, own config, high port.

`start_sshd(tmp)` writes a host key, a user key, an sshd_config and a client
config (`-F`) into `tmp` and starts `sshd -D` on 127.0.0.1. The "remote" is
this machine, reached only through ssh: the server sets VRAMTOP_RUNTIME_DIR
for its sessions to a directory of its own, so the viewer's discovery never
sees the remote agents directly.

Without sshd the tests skip, except under CI (CI=true) where they fail: CI
installs openssh-server (.ci/run), so a missing sshd there is a broken setup.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import free_port

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def require_sshd() -> None:
    missing = [name for name, path in (("sshd", SSHD if os.path.exists(SSHD) else None),
                                       ("ssh", shutil.which("ssh")), ("ssh-keygen", shutil.which("ssh-keygen")))
               if not path]
    if not missing:
        return
    msg = f"OpenSSH not installed ({', '.join(missing)} missing): apt-get install openssh-server openssh-client"
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(msg + " (CI must install it: see .ci/run)")
    pytest.skip(msg)


@dataclass
class Sshd:
    proc: subprocess.Popen
    port: int
    user: str
    alias: str
    client_config: Path
    remote_runtime_dir: Path
    log: Path

    @property
    def ssh_env(self) -> str:
        """The value of VRAMTOP_SSH that makes vramtop's ssh use this server's client config."""
        return f"ssh -F {self.client_config}"

    @property
    def url(self) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_sshd(tmp: Path) -> Sshd:
    require_sshd()
    tmp = Path(tmp)
    user = getpass.getuser()
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vramtop-test", "-f", str(tmp / name)],
                       check=True)
    shutil.copy(tmp / "user_key.pub", tmp / "authorized_keys")
    rrt = tmp / "remote-rt"
    rrt.mkdir(mode=0o700)
    port = free_port()
    (tmp / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {tmp / 'host_key'}
PidFile {tmp / 'sshd.pid'}
AuthorizedKeysFile {tmp / 'authorized_keys'}
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowStreamLocalForwarding yes
AllowTcpForwarding yes
SetEnv VRAMTOP_RUNTIME_DIR={rrt}
LogLevel ERROR
""")
    host_pub = (tmp / "host_key.pub").read_text().split()
    (tmp / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    alias = "vt-remote"
    (tmp / "ssh_config").write_text(f"""\
Host {alias}
  HostName 127.0.0.1
  Port {port}
Host *
  User {user}
  IdentityFile {tmp / 'user_key'}
  IdentitiesOnly yes
  UserKnownHostsFile {tmp / 'known_hosts'}
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  PasswordAuthentication no
  LogLevel ERROR
""")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # Debian's privilege-separation directory
    log = tmp / "sshd.log"
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(tmp / "sshd_config")], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    deadline = time.time() + 15
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {log.read_text()[-500:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError("sshd did not start listening")
    return Sshd(proc, port, user, alias, tmp / "ssh_config", rrt, log)
