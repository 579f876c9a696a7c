"""Signals and warnings, scoped to one run: installed on entry, restored on exit, so a script can call
the CLI's training twice in one process."""

from __future__ import annotations

import os
import signal
import warnings
from contextlib import contextmanager

import click


class StopFlag:
    """SIGINT/SIGTERM set a flag that the loop checks between steps. The first one also hands both signals
    back to the operating system's default, so a second one ends the process at once, even inside a long
    kernel where no Python handler can run (the checkpoint on disk stays whole: saves are atomic).

    A worker of `minifn train --nproc N` (second_ends=False) keeps the flag: a Ctrl-C reaches it twice, from
    the terminal and forwarded by the launcher, and that is one request; the launcher ends the workers on a
    second one."""

    def __init__(self, second_ends: bool = True):
        self.signum, self.second_ends = None, second_ends

    def __call__(self, signum, frame):
        self.signum = self.signum or signum
        if self.second_ends:
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, signal.SIG_DFL)

    def requested(self) -> int | None:
        return self.signum


def _exit_on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one ends the process at once
    raise SystemExit(128 + signum)


def exit_cleanly_on_sigterm() -> None:
    """SIGTERM ends the process as Ctrl-C does, by an exception, so that cleanup runs: a prepare's temporary
    folder, a tokenize's or plot's temporary file are removed on the way out. The default action would
    skip them. Exit status 143, as the shell reports a SIGTERM; train's stop_on_signals replaces it while
    training."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)


@contextmanager
def stop_on_signals():
    flag = StopFlag(second_ends="MINIFN_LAUNCHER_PID" not in os.environ)  # set by cli.launch for its workers
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
