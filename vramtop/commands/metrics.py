"""`vramtop metrics [--port 9400] [--bind 127.0.0.1]`: the agents of this node in Prometheus text format."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time

from vramtop.commands.common import add_verb
from vramtop.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = add_verb(
        sub, "metrics", run,
        help="serve the agents of this node as Prometheus metrics",
        description="Follow every vramtop agent on this machine (agents that start later too) and serve their "
        "blocks, phase peaks and allocator/fragmentation numbers per rank at http://BIND:PORT/metrics in "
        "Prometheus text format. Binds to loopback unless --bind says otherwise. Needs prometheus-client "
        "(pip install 'vramtop[metrics]').",
    )
    p.add_argument("--port", type=int, default=9400, help="TCP port (default 9400; 0 picks a free one)")
    p.add_argument("--bind", default="127.0.0.1", metavar="ADDR",
                   help="address to listen on (default 127.0.0.1; anything else exposes the metrics to the network)")
    p.add_argument("--once", action="store_true",
                   help="print the metrics once (after --wait seconds of listening) instead of serving them")
    p.add_argument("--wait", type=float, default=2.0, metavar="S", help="with --once: seconds to listen first")


def run(args: argparse.Namespace) -> int:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise UserError("vramtop metrics needs prometheus-client: pip install 'vramtop[metrics]'") from None
    from vramtop.metrics import MetricsExporter
    from vramtop_agent.publisher import is_loopback_host

    if not 0 <= args.port < 65536:
        raise UserError("--port must be between 0 and 65535")
    exporter = MetricsExporter()
    try:
        if args.once:
            deadline = time.monotonic() + max(args.wait, 0.0)
            while time.monotonic() < deadline:
                exporter.pump(timeout_ms=100)
            sys.stdout.write(exporter.text())
            return 0
        if not is_loopback_host(args.bind):
            print(f"vramtop: warning: serving metrics on {args.bind}: anyone who can reach it can read them",
                  file=sys.stderr)
        try:
            host, port = exporter.serve(args.port, args.bind)
        except OSError as exc:
            raise UserError(f"cannot listen on {args.bind}:{args.port}: {exc.strerror or exc}") from None
        shown = f"[{host}]" if ":" in host else host
        print(f"vramtop metrics: serving http://{shown}:{port}/metrics (Ctrl-C to stop)", flush=True)
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda *_: done.set())
        try:
            while not done.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        exporter.close()
