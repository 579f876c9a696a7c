"""The loss-curve picture of a run: training loss per step, epoch averages and validation loss (of the EMA
weights too, when the run kept them), and the gradient noise scale below it when the run logged it."""

from __future__ import annotations

import json
import math
from pathlib import Path

from minifn.files import atomic_file, check_output_location


class PlotError(ValueError):
    """A metrics file that cannot be plotted, or no matplotlib; the message says which."""


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


REQUIRED = {"step": ("step", "loss"), "epoch": ("step", "epoch"), "eval": ("step",)}


def read_events(path: str | Path) -> list[dict]:
    """The step, epoch and eval events of the latest run in a metrics log, each checked for the fields plotted."""
    events = []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            raise PlotError(f"{path} line {number} is not JSON; give the .metrics.jsonl a run wrote") from None
        fields = REQUIRED.get(event.get("kind")) if isinstance(event, dict) else None
        if fields is None or not all(_number(event.get(f)) for f in fields):
            raise PlotError(f"{path} line {number} is not a step, epoch or eval event of a minifn run")
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


def image_format(output: Path) -> str:
    """The format matplotlib writes output in: its suffix's (svg, pdf, jpg...), png without one. Named
    explicitly because the figure is written to a temporary file, whose name says nothing."""
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = output.suffix.lower().removeprefix(".")
    known = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in known:
        raise PlotError(f"cannot write {output}: .{suffix} is not an image format matplotlib writes "
                        f"(give one of .{', .'.join(sorted(known))})")
    return suffix or "png"


def _validation(events: list[dict], key: str) -> list[dict]:
    return [e for e in events if e["kind"] in ("epoch", "eval") and _number(e.get(key))]


def plot_metrics(paths: str | Path | list, output: str | Path = "loss.png") -> Path:
    """Write a picture of loss against optimizer steps (a PNG, unless output's suffix names another format):
    one run, or several on one figure (a sweep's members); validation points, the EMA's, the epoch axis on
    top and, for --log-gns, a panel of the smoothed noise scale B_simple in tokens. Returns the file written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        raise PlotError("plotting needs matplotlib: pip install 'minifn[plot]'") from None
    output = output_path(output)
    check_output_location(output)  # before any work
    fmt = image_format(output)
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    runs = {p: read_events(p) for p in paths}
    gns = {p: [e for e in ev if e["kind"] == "step" and _number(e.get("gns"))] for p, ev in runs.items()}
    if any(gns.values()):
        fig, (ax, ax_gns) = plt.subplots(2, 1, sharex=True, figsize=(8, 7), dpi=120, height_ratios=(2, 1))
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for path, events in runs.items():
        name = "" if len(runs) == 1 else f"{path.name.removesuffix('.metrics.jsonl')}: "
        steps = [e for e in events if e["kind"] == "step"]
        line, = ax.plot([e["step"] for e in steps], [e["loss"] for e in steps], lw=0.8, alpha=0.45,
                        label=f"{name}train loss (step)")
        epochs = [e for e in events if e["kind"] == "epoch" and e["epoch"] > 0 and _number(e.get("loss"))]
        if epochs and len(runs) == 1:
            ax.plot([e["step"] for e in epochs], [e["loss"] for e in epochs], "o-", ms=3,
                    label="train loss (epoch avg)")
        for key, marker, label in (("val_loss", "s-", "validation loss"),
                                   ("ema_val_loss", "^--", "validation loss, EMA weights")):
            val = _validation(events, key)
            if val:
                ax.plot([e["step"] for e in val], [e[key] for e in val], marker, ms=3, color=line.get_color(),
                        label=f"{name}{label}")
        if gns[path]:
            ax_gns.plot([e["step"] for e in gns[path]], [e["gns"] for e in gns[path]], lw=1, color=line.get_color(),
                        label=name.removesuffix(": ") or None)  # the run's colour in the loss panel
    if all(e["loss"] > 0 for ev in runs.values() for e in ev if e["kind"] == "step"):
        ax.set_yscale("log")
    if any(gns.values()):
        ax_gns.set_ylabel("noise scale B_simple\n(tokens, smoothed)")
        ax_gns.grid(True, which="both", alpha=0.3)
        if len(runs) > 1:
            ax_gns.legend(fontsize="small")
    (ax_gns if any(gns.values()) else ax).set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    fig.suptitle(f"Training loss: {paths[0].name}" if len(paths) == 1 else f"Training loss: {len(paths)} runs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    per_run = set()  # steps per epoch of each run that finished an epoch: one epoch axis only if they agree
    for events in runs.values():
        epochs = [e for e in events if e["kind"] == "epoch" and e["epoch"] > 0 and e["step"] > 0]
        if epochs:
            per_run.add(epochs[-1]["step"] / epochs[-1]["epoch"])
    if len(per_run) == 1:
        per_epoch = per_run.pop()
        top = ax.secondary_xaxis("top", functions=(lambda s: s / per_epoch, lambda e: e * per_epoch))
        top.set_xlabel("epoch")
    fig.tight_layout()
    try:
        with atomic_file(output) as f:  # savefig writes in place: a Ctrl-C would leave half a picture
            fig.savefig(f, format=fmt)
    finally:
        plt.close(fig)
    return output
