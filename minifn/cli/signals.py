"""Signals and warnings, scoped to one run: installed on entry, restored on exit, so a script can call
the CLI's training twice in one process."""

from __future__ import annotations

import signal
import warnings
from contextlib import contextmanager

import click


class StopFlag:
    """SIGINT/SIGTERM set a flag that the loop checks between steps. The first one also hands both signals
    back to the operating system's default, so a second one ends the process at once, even inside a long
    kernel where no Python handler can run (the checkpoint on disk stays whole: saves are atomic)."""

    def __init__(self):
        self.signum = None

    def __call__(self, signum, frame):
        self.signum = signum
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL)

    def requested(self) -> int | None:
        return self.signum


@contextmanager
def stop_on_signals():
    flag = StopFlag()
    previous = {s: signal.signal(s, flag) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def capture_warnings():
    """Warnings print as one 'Warning: ...' line on stderr, for the duration of the block only."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda msg, *a, **k: click.echo(f"Warning: {msg}", err=True)
        yield
