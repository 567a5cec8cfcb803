"""`vramtop attach [PID | ENDPOINT | HOST ...]`: the live dashboard of a training process, or of a whole job.

- no target: the agents on this machine. One agent: its dashboard. The ranks
  of one multi-process job (torchrun): the job view. Several unrelated
  agents: a picker. None: the GPUs and their processes (NVML) while waiting
  for one to start.
- PID or ENDPOINT: that agent. A PID without an agent (a job started
  without vramtop): say what will happen, inject one (vramtop/inject.py,
  attach_inject.py), then its dashboard; --no-inject: wait for an agent.
- HOST (user@host, ssh://user@host:port, an ssh config alias), one or more,
  or --hosts FILE: the agents there, listed by running `vramtop ls --json`
  over your ssh, reached through ssh tunnels (vramtop.remote). One agent:
  its dashboard; one job across the hosts: the job view.
- --all: every agent found, as one job view.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import re

from vramtop import alerts
from vramtop.commands.common import (
    add_curve_keys,
    add_refresh,
    add_remote_vramtop,
    add_verb,
    check_curve_keys,
    check_refresh,
    refuse_remote_vramtop,
)
from vramtop.errors import UserError

_ENDPOINT = re.compile(r"^(tcp|ipc)://")


def register(sub: argparse._SubParsersAction) -> None:
    p = add_verb(
        sub, "attach", run,
        help="open the live dashboard of a training process (or of every rank of a job)",
        description="Attach to vramtop agents. With no TARGET, find the agents running on this machine: attach to "
        "the only one, show every rank of a multi-process job, let you pick among unrelated agents, or show the "
        "GPUs while waiting for one to start. With HOSTs, do the same on those machines over ssh.",
    )
    p.add_argument("targets", nargs="*", metavar="TARGET",
                   help="a PID, an endpoint (tcp://127.0.0.1:5555, ipc:///path), or one or more hosts "
                   "(user@host, ssh://user@host:port, an ssh config alias)")
    p.add_argument("--hosts", metavar="FILE", help="a file of hosts, one per line (# comments)")
    p.add_argument("--all", action="store_true", help="show every agent found as one job view")
    add_remote_vramtop(p, "the hosts")
    p.add_argument("--no-inject", action="store_true",
                   help="never inject the agent into a process started without vramtop (NVML view only)")
    p.add_argument("--yes", "-y", action="store_true",
                   help="inject the agent into a process started without vramtop without asking (docs/attach.md)")
    add_refresh(p, "screen")
    add_curve_keys(p, server_help="with a PID or ENDPOINT: the agent's CURVE public key file (NAME.key), for an "
                   "agent that encrypts its stream (watch(curve_secret_key=...)); see docs/security.md",
                   client_help="with --server-key: this viewer's CURVE secret key file (NAME.key_secret, mode "
                   "0600), for an agent that admits only listed viewers (watch(curve_client_keys=...))")
    alerts.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    check_refresh(args)
    targets = list(args.targets or [])
    local = [t for t in targets if t.isdigit() or _ENDPOINT.match(t)]
    hosts = [t for t in targets if t not in local]
    if args.hosts:
        from vramtop.remote import read_hosts_file

        hosts += read_hosts_file(args.hosts)
    if hosts and (args.server_key or args.client_key):
        raise UserError("--server-key/--client-key are for a PID or ENDPOINT (an ssh tunnel is already encrypted)")
    if hosts:
        if local:
            raise UserError("give either one PID/ENDPOINT or hosts, not both")
        return attach_hosts(hosts, all_agents=args.all, remote_vramtop=args.remote_vramtop, refresh_hz=args.refresh,
                            inject=not args.no_inject, yes=args.yes)
    refuse_remote_vramtop(args)
    if len(targets) > 1:
        raise UserError("give one PID or ENDPOINT (several targets are for hosts)")
    if targets and targets[0].isdigit() and not args.no_inject and not (args.server_key or args.client_key):
        from vramtop.attach_inject import attach_injecting

        return attach_injecting(int(targets[0]), yes=args.yes, refresh_hz=args.refresh)
    if targets:
        return attach(targets[0], refresh_hz=args.refresh, server_key=args.server_key, client_key=args.client_key,
                      monitor=alerts.from_args(args))
    if args.server_key or args.client_key:
        raise UserError("--server-key/--client-key need a PID or ENDPOINT")
    return attach_local(all_agents=args.all, refresh_hz=args.refresh, inject=not args.no_inject, yes=args.yes,
                        monitor=alerts.from_args(args))


def attach(target: str | None, refresh_hz: float = 4.0, server_key: str | None = None,
           client_key: str | None = None, monitor=None) -> int:
    from vramtop.live_source import LiveSource
    from vramtop.tui.app import VramtopApp

    check_curve_keys(server_key, client_key)
    if server_key:
        from vramtop_agent import curve

        try:  # a bad key file: one clear line now, not a silent dashboard
            curve.load_key(server_key)
            if client_key:
                curve.load_keypair(client_key)
        except curve.CurveKeyError as exc:
            raise UserError(str(exc)) from None
    source = LiveSource(target, curve_server_key=server_key, curve_client_key=client_key)
    VramtopApp(source, refresh_hz=refresh_hz, alerts=monitor).run()
    if monitor is not None:
        monitor.wait()
    return 0


def attach_pid(pid: int, refresh_hz: float = 4.0, monitor=None) -> int:
    """Attach to the agent inside process `pid` (waits for it to start publishing)."""
    return attach(str(pid), refresh_hz=refresh_hz, monitor=monitor)


def pick_job(agents: list[dict], all_agents: bool):
    """(agents of the job to show, predicate for agents found later), or None for the single view."""
    from vramtop.job_state import group_jobs, same_job

    if all_agents:
        return (agents, None) if agents else None
    jobs = group_jobs(agents)
    multi = [j for j in jobs if len(j) > 1 or (j[0].get("world_size") or 1) > 1]
    if len(jobs) == 1 and multi:
        return jobs[0], same_job(jobs[0])
    return None


def attach_local(all_agents: bool = False, refresh_hz: float = 4.0, inject: bool = False, yes: bool = False,
                 monitor=None) -> int:
    from vramtop_agent import discovery

    agents = discovery.list_agents()
    if not agents and inject:  # plain PyTorch processes (started without vramtop): offer to inject
        from vramtop.attach_inject import offer_plain

        agents = offer_plain(yes=yes)
        if len(agents) == 1:
            return attach(str(agents[0]["pid"]), refresh_hz=refresh_hz, monitor=monitor)
    chosen = pick_job(agents, all_agents)
    if chosen is not None:
        from vramtop.job_source import JobSource

        agents, match = chosen
        return _run_job(JobSource(agents, match=match), refresh_hz)
    from vramtop.gpus import NodeSource
    from vramtop.tui.app import VramtopApp

    VramtopApp(NodeSource(), refresh_hz=refresh_hz, alerts=monitor).run()
    return 0


def list_hosts(hosts, remote_vramtop: str | None = None) -> list[dict]:
    """`vramtop ls --json` on every host at once; the first failure (in host order) is the error."""
    from vramtop.remote import remote_ls

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
        futures = [pool.submit(remote_ls, h, remote_vramtop) for h in hosts]
        agents: list[dict] = []
        for f in futures:
            agents += f.result()  # raises the host's UserError
    return agents


def attach_hosts(hosts: list[str], all_agents: bool = False, remote_vramtop: str | None = None,
                 refresh_hz: float = 4.0, inject: bool = False, yes: bool = False) -> int:
    from vramtop.remote import parse_host

    parsed = [parse_host(h) for h in hosts]
    if len({h.spec for h in parsed}) != len(parsed):
        raise UserError("a host is given twice")
    agents = list_hosts(parsed, remote_vramtop)  # unreachable host / no vramtop: one line, before any TUI
    if not agents and inject and len(parsed) == 1:  # plain PyTorch processes there: offer to inject
        from vramtop.attach_inject import offer_plain_remote

        agents = offer_plain_remote(parsed[0], remote_vramtop, yes=yes)
    chosen = pick_job(agents, all_agents)
    if chosen is not None:
        from vramtop.job_source import JobSource

        job, match = chosen
        return _run_job(JobSource(job, hosts=parsed, match=match, remote_vramtop=remote_vramtop, rescan_s=5.0),
                        refresh_hz)
    if len(parsed) > 1:
        if not agents:
            raise UserError(f"no vramtop agent on {', '.join(h.spec for h in parsed)}")
        from vramtop.job_state import group_jobs

        n = len(group_jobs(agents))
        raise UserError(f"{len(agents)} agents of {n} different jobs on these hosts: attach to one host, "
                        f"or pass --all to see them all")
    from vramtop.remote import RemoteSource
    from vramtop.tui.app import VramtopApp

    source = RemoteSource(parsed[0], agents, remote_vramtop=remote_vramtop)
    VramtopApp(source, refresh_hz=refresh_hz).run()
    return 0


def _run_job(source, refresh_hz: float) -> int:
    from vramtop.tui.job_view import JobApp

    JobApp(source, refresh_hz=refresh_hz).run()
    return 0
