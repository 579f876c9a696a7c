"""Signals and warnings, scoped to one run: installed on entry, restored on exit, so a script can call
the CLI's training twice in one process."""

from __future__ import annotations

import signal
import warnings
from contextlib import contextmanager

import click


class StopFlag:
    """SIGINT/SIGTERM set a flag that the loop checks between steps; a second signal aborts at once
    (the checkpoint on disk stays whole either way: saves are atomic)."""

    def __init__(self):
        self.signum = None

    def __call__(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

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
