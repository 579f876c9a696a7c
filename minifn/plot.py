"""The loss-curve picture of a run: training loss per step, epoch averages and validation loss."""

from __future__ import annotations

import json
from pathlib import Path


def read_events(path: str | Path) -> list[dict]:
    events = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{path} line {number} is not JSON; give the .metrics.jsonl a run wrote") from None
    if not any(e.get("kind") == "step" for e in events):
        raise ValueError(f"{path} has no training steps to plot")
    return events


def plot_metrics(path: str | Path, output: str | Path = "loss.png") -> Path:
    """Write a PNG of loss against optimizer steps, with the epoch axis on top."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        raise ValueError("plotting needs matplotlib: pip install 'minifn[plot]'") from None
    events = read_events(path)
    steps = [e for e in events if e["kind"] == "step"]
    epochs = [e for e in events if e["kind"] == "epoch"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot([e["step"] for e in steps], [e["loss"] for e in steps], lw=0.8, alpha=0.45, label="train loss (step)")
    if epochs:
        ax.plot([e["step"] for e in epochs], [e["loss"] for e in epochs], "o-", ms=3, label="train loss (epoch avg)")
    val = [e for e in epochs if "val_loss" in e]
    if val:
        ax.plot([e["step"] for e in val], [e["val_loss"] for e in val], "s-", ms=3, label="validation loss")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token, log scale)")
    fig.suptitle(f"Training loss: {Path(path).name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if epochs:
        per_epoch = epochs[-1]["step"] / epochs[-1]["epoch"]
        top = ax.secondary_xaxis("top", functions=(lambda s: s / per_epoch, lambda e: e * per_epoch))
        top.set_xlabel("epoch")
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output)
    plt.close(fig)
    return output
