"""`minifn train --nproc N`: run the same command in N processes on this machine (as torchrun would),
forward SIGINT/SIGTERM to them, wait for their final saves, and exit with their status. A second signal
ends them at once (a Ctrl-C also reaches them from the terminal: the workers count that as the same
request). A rank that fails stops the others; only one error line is printed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import click


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _without_nproc(argv: list[str]) -> list[str]:
    args, given = [], iter(argv)
    for a in given:
        if a == "--nproc":
            next(given, None)  # and its value
        elif not a.startswith("--nproc="):
            args.append(a)
    return args


def launch(nproc: int, settle_s: float = 5.0, grace_s: float = 30.0) -> int:
    """Start nproc ranks of this command and return the exit status the user should see. When a rank fails,
    the others get settle_s to end by themselves, then SIGTERM (they save), then grace_s before a kill."""
    port, args = _free_port(), _without_nproc(sys.argv[1:])
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "MINIFN_LAUNCHER_PID": str(os.getpid())}
        procs.append(subprocess.Popen([sys.executable, "-m", "minifn", *args], env=env,
                                      stderr=None if rank == 0 else subprocess.PIPE, text=True))
    received = []

    def forward(signum, frame):
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                if len(received) == 1:
                    p.send_signal(signum)
                else:  # a second one: at once
                    p.kill()

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        failed, failed_at, stopping = None, None, False
        while any(p.poll() is None for p in procs):
            if failed is None:
                failed = next((r for r, p in enumerate(procs) if p.poll() not in (None, 0)), None)
                failed_at = time.time() if failed is not None else None
            elif not stopping and time.time() - failed_at > settle_s:
                # a bad flag fails every rank by itself; the others are stuck on the dead one
                stopping = True
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)  # they save and stop at their next step
            elif time.time() - failed_at > settle_s + grace_s:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.05)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    codes = [p.returncode for p in procs]
    if received and any(codes):  # (a signal that came after the last step leaves a finished run)
        return 128 + received[0]
    failed = failed if failed is not None else next((r for r, c in enumerate(codes) if c), None)
    if failed is None:
        return 0
    if codes[0] not in (0, 143, -signal.SIGTERM):  # rank 0 failed by itself and printed why
        failed = 0
    code = codes[failed]
    if code < 0:  # killed by a signal (the OOM killer's SIGKILL): it printed nothing, and the others only
        # that it went away
        click.echo(f"Error: rank {failed} was killed by {signal.Signals(-code).name}", err=True)
    elif failed > 0:  # rank 0 printed nothing about it: show the failing rank's own error line
        lines = (procs[failed].stderr.read() or "").strip().splitlines()
        click.echo(lines[-1] if lines else f"Error: rank {failed} exited with status {code}", err=True)
    return code if code > 0 else 128 - code
