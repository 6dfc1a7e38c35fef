"""Shared helpers for the benchmarks: machine facts, measured peaks, the RESULTS.md writer.

Peaks are measured in the same process as the benchmark they normalise, so a loaded or throttled
machine lowers both the figure and its reference together:
  matmul_peak_flops: best-of timing of an n x n @ n x n matmul (2 n^3 FLOPs) in the given dtype.
  read_bandwidth:    best-of timing of summing a large tensor (bytes read / seconds).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainer.metrics import peak_memory_mb  # noqa: E402,F401  (the trainer's log and the benches report the same)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CACHE_DIR = ROOT / ".cache" / "bench"  # git-ignored: the 12-layer stand-in CLIP and the feature store
CLIP12_PATH = CACHE_DIR / "clip_b32_12l"


# ------------------------------------------------------------------------------------------ machine facts
def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        if m:
            return m.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """The short HEAD commit, read from .git without running git (BENCH_COMMIT overrides; 'unknown' if absent)."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    git = ROOT / ".git"
    try:
        if git.is_file():  # worktree: "gitdir: PATH"
            git = (ROOT / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head[:7]
        ref = head.split(":", 1)[1].strip()
        common = git
        if (git / "commondir").exists():
            common = (git / (git / "commondir").read_text().strip()).resolve()
        for base in (git, common):
            if (base / ref).exists():
                return (base / ref).read_text().strip()[:7]
        packed = common / "packed-refs"
        if packed.exists():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0][:7]
    except OSError:
        pass
    return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {"machine": device_name(device), "device": str(device), "torch": torch.__version__,
            "commit": git_commit(), "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "threads": torch.get_num_threads()}
    if device.type == "cpu":
        info["cpus"] = os.cpu_count()
        try:
            info["load_avg_1m"] = round(os.getloadavg()[0], 2)
        except OSError:
            pass
    return info


def setup_threads(threads: Optional[int]) -> None:
    """Use every core by default (torch's default already does on most machines; be explicit)."""
    torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                         else (os.cpu_count() or 1)))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ measured peaks
def best_time(fn: Callable[[], Any], device: torch.device, reps: int = 1, rounds: int = 3) -> float:
    """Seconds per call of fn: best of `rounds` timings of `reps` calls, after one warm-up call (device synced)."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: Optional[int] = None,
                      reps: int = 5, rounds: int = 3) -> float:
    """Dense matmul peak in FLOP/s: best-of `rounds` timings of `reps` n x n matmuls (2 n^3 FLOPs each)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / best_time(lambda: torch.matmul(a, b, out=out), device, reps, rounds)


def read_bandwidth(device: torch.device, nbytes: int = 1 << 30, rounds: int = 5) -> float:
    """Read bandwidth in bytes/s: best-of `rounds` timings of summing an fp32 tensor of `nbytes`."""
    x = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    return nbytes / best_time(x.sum, device, rounds=rounds)


# ------------------------------------------------------------------------------------------ output
def bench_parser(doc: str):
    """The flags every bench shares: device, model size (the trainer's --preset/--dim/...), tokenizer, threads,
    seed, the results file and a label."""
    import argparse

    from checkpoints.tokenizer import DEFAULT_TOKENIZER_PATH
    from trainer.config import add_model_size_args

    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    a = p.add_argument
    a("--device", default="cpu")
    add_model_size_args(p)  # --preset (default minimind-v-small), --dim, --n_layers, ...
    a("--tokenizer_path", default=DEFAULT_TOKENIZER_PATH)
    a("--threads", type=int, default=None)
    a("--seed", type=int, default=0)
    a("--results", default="", help="write this run's table into this markdown file (e.g. bench/RESULTS.md)")
    a("--name", default="", help="label of this measurement in the JSON line (gpu.sh)")
    return p


def start(parser, argv: Optional[list[str]]):
    """Parse a bench's arguments, run from the repository root, and set the thread count (--threads)."""
    args = resolve_size(parser.parse_args(argv))
    os.chdir(ROOT)
    setup_threads(args.threads)
    return args


def resolve_size(args: argparse.Namespace) -> argparse.Namespace:
    """Fill --dim and --n_layers with the sizes --preset and the overrides give (trainer.config.model_size), so the
    bench's labels name the model it ran."""
    from trainer.config import model_size

    size = model_size(args)
    args.dim, args.n_layers = size["dim"], size["n_layers"]
    return args


def report(results_path: str, info: dict[str, Any], title: str, header: list[str], rows: list[list[Any]],
           notes: str, result: dict[str, Any]) -> dict[str, Any]:
    """Write the table into `results_path` (when given), print the JSON line, and return the result."""
    if results_path:
        write_results(results_path, info, title, header, rows, result["command"], notes=notes)
    emit(result)
    return result


def command_line() -> str:
    """The command that produced a figure, as typed from the repository root."""
    script = os.path.relpath(sys.argv[0], ROOT) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    return " ".join(["python", script] + [a if re.fullmatch(r"[\w./,:=+-]+", a) else repr(a)
                                          for a in sys.argv[1:]])


def bench_title(device: torch.device) -> str:
    """A table's title: the script and its arguments (less --results), so each distinct command keeps its table."""
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--results":
            skip = True
            continue
        if a.startswith("--results="):
            continue
        args.append(a)
    return f"{os.path.basename(sys.argv[0])} {' '.join(args) or '(defaults)'} [{device.type}]"


def emit(result: dict[str, Any]) -> None:
    """The last line of every benchmark: one JSON object."""
    print(json.dumps(result, sort_keys=False), flush=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"
    return str(v)


def write_results(path: str, info: dict[str, Any], title: str, header: list[str], rows: list[list[Any]],
                  command: str, notes: str = "") -> None:
    """Rewrite (or append) this machine's table for `title` in the markdown file at `path`.

    Every row gets the exact command as its last column. A table is keyed by machine + title (the script
    and its arguments), so rerunning the same command on the same machine replaces its figures and other
    machines' tables stay.
    """
    key = re.sub(r"[^\w.-]+", "_", f"{info['machine']}|{title}")
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    lines = [start, f"### {title}", "",
             f"Machine: **{info['machine']}** ({info['device']}, {info.get('threads')} threads) | torch "
             f"{info['torch']} | commit `{info['commit']}` | {info['date']}"
             + (f" | 1-min load average at start {info['load_avg_1m']}" if "load_avg_1m" in info else ""), ""]
    if notes:
        lines += [notes, ""]
    lines += ["| " + " | ".join(header + ["command"]) + " |", "|" + "---|" * (len(header) + 1)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + f" | `{command}` |" for row in rows]
    lines += [end]
    block = "\n".join(lines)
    p = Path(path)
    text = p.read_text() if p.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    p.write_text(text if text.endswith("\n") else text + "\n")


def gpu_table(jsonl: str, out: str) -> None:
    """Append a markdown table of the JSON lines gpu.sh collected (one per measurement) to `out`."""
    records = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip().startswith("{")]
    if not records:
        print(f"{jsonl}: no measurements", file=sys.stderr)
        return
    first = records[0]
    lines = ["", f"### GPU run: {first.get('machine', '?')} | torch {first.get('torch', '?')} | commit "
                 f"`{first.get('commit', '?')}` | {first.get('date', '?')}", "",
             "| measurement | samples/s | useful tok/s | MFU (bf16 peak) | batch | decode tok/s (cache / no cache) "
             "| prefill ms | command |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append("| {} | {} | {} | {} | {} | {} | {} | `{}` |".format(
            r.get("name", "?"), _fmt(r["samples_per_s_cached"]) if "samples_per_s_cached" in r else "",
            _fmt(r["useful_tokens_per_s_cached"]) if "useful_tokens_per_s_cached" in r else "",
            f"{100 * r['mfu_cached']:.1f}%" if "mfu_cached" in r else "",
            r.get("batch_size", ""),
            f"{_fmt(r['decode_tok_s_cache'])} / {_fmt(r['decode_tok_s_nocache'])}" if "decode_tok_s_cache" in r else "",
            _fmt(r["prefill_ms"]) if "prefill_ms" in r else "", r.get("command", "")))
    with open(out, "a") as f:
        f.write("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------ data
def synthetic_data(root: str, n_images: int = 256, questions_per_image: int = 4) -> dict[str, str]:
    """Demo-like data where dataset/demo is absent (it is git-ignored): coloured shapes on 64x64 images, one
    caption record per image (pretrain.json) and short Q/A records (sft.json), in the v1 JSON layout.
    Returns the paths to pass as --pretrain_data, --sft_data and --images_path."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(0)
    colors = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20),
              "brown": (140, 80, 30), "gray": (128, 128, 128), "black": (10, 10, 10), "teal": (0, 128, 128)}
    shapes = ["circle", "rectangle", "triangle"]
    images = Path(root) / "images"
    images.mkdir(parents=True, exist_ok=True)
    pretrain, sft = [], []
    for i in range(n_images):
        color, shape = rng.choice(list(colors)), rng.choice(shapes)
        name = f"img_{i:05d}.png"
        if not (images / name).exists():
            img = Image.new("RGB", (64, 64), (245, 245, 240))
            draw = ImageDraw.Draw(img)
            box = [rng.randint(4, 20), rng.randint(4, 20), rng.randint(40, 60), rng.randint(40, 60)]
            if shape == "circle":
                draw.ellipse(box, fill=colors[color])
            elif shape == "rectangle":
                draw.rectangle(box, fill=colors[color])
            else:
                draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=colors[color])
            img.save(images / name)
        pretrain.append({"id": f"cap{i}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": f"a {color} {shape} on a light background."}]})
        qa = [("what color is the shape?", color), ("what is the shape?", shape),
              (f"is there a {rng.choice(shapes)} in the image?", rng.choice(["yes", "no"])),
              (f"does the image contain a {rng.choice(list(colors))} shape?", rng.choice(["yes", "no"]))]
        for j, (q, a) in enumerate(qa[:questions_per_image]):
            sft.append({"id": f"q{i}_{j}", "image": name, "conversations": [
                {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]})
    paths = {"pretrain_data": str(Path(root) / "pretrain.json"), "sft_data": str(Path(root) / "sft.json"),
             "images_path": str(images)}
    Path(paths["pretrain_data"]).write_text(json.dumps(pretrain))
    Path(paths["sft_data"]).write_text(json.dumps(sft))
    return paths


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "gpu_table":
        gpu_table(sys.argv[2], sys.argv[3])
    elif len(sys.argv) in (3, 4) and sys.argv[1] == "synthetic_data":
        print(json.dumps(synthetic_data(sys.argv[2], *(int(a) for a in sys.argv[3:]))))
    else:
        print("usage: python bench/common.py gpu_table MEASUREMENTS.jsonl bench/RESULTS.md\n"
              "       python bench/common.py synthetic_data DIR [N_IMAGES]", file=sys.stderr)
        sys.exit(2)
