"""The loss-curve picture of a run: training loss per step, epoch averages and validation loss."""

from __future__ import annotations

import json
import math
from pathlib import Path


class PlotError(ValueError):
    """A metrics file that cannot be plotted, or no matplotlib; the message says which."""


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_events(path: str | Path) -> list[dict]:
    """The step and epoch events of the latest run in a metrics log, each checked for the fields plotted."""
    events = []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            raise PlotError(f"{path} line {number} is not JSON; give the .metrics.jsonl a run wrote") from None
        if not (isinstance(event, dict) and event.get("kind") in ("step", "epoch") and _number(event.get("step"))
                and _number(event.get("loss")) and (event["kind"] == "step" or _number(event.get("epoch")))):
            raise PlotError(f"{path} line {number} is not a step or epoch event of a minifn run")
        events.append(event)
    if events and "run" in events[-1]:
        events = [e for e in events if e.get("run") == events[-1]["run"]]  # a killed older run's lines are left
    if not any(e["kind"] == "step" for e in events):
        raise PlotError(f"{path} has no training steps to plot")
    return events


def output_path(output: str | Path) -> Path:
    """Where the PNG goes: the path as given, or loss.png inside it when it is a folder."""
    output = Path(output)
    return output / "loss.png" if output.is_dir() else output


def plot_metrics(path: str | Path, output: str | Path = "loss.png") -> Path:
    """Write a PNG of loss against optimizer steps, with the epoch axis on top; returns the file written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        raise PlotError("plotting needs matplotlib: pip install 'minifn[plot]'") from None
    events = read_events(path)
    steps = [e for e in events if e["kind"] == "step"]
    epochs = [e for e in events if e["kind"] == "epoch" and e["epoch"] > 0]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot([e["step"] for e in steps], [e["loss"] for e in steps], lw=0.8, alpha=0.45, label="train loss (step)")
    if epochs:
        ax.plot([e["step"] for e in epochs], [e["loss"] for e in epochs], "o-", ms=3, label="train loss (epoch avg)")
    val = [e for e in epochs if _number(e.get("val_loss"))]
    if val:
        ax.plot([e["step"] for e in val], [e["val_loss"] for e in val], "s-", ms=3, label="validation loss")
    if all(e["loss"] > 0 for e in steps):
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    fig.suptitle(f"Training loss: {Path(path).name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if epochs and epochs[-1]["step"] > 0:
        per_epoch = epochs[-1]["step"] / epochs[-1]["epoch"]
        top = ax.secondary_xaxis("top", functions=(lambda s: s / per_epoch, lambda e: e * per_epoch))
        top.set_xlabel("epoch")
    fig.tight_layout()
    output = output_path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, format="png")
    plt.close(fig)
    return output
