"""`minifn train`: flags in, minifn.run.train, lines out; signals and exit codes."""

from __future__ import annotations

import os
import sys

import click

from minifn.cli.base import bundled, cli, given_settings, load_config_file, one_line_errors, setting_options
from minifn.cli.signals import capture_warnings, stop_on_signals
from minifn.config import Config, DataConfig, cli_fields


@cli.command()
@click.option("--config", callback=load_config_file, is_eager=True, expose_value=False,
              type=click.Path(dir_okay=False), help="TOML file of option defaults, keyed by flag name.")
@setting_options(cli_fields())
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Data-parallel processes on this machine (each runs this same command).")
@click.option("--verbose/--no-verbose", default=False, help="Per-batch lines, and tracebacks with errors.")
@one_line_errors
def train(nproc, verbose, **settings):
    """Train a transformer on a text file; rerun the same command to resume."""
    from minifn.cli.launch import launch
    from minifn.cli.report import Printer
    from minifn.loop import Interrupted
    from minifn.run import train as run_training

    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        sys.exit(launch(nproc))
    if settings["dataset"] == DataConfig.dataset:
        settings["dataset"] = bundled(settings["dataset"])
    config = Config.from_flat(settings)
    main = os.environ.get("RANK", "0") == "0"
    printer = Printer(verbose, config.run.criterion)
    with stop_on_signals() as stop, capture_warnings():
        try:
            run_training(config, on_event=lambda e: printer({**e, "compile": config.run.compile}),
                         stop_requested=stop.requested, given=given_settings(settings))
        except Interrupted as e:
            printer.close()  # before the message, so the bar does not overwrite it
            if main:
                click.echo(f"Interrupted: checkpoint saved to {e.path}; run the same command again to resume.",
                           err=True)
            sys.exit(128 + e.signum)
        finally:
            printer.close()
    if main:
        click.echo(f"Training complete! Checkpoint saved: {config.run.model}")
