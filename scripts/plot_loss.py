"""Draw loss curves from the trainer's `*_log.jsonl` files into a PNG (with Pillow; no plotting library).

    python scripts/plot_loss.py out/128_vlm_pretrain_log.jsonl out/128_vlm_sft_log.jsonl --out images/demo_loss.png
"""
from __future__ import annotations

import argparse
import json
import math
import os

from PIL import Image, ImageDraw

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def read_curve(path: str) -> list[tuple[int, float]]:
    points = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if math.isfinite(row["loss"]):
                points.append((row["step"], row["loss"]))
    return points


def plot(curves: dict[str, list[tuple[int, float]]], out: str, title: str = "training loss",
         size: tuple[int, int] = (900, 420)) -> None:
    """Each curve on its own panel (the stages have different step counts), log-scaled loss."""
    width, height = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 6), title, fill="black")
    n = max(len(curves), 1)
    panel_w = (width - 20) // n
    for i, (name, points) in enumerate(curves.items()):
        x0, y0, x1, y1 = 10 + i * panel_w + 50, 40, 10 + (i + 1) * panel_w - 15, height - 40
        draw.rectangle((x0, y0, x1, y1), outline=(120, 120, 120))
        draw.text((x0, y1 + 8), f"{name} (step)", fill="black")
        if not points:
            continue
        steps = [p[0] for p in points]
        logs = [math.log10(max(p[1], 1e-6)) for p in points]
        lo, hi = min(logs), max(logs)
        hi = hi if hi > lo else lo + 1
        smin, smax = min(steps), max(steps)
        smax = smax if smax > smin else smin + 1
        for frac in (0.0, 0.5, 1.0):  # y-axis labels
            value = lo + frac * (hi - lo)
            y = y1 - frac * (y1 - y0)
            draw.line((x0 - 4, y, x0, y), fill="black")
            draw.text((x0 - 48, y - 6), f"{10 ** value:.3g}", fill="black")
        draw.text((x1 - 40, y1 + 8), str(smax), fill="black")
        xy = [(x0 + (s - smin) / (smax - smin) * (x1 - x0), y1 - (v - lo) / (hi - lo) * (y1 - y0))
              for s, v in zip(steps, logs)]
        draw.line(xy, fill=COLORS[i % len(COLORS)], width=2)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    img.save(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+")
    p.add_argument("--out", default="images/loss.png")
    p.add_argument("--title", default="training loss (log scale)")
    args = p.parse_args()
    curves = {os.path.basename(path).replace("_log.jsonl", ""): read_curve(path) for path in args.logs}
    plot(curves, args.out, args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
