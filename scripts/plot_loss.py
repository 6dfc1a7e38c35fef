"""Draw loss curves from the trainer's `*_log.jsonl` files into a PNG with matplotlib (headless Agg backend):
one panel per stage (their step counts differ), optimizer steps on x, the loss on a log-scaled y axis, and the
validation accuracy (when the run validated with --val_data) on a second axis of the same panel.

    python scripts/plot_loss.py out/128_vlm_pretrain_log.jsonl out/128_vlm_sft_log.jsonl --out images/demo_loss.png
"""
from __future__ import annotations

import argparse
import json
import math
import os

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def read_curve(path: str, key: str = "loss") -> list[tuple[int, float]]:
    """(step, value) of every log line that holds `key` ("loss", or "val_accuracy" for validation lines)."""
    points = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if row.get(key) is not None and math.isfinite(row[key]):
                points.append((row["step"], row[key]))
    return points


def plot(curves: dict[str, list[tuple[int, float]]], out: str, title: str = "training loss",
         accuracy: dict[str, list[tuple[int, float]]] | None = None) -> None:
    """Each curve on its own panel, with axis labels, ticks, a grid and a log-scaled loss axis; a stage's
    validation accuracy, when given, on a second (right) axis of its panel."""
    fig, axes = plt.subplots(1, max(len(curves), 1), figsize=(4.5 * max(len(curves), 1), 3.6), squeeze=False)
    for ax, (name, points) in zip(axes[0], curves.items()):
        if points:
            steps, losses = zip(*points)
            ax.plot(steps, losses, linewidth=1.5, label="training loss")
        acc = (accuracy or {}).get(name)
        if acc:
            right = ax.twinx()
            steps, values = zip(*acc)
            right.plot(steps, values, color="tab:orange", marker="o", markersize=3, linewidth=1.2,
                       label="validation accuracy")
            right.set_ylim(0, 1)
            right.set_ylabel("validation accuracy", color="tab:orange")
        ax.set_yscale("log")
        ax.set_title(name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (log scale)")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+")
    p.add_argument("--out", default="images/loss.png")
    p.add_argument("--title", default="training loss (log scale)")
    args = p.parse_args()
    names = {path: os.path.basename(path).replace("_log.jsonl", "") for path in args.logs}
    curves = {names[path]: read_curve(path) for path in args.logs}
    accuracy = {names[path]: read_curve(path, "val_accuracy") for path in args.logs}
    plot(curves, args.out, args.title, accuracy)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
