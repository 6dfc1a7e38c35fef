"""Pictures and tables of AttentionMaps (inference/attention_map.py): 7x7 heat maps over the image, a per-layer
strip, the image-versus-text share per layer. Shared by scripts/inspect_attention.py and the web demo."""
from __future__ import annotations

import io
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

from .attention_map import AttentionMaps  # noqa: E402

# CJK answers (the v1 models answer in Chinese) draw with WenQuanYi where it is installed; DejaVu otherwise.
FONTS = ["DejaVu Sans", "WenQuanYi Micro Hei"]
HEAT_CMAP = "inferno"
MAX_ASPECT = 4.0  # height / width of a heat map figure, and its inverse, at most
# Per-token heat maps drawn in one figure at most: each adds a 1.9-inch column (400 drew an 84,018-pixel PNG).
MAX_TOKENS_DRAWN = 16


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token decoded on its own, whitespace made visible (a token that is part of a multi-byte character
    shows as the replacement character)."""
    return [tokenizer.decode([int(i)]).replace("\n", "\\n") or "∅" for i in ids]


def quoted(token: str) -> str:
    return f"'{token}'"


def overlay(ax, image: Image.Image, grid, title: str, vmax: Optional[float] = None) -> None:
    """The image with the patch grid (7x7 v1, 8x8 3v) drawn over it: the image was resized to the tower's square
    without cropping, so the grid covers the whole image."""
    w, h = image.size
    ax.imshow(image)
    ax.imshow(grid.float().numpy(), cmap=HEAT_CMAP, alpha=0.6, extent=(0, w, h, 0), interpolation="nearest",
              vmin=0.0, vmax=vmax if vmax is not None else float(grid.max()))
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def layer_rows(maps: AttentionMaps) -> list[dict[str, float]]:
    """Per layer, then all layers averaged: the shares of attention on CLS, the patches, all image positions
    and text (averaged over heads and answer tokens)."""
    rows = []
    for layer in [*range(maps.n_layers), None]:
        grid, cls = maps.patch_grid(layer), maps.cls_weight(layer)
        patches = float(grid.sum())
        top = int(grid.flatten().argmax())
        rows.append({"layer": "all" if layer is None else str(layer), "image": cls + patches, "cls": cls,
                     "patches": patches, "text": 1.0 - cls - patches,
                     "top_patch": f"({top // maps.grid_side},{top % maps.grid_side})"})
    return rows


def token_rows(maps: AttentionMaps, tokens: Sequence[str]) -> list[dict[str, float]]:
    """Per answer token (all layers averaged): its image share and the patch it looks at most."""
    rows = []
    for q, token in enumerate(tokens):
        grid, cls = maps.patch_grid(query=q), maps.cls_weight(query=q)
        top = int(grid.flatten().argmax())
        rows.append({"token": token, "image": cls + float(grid.sum()), "cls": cls, "patches": float(grid.sum()),
                     "top_patch": f"({top // maps.grid_side},{top % maps.grid_side})"})
    return rows


def attention_table(maps: AttentionMaps, tokens: Sequence[str]) -> str:
    """The numbers the figure shows, as plain text (percent of attention, averaged over heads)."""
    lines = ["layer  image%   CLS%  patches%  text%  top patch (row,col)"]
    for r in layer_rows(maps):
        lines.append(f"{r['layer']:>5}  {100 * r['image']:6.1f} {100 * r['cls']:6.1f}  {100 * r['patches']:8.1f}"
                     f" {100 * r['text']:6.1f}  {r['top_patch']}")
    lines += ["", "answer token (all layers)  image%  patches%  top patch"]
    for r in token_rows(maps, tokens):
        lines.append(f"{quoted(r['token']):>26}  {100 * r['image']:6.1f}  {100 * r['patches']:8.1f}  "
                     f"{r['top_patch']}")
    return "\n".join(lines)


def attention_figure(image: Image.Image, maps: AttentionMaps, tokens: Sequence[str], question: str,
                     max_tokens: int = 8) -> Figure:
    """Row 1: the image, the whole answer's heat map, one per answer token (the first max_tokens).
    Row 2: one heat map per layer (whole answer). Row 3: image versus text share of attention per layer.
    At most MAX_TOKENS_DRAWN token maps are drawn, whatever max_tokens asks."""
    plt.rcParams["font.family"] = FONTS
    shown = list(tokens[:max(0, min(max_tokens, MAX_TOKENS_DRAWN))])
    top_cols = 2 + len(shown)
    fig = plt.figure(figsize=(max(top_cols, maps.n_layers, 4) * 1.9, 7.2), layout="constrained")
    answer = "".join(tokens)
    side = maps.grid_side
    fig.suptitle(f"Q: {question}   A: {answer}\n{side}x{side} heat map = attention from the answer to the image patches "
                 f"(mean over heads; colour scaled per panel)", fontsize=9)
    top, middle, bottom = fig.subfigures(3, 1, height_ratios=[1.1, 1.0, 0.9])

    axes = top.subplots(1, top_cols, squeeze=False)[0]
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=8)
    axes[0].set_axis_off()
    whole = maps.patch_grid()
    overlay(axes[1], image, whole, f"whole answer\npatches {100 * float(whole.sum()):.1f}%")
    for q, token in enumerate(shown):
        grid = maps.patch_grid(query=q)
        overlay(axes[2 + q], image, grid, f"{quoted(token)}\npatches {100 * float(grid.sum()):.1f}%")
    if len(tokens) > len(shown):
        top.text(0.99, 0.01, f"(+{len(tokens) - len(shown)} more tokens in the table)", ha="right", fontsize=7)

    layer_axes = middle.subplots(1, maps.n_layers, squeeze=False)[0]
    for layer, ax in enumerate(layer_axes):
        grid = maps.patch_grid(layer=layer)
        overlay(ax, image, grid, f"layer {layer}\npatches {100 * float(grid.sum()):.1f}%")

    ax = bottom.subplots()
    rows = layer_rows(maps)[:-1]
    layers = [r["layer"] for r in rows]
    ax.bar(layers, [100 * r["cls"] for r in rows], label="image: CLS", color="#8c564b")
    ax.bar(layers, [100 * r["patches"] for r in rows], bottom=[100 * r["cls"] for r in rows],
           label=f"image: {side * side} patches", color="#ff7f0e")
    ax.bar(layers, [100 * r["text"] for r in rows], bottom=[100 * r["image"] for r in rows], label="text tokens",
           color="#1f77b4")
    ax.set_xlabel("layer")
    ax.set_ylabel("% of attention")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def heatmap_png(image: Image.Image, grid, title: str) -> bytes:
    """One heat map over the image as PNG bytes (the web demo's panel). The figure follows the image's aspect
    ratio within MAX_ASPECT either way: a 1x700 image would otherwise ask for a figure 2240 inches tall."""
    plt.rcParams["font.family"] = FONTS
    aspect = min(max(image.size[1] / image.size[0], 1 / MAX_ASPECT), MAX_ASPECT)
    fig, ax = plt.subplots(figsize=(3.2, 3.2 * aspect + 0.3), layout="constrained")
    overlay(ax, image, grid, title)
    return figure_png(fig)


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()
