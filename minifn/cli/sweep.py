"""`minifn sweep`: `minifn train` for several values at once, e.g. --lr 1e-4,3e-4,1e-3 --seed 0,1."""

from __future__ import annotations

import math
import sys
import warnings

import click

from minifn.cli.base import bundled, cli, given_settings, load_config_file, one_line_errors, setting_options
from minifn.cli.signals import capture_warnings, stop_on_signals
from minifn.config import Config, DataConfig, cli_fields
from minifn.sweep_run import SWEEPABLE

FIELDS = [f for f in cli_fields() if f.name != "model"]


def _values(name: str, text, kind) -> list:
    """A comma-separated list of the setting's type (one value is a list of one). An empty entry
    ('0.003,,0.01') is refused rather than dropped: it is a typo, perhaps of a value the user meant to
    sweep; nan and inf are refused as flags refuse them."""
    flag = f"--{name.replace('_', '-')}"
    entries = [v.strip() for v in str(text).split(",")]
    if not any(entries):
        raise click.BadParameter(f"{flag} needs at least one value, got {text!r}")
    if "" in entries:
        raise click.BadParameter(f"{flag} has an empty entry in {text!r}; separate the values with single commas")
    try:
        values = [kind(v) for v in entries]
    except ValueError:
        raise click.BadParameter(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise click.BadParameter(f"{flag} takes finite numbers, got {text!r}")
    return values


@cli.command()
@click.option("--config", callback=load_config_file, is_eager=True, expose_value=False,
              type=click.Path(dir_okay=False), help="TOML file of option defaults, keyed by flag name.")
@setting_options(FIELDS, lists=SWEEPABLE)
@click.option("--output", default="checkpoints/sweep", show_default=True,
              help="Folder of the members' checkpoints (NAME.pt, e.g. lr=0.001,seed=0.pt) and metrics logs.")
@click.option("--verbose/--no-verbose", default=False, help="Tracebacks with errors.")
@one_line_errors
def sweep(output, verbose, **settings):
    """Train one run per combination of comma-separated values, all in one vmapped compiled step."""
    from minifn.loop import Interrupted
    from minifn.sweep_run import grid, train_sweep

    kinds = {f.name: type(f.default) for f in FIELDS}
    swept = {}
    for name in SWEEPABLE:
        values = _values(name, settings[name], kinds[name])
        settings[name] = values[0]
        if len(values) > 1:
            swept[name] = values
    if settings["dataset"] == DataConfig.dataset:
        settings["dataset"] = bundled(settings["dataset"])
    config, members = Config.from_flat(settings), grid(swept)
    finals, last = {}, {}  # each member's latest epoch or eval event; the latest step's losses

    def report(e):
        if e["kind"] == "step":
            last.update(step=e["step"], losses=e["losses"], frozen=e["frozen"])
        elif e["kind"] == "start":
            last["members"] = e["members"]
            click.echo(f"Sweeping {len(e['members'])} runs in one step ({', '.join(e['members'])}) on {e['tokens']} "
                       f"tokens; {e['steps_per_epoch']} steps/epoch, {e['total_steps']} steps in all, device "
                       f"{e['device']}, {e['precision']}, compile {e['compile']}; checkpoints in {e['folder']}")
        elif e["kind"] == "diverged":
            overflowed = "" if e["finite_weights"] else (" (its weights had already overflowed the step before, so "
                                                          "its checkpoint will hold non-finite weights)")
            click.echo(f"[Step: {e['step']}] {e['member']}: the loss or its gradients became non-finite; this run "
                       f"is frozen at its state before that step{overflowed}, the others go on")
        elif e["kind"] in ("epoch", "eval"):
            finals[e["member"]] = e
            where = f"[Epoch: {e['epoch']}/{e['epochs']}]" if e["kind"] == "epoch" else f"[Step: {e['step']}]"
            line = f"{where} [{e['member']}]" + (f" [Avg Loss: {e['loss']:.4f}]" if "loss" in e else "")
            line += f" [Val Loss: {e['val_loss']:.4f}]" if "val_loss" in e else ""
            click.echo(line + (" [frozen]" if e["frozen"] else ""))

    with stop_on_signals() as stop, capture_warnings():
        # vmap runs CPU attention once per member (no batching rule yet); known, and measured in RESULTS.md
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
        try:
            train_sweep(config, members, output, on_event=report, stop_requested=stop.requested,
                        given=given_settings(settings))
        except Interrupted as e:
            click.echo(f"Interrupted: every run saved in {e.path}; run the same command again to resume.", err=True)
            sys.exit(128 + e.signum)
    key = "val_loss" if any("val_loss" in e for e in finals.values()) else "loss"
    by = "validation loss" if key == "val_loss" else "training loss"
    stale = "step" in last and (len(finals) < len(last["members"])
                                or any(e["step"] != last["step"] for e in finals.values()))
    if key == "loss" and stale:  # a step budget ended the sweep inside an epoch, after its last epoch event
        finals = {name: {"loss": loss, "frozen": frozen}
                  for name, loss, frozen in zip(last["members"], last["losses"], last["frozen"])}
        by = f"training loss at the last step ({last['step']})"
    click.echo(f"Sweep complete! Runs ranked by {by}:")
    for name, e in sorted(finals.items(), key=lambda item: (item[1]["frozen"], item[1].get(key, float("inf")))):
        click.echo(f"  {e.get(key, float('nan')):.4f}  {name}{'  (frozen)' if e['frozen'] else ''}  "
                   f"{output}/{name}.pt")
