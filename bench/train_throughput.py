"""Training throughput and MFU of the MiniMind-V training step (pretrain and SFT, demo data).

Times the trainer's own step, `trainer.step.train_step` (features from the cache or the CLIP tower,
MiniMindVLM forward with loss_only=True, backward, gradient clipping at 1.0, AdamW, zero_grad, the v1 lr
schedule), on batches built by the trainer's VLMDataset + collate from the demo data, in four settings per stage:
  online  : pixels decoded each step and encoded by the CLIP tower each step (the trainer without
            --feature_cache). Default tower: a 12-layer ViT-B/32-shaped *stand-in* (random weights, real
            shape, so real cost), built once into .cache/bench/clip_b32_12l.
  cached  : fp16 features read from the FeatureStore (the trainer with --feature_cache); same tower's
            fingerprint, encoded once before timing (not timed).
  longest : collate pads to the longest row of the batch (trainer default)
  max     : collate pads every row to max_seq_len (trainer --pad_to_max)
  grouped : batch-longest, with batches of similar length (trainer --group_by_length; setting cached_grouped)
Timed: `--steps` steps after `--warmup` untimed ones, from fetching the batch (data loading counts, with
`--num_workers` 0 by default: on a 2-core machine workers only steal cores from the step) to the end of
the optimizer step (device synchronised).

Useful FLOPs of a step: `LMConfig.train_flops`, the one FLOP model the trainer's log uses too (matmuls on real
tokens only: padding never counts; the output head at supervised positions; the projection's forward and weight
gradient; the frozen CLIP tower is not counted). MFU = useful FLOPs / step time / peak. The peak is this machine's
dense matmul peak in the same dtype, measured in this run (bench/common.py: best-of n x n matmuls) on CPU; on
CUDA the card's datasheet dense peak (model/metrics.py: H100/H200 989 TFLOPS bf16) and the measured one is
reported beside it.

The last printed line is JSON: samples_per_s_online, samples_per_s_cached, useful_tokens_per_s_cached,
mfu_cached (pretrain stage, batch-longest padding), matmul_peak_gflops, dtype, and every run under "runs".
"""
from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from bench.common import (CACHE_DIR, CLIP12_PATH, DTYPES, bench_parser, bench_title, command_line,  # noqa: E402
                          machine_info, matmul_peak_flops, peak_memory_mb, report, start, sync)
from data_pipeline.dataset import VLMDataset, collate  # noqa: E402
from data_pipeline.feature_store import FeatureStore  # noqa: E402
from data_pipeline.samplers import length_grouped_order  # noqa: E402
from model.config import LMConfig  # noqa: E402
from checkpoints.tokenizer import image_token_ids, load_tokenizer  # noqa: E402
from model.vision import load_vision_encoder  # noqa: E402
from model.vlm import MiniMindVLM  # noqa: E402
from trainer.config import model_size  # noqa: E402
from trainer.metrics import peak_flops  # noqa: E402
from trainer.compile_step import CompileCounts, compiler_problem  # noqa: E402
from trainer.step import StepContext, apply_freeze, autocast_for, lr_at, new_train_state, train_step  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser(__doc__)
    a = p.add_argument
    a("--batch_size", type=int, default=32)
    a("--steps", type=int, default=6, help="timed steps per setting")
    a("--warmup", type=int, default=2, help="untimed steps first (allocations, optimizer state)")
    a("--dtype", default="float32", choices=["float32", "bfloat16"],
      help="bfloat16: autocast (CPU: the trainer's --cpu_bf16; CUDA: its default)")
    a("--stages", default="pretrain,sft")
    a("--settings", default="online,cached,cached_max",
      help="comma list of online (batch-longest), cached (batch-longest), cached_max (pad to max_seq_len), "
           "online_max, cached_grouped (batch-longest, batches grouped by length as --group_by_length)")
    # data
    a("--pretrain_data", default="dataset/demo/pretrain.json")
    a("--sft_data", default="dataset/demo/sft.json")
    a("--images_path", default="dataset/demo/images/train")
    a("--clip_path", default=str(CLIP12_PATH), help="vision tower (default: 12-layer stand-in, built if missing)")
    a("--cache_dir", default=str(CACHE_DIR / "features"), help="feature store root")
    a("--num_workers", type=int, default=0)
    a("--pack_same_image", type=int, default=1,
      help="SFT rows as the trainer's --pack_same_image N packs them (the demo: 3, with --max_seq_len 160)")
    a("--preload", action="store_true", help="collate every batch before timing (model throughput only)")
    # machine
    a("--compile", action="store_true",
      help="time the trainer's --compile step against eager in this one run: after --warmup steps of each (the "
           "compiled ones compile, timed apart), the two take turns on the same batches")
    a("--fused_adamw", action="store_true",
      help="AdamW(fused=True) on CPU too (the trainer fuses on CUDA only): measures that suggested change")
    a("--find_max_batch", action="store_true",
      help="double the batch (cached pretrain) until out of memory, then time the largest that fits")
    a("--max_batch", type=int, default=8192, help="upper bound of --find_max_batch")
    a("--peak_n", type=int, default=None, help="matmul size for the measured peak (CPU 2048, CUDA 8192)")
    return p


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = DTYPES[args.dtype]
        clip_path = args.clip_path
        if not os.path.exists(os.path.join(clip_path, "config.json")):
            if os.path.abspath(clip_path) != os.path.abspath(str(CLIP12_PATH)):
                raise FileNotFoundError(f"no vision tower at {clip_path}")
            from scripts.build_stand_in_clip import build_stand_in_clip

            print(f"building the 12-layer stand-in CLIP tower at {clip_path} (random weights, real shape)")
            build_stand_in_clip(clip_path, layers=12)
        self.tokenizer = load_tokenizer(args.tokenizer_path)
        self.encoder = load_vision_encoder(clip_path, self.device)
        self.encoder_layers = self.encoder.clip.config.num_hidden_layers
        self.config = LMConfig(**model_size(args), image_ids=image_token_ids(self.tokenizer),
                               vision_dim=self.encoder.hidden_size)
        torch.manual_seed(args.seed)
        self.model = MiniMindVLM(self.config)
        apply_freeze(self.model, 0)
        self.model.to(self.device).train()
        if args.compile and self.device.type == "cpu" and compiler_problem():
            sys.exit(f"--compile: {compiler_problem()}")
        self.train_model = self.model
        self.compiled_model = torch.compile(self.model) if args.compile else None
        autocast, _ = autocast_for(self.device, args.dtype, cpu_bf16=self.dtype == torch.bfloat16)
        self.ctx = StepContext(self.encoder, self.device, autocast, accumulation_steps=1, grad_clip=1.0)
        self.datasets: dict[str, VLMDataset] = {}
        self.store = FeatureStore(args.cache_dir, self.encoder.fingerprint)

    def dataset(self, stage: str) -> VLMDataset:
        if stage not in self.datasets:
            path = self.args.pretrain_data if stage == "pretrain" else self.args.sft_data
            pack = self.args.pack_same_image if stage == "sft" else 1
            self.datasets[stage] = VLMDataset(path, self.args.images_path, self.tokenizer, self.args.max_seq_len,
                                              preprocess=self.encoder.preprocess, pack_same_image=pack)
        return self.datasets[stage]

    def loader(self, stage: str, batch: int, n_batches: int, cached: bool, pad_max: bool, grouped: bool = False):
        ds = self.dataset(stage)
        # as the trainer collates: with --compile, packed SFT gives every batch segment ids (one graph)
        segments = self.args.compile and stage == "sft" and self.args.pack_same_image > 1
        rng = np.random.default_rng(self.args.seed)
        need = batch * n_batches
        epochs = range(math.ceil(need / len(ds)))
        if grouped:  # the trainer's --group_by_length order (single process)
            lengths = [len(s.input_ids) for s in ds.samples]
            g = torch.Generator().manual_seed(self.args.seed)
            order = np.concatenate([length_grouped_order(lengths, batch, g) for _ in epochs])[:need]
        else:
            order = np.concatenate([rng.permutation(len(ds)) for _ in epochs])[:need]
        if cached:
            paths = sorted({ref for i in order for ref in ds.samples[i].images})
            t0 = time.perf_counter()
            n = self.store.ensure(paths, self.encoder, batch_size=64 if self.device.type == "cpu" else 512)
            if n:
                print(f"feature store: encoded {n} images in {time.perf_counter() - t0:.1f}s (not timed)")
            ds.feature_store = self.store
        else:
            ds.feature_store = None
        loader = DataLoader(ds, batch_size=batch, sampler=order.tolist(), num_workers=self.args.num_workers,
                            collate_fn=functools.partial(collate, pad_to=self.args.max_seq_len if pad_max else None,
                                                         segments=segments),
                            pin_memory=self.device.type == "cuda", drop_last=False)
        if self.args.preload:
            return list(loader)
        return loader

    def run(self, stage: str, setting: str, batch: int, steps: int, warmup: int) -> dict[str, Any]:
        cached, pad_max = setting.startswith("cached"), setting.endswith("_max")
        data = self.loader(stage, batch, steps + warmup, cached, pad_max, grouped=setting.endswith("_grouped"))
        dev = self.device
        state = new_train_state(self.model, dev, torch.float32, lr=4e-4, fused=self.args.fused_adamw)
        total = steps + warmup
        acc = dict(samples=0, tokens=0, padded=0, supervised=0, flops=0.0, wait=0.0)
        batches = iter(data)
        t0 = time.perf_counter()
        for i in range(total):
            if i == warmup:
                sync(dev)
                acc = {k: 0 * v for k, v in acc.items()}
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                t0 = time.perf_counter()
            tw = time.perf_counter()
            b = next(batches)
            acc["wait"] += time.perf_counter() - tw
            m = train_step(self.train_model, [b], state, lr_at(i, total, 4e-4, 0), self.ctx)
            if m.non_finite:
                raise FloatingPointError(f"non-finite loss {m.loss}")
            acc["samples"] += m.images
            acc["tokens"] += m.tokens
            acc["padded"] += b.input_ids.numel()
            acc["supervised"] += b.supervised
            acc["flops"] += m.flops
        sync(dev)
        elapsed = time.perf_counter() - t0
        del state, data, batches
        gc.collect()
        return {"stage": stage, "setting": setting, "batch_size": batch, "steps": steps,
                "step_ms": 1000 * elapsed / steps,
                "samples_per_s": acc["samples"] / elapsed, "images_per_s": acc["samples"] / elapsed,
                "useful_tokens_per_s": acc["tokens"] / elapsed, "padded_tokens_per_s": acc["padded"] / elapsed,
                "useful_tflops": acc["flops"] / elapsed / 1e12,
                "pad_fraction": 1 - acc["tokens"] / max(acc["padded"], 1),
                "mean_len": acc["tokens"] / max(acc["samples"], 1),
                "supervised_per_sample": acc["supervised"] / max(acc["samples"], 1),
                "data_wait_pct": 100 * acc["wait"] / elapsed, "loss": m.loss, "peak_mem_mb": peak_memory_mb(dev)}


    def run_turns(self, stage: str, setting: str, batch: int, steps: int, warmup: int) -> list[dict[str, Any]]:
        """Eager and compiled steps on the same preloaded batches, taking turns (who goes first alternates):
        --warmup steps of each first (the compiled ones compile: that time is reported apart), then `steps` each."""
        cached, pad_max = setting.startswith("cached"), setting.endswith("_max")
        data = list(self.loader(stage, batch, steps + 2 * warmup, cached, pad_max, setting.endswith("_grouped")))
        state = new_train_state(self.model, self.device, torch.float32, lr=4e-4, fused=self.args.fused_adamw)
        runs = {"eager": (self.model, self.ctx), "compiled": (self.compiled_model, replace(self.ctx, compiled=True))}
        took = {name: 0.0 for name in runs}
        start = CompileCounts.now()
        for name, (model, ctx) in runs.items():  # eager's warm-up on other batches: the same shapes' count
            for b in data[:warmup] if name == "eager" else data[warmup:2 * warmup]:
                t0 = time.perf_counter()
                train_step(model, [b], state, 4e-4, ctx)
                took[name] += time.perf_counter() - t0
        warm = CompileCounts.now().since(start)
        timed = {name: 0.0 for name in runs}
        for i, b in enumerate(data[2 * warmup:]):
            for name in (("eager", "compiled") if i % 2 == 0 else ("compiled", "eager")):
                model, ctx = runs[name]
                sync(self.device)
                t0 = time.perf_counter()
                m = train_step(model, [b], state, 4e-4, ctx)
                sync(self.device)
                timed[name] += time.perf_counter() - t0
                if m.non_finite:
                    raise FloatingPointError(f"non-finite loss {m.loss} ({name})")
        after = CompileCounts.now().since(start)
        tokens = sum(b.n_tokens for b in data[2 * warmup:])
        padded = sum(b.input_ids.numel() for b in data[2 * warmup:])
        return [{"stage": stage, "setting": setting, "mode": name, "batch_size": batch, "steps": len(data) - 2 * warmup,
                 "step_ms": 1000 * timed[name] / (len(data) - 2 * warmup),
                 "warmup_s": took[name], "compile_s": took[name] - warmup * timed[name] / (len(data) - 2 * warmup)
                 if name == "compiled" else 0.0, "graphs": warm.graphs, "graph_breaks": warm.graph_breaks,
                 "recompiles_while_timed": after.graphs - warm.graphs,
                 "useful_tokens_per_s": tokens / timed[name], "pad_fraction": 1 - tokens / max(padded, 1)}
                for name in runs]


def time_turns(bench: Bench, args: argparse.Namespace, batch: int) -> list[dict[str, Any]]:
    """--compile: eager against compiled per stage and setting, in turns; prints each pair and the speed-up."""
    runs = []
    for stage in [s for s in args.stages.split(",") if s]:
        for setting in [s for s in args.settings.split(",") if s]:
            torch._dynamo.reset()  # each stage compiles anew, as each training run does
            eager, compiled = bench.run_turns(stage, setting, batch, args.steps, args.warmup)
            compiled["speedup"] = eager["step_ms"] / compiled["step_ms"]
            runs += [eager, compiled]
            c = compiled
            print(f"{stage:8s} {setting:10s} batch {batch}: eager {eager['step_ms']:.1f} ms/step, compiled "
                  f"{c['step_ms']:.1f} ms/step ({c['speedup']:.2f}x) | compile {c['compile_s']:.1f} s | "
                  f"{c['graphs']} graph(s), {c['graph_breaks']} break(s), {c['recompiles_while_timed']} recompile(s) "
                  f"while timed | pad {100 * eager['pad_fraction']:.0f}%", flush=True)
    return runs


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory(bench: Bench) -> None:
    bench.model.zero_grad(set_to_none=True)
    gc.collect()
    if bench.device.type == "cuda":
        torch.cuda.empty_cache()


def largest_batch(bench: Bench, batch: int, limit: int) -> int:
    """Double the batch (cached pretrain) until out of memory; the largest that fits."""
    fits = None
    while batch <= limit:
        try:
            bench.run("pretrain", "cached", batch, 1, 1)
            fits = batch
            print(f"batch {batch}: fits", flush=True)
            batch *= 2
        except Exception as e:  # noqa: BLE001 - only OOM is expected; anything else is re-raised
            if not is_oom(e):
                raise
            print(f"batch {batch}: out of memory", flush=True)
            break
        finally:
            free_memory(bench)
    if fits is None:
        raise RuntimeError(f"batch {batch} does not fit")
    return fits


def time_settings(bench: Bench, args: argparse.Namespace, batch: int) -> tuple[list[dict[str, Any]], int]:
    """One timed run per stage and setting; after a batch search, an OOM halves the batch and retries."""
    runs = []
    for stage in [s for s in args.stages.split(",") if s]:
        for setting in [s for s in args.settings.split(",") if s]:
            while True:
                try:
                    r = bench.run(stage, setting, batch, args.steps, args.warmup)
                    break
                except Exception as e:  # noqa: BLE001 - a searched batch can fail later (fragmentation)
                    if not (args.find_max_batch and is_oom(e) and batch > 1):
                        raise
                    free_memory(bench)
                    batch //= 2
                    print(f"out of memory when timing: batch {batch} instead", flush=True)
            runs.append(r)
            print(f"{stage:8s} {setting:10s} batch {batch}: {r['samples_per_s']:8.1f} samples/s "
                  f"{r['useful_tokens_per_s']:10,.0f} useful tok/s {r['images_per_s']:8.1f} img/s "
                  f"{r['useful_tflops'] * 1e3:8.1f} useful GFLOP/s | step {r['step_ms']:.0f} ms | pad "
                  f"{100 * r['pad_fraction']:.0f}% | data-wait {r['data_wait_pct']:.1f}%", flush=True)
    return runs, batch


def summarize(args: argparse.Namespace, bench: Bench, runs: list[dict[str, Any]], batch: int,
              measured_peak: float, peak: float) -> dict[str, Any]:
    """The headline figures (pretrain stage unless only SFT ran) and every run."""
    for r in runs:
        r["mfu"] = r["useful_tflops"] * 1e12 / peak
        r["mfu_vs_measured_peak"] = r["useful_tflops"] * 1e12 / measured_peak
    main_stage = "pretrain" if any(r["stage"] == "pretrain" for r in runs) else (runs[0]["stage"] if runs else None)

    def pick(setting: str, key: str):
        return next((r[key] for r in runs if r["stage"] == main_stage and r["setting"] == setting), None)

    on, ca, cm = pick("online", "samples_per_s"), pick("cached", "samples_per_s"), pick("cached_max", "samples_per_s")
    return {"name": args.name or f"train {args.dim}/{args.n_layers} {args.dtype}",
            "samples_per_s_online": on, "samples_per_s_cached": ca,
            "useful_tokens_per_s_cached": pick("cached", "useful_tokens_per_s"),
            "images_per_s_cached": pick("cached", "images_per_s"), "mfu_cached": pick("cached", "mfu"),
            "matmul_peak_gflops": measured_peak / 1e9, "mfu_peak_gflops": peak / 1e9,
            "dtype": args.dtype, "batch_size": batch, "stage": main_stage, "fused_adamw": args.fused_adamw,
            "model": f"{args.dim}/{args.n_layers}", "clip_layers": bench.encoder_layers,
            "cached_over_online": ca / on if on and ca else None,
            "longest_over_max_padding": ca / cm if ca and cm else None}


def table(args: argparse.Namespace, bench: Bench, result: dict[str, Any]) -> tuple[list, list, str]:
    """Header, rows and notes of this run's RESULTS.md table."""
    header = ["stage", "features", "padding", "batch", "samples/s", "useful tok/s", "images/s", "useful GFLOP/s",
              "useful-token MFU", "step ms", "padding share"]
    rows = [[r["stage"], "online" if r["setting"].startswith("online") else "cached",
             {"_max": "max_seq_len", "_grouped": "batch-longest, grouped by length"}.get(
                 r["setting"][r["setting"].rfind("_"):], "batch-longest"), r["batch_size"],
             r["samples_per_s"], r["useful_tokens_per_s"], r["images_per_s"], r["useful_tflops"] * 1e3,
             f"{100 * r['mfu']:.1f}%", r["step_ms"], f"{100 * r['pad_fraction']:.0f}%"] for r in result["runs"]]
    summary = [f"{args.dtype} dense matmul peak measured in this run: {result['matmul_peak_gflops']:,.0f} GFLOP/s"
               + (f"; MFU against the datasheet {result['mfu_peak_gflops'] / 1e3:,.0f} TFLOPS"
                  if bench.device.type == "cuda" else "")]
    if result["cached_over_online"]:
        summary.append(f"cached / online: {result['cached_over_online']:.2f}x samples/s ({result['stage']})")
    if result["longest_over_max_padding"]:
        summary.append(f"batch-longest / max_seq_len padding: {result['longest_over_max_padding']:.2f}x")
    notes = (f"online = the {bench.encoder_layers}-layer CLIP tower encodes every batch; cached = fp16 "
             f"FeatureStore; max_seq_len = {args.max_seq_len}. " + "; ".join(summary) + ".")
    return header, rows, notes


def report_turns(args: argparse.Namespace, bench: Bench, info: dict[str, Any], runs: list[dict[str, Any]]) -> dict:
    """--compile's table: eager and compiled step times of one run, the compile time apart."""
    header = ["stage", "features", "batch", "eager ms/step", "compiled ms/step", "compiled / eager speed",
              "compile s", "graphs", "graph breaks", "recompiles while timed", "padding share"]
    pairs = list(zip(runs[::2], runs[1::2]))
    rows = [[e["stage"], "online" if e["setting"].startswith("online") else "cached", e["batch_size"], e["step_ms"],
             c["step_ms"], f"{c['speedup']:.2f}x", c["compile_s"], c["graphs"], c["graph_breaks"],
             c["recompiles_while_timed"], f"{100 * e['pad_fraction']:.0f}%"] for e, c in pairs]
    notes = (f"{args.dtype}, model {args.dim}/{args.n_layers}; eager and compiled took turns on the same batches "
             f"({args.steps} each, after {args.warmup} warm-up steps each; compile s = the compiled warm-up less "
             f"that many steady steps); batch-longest padding, sizes marked dynamic (no padding added).")
    result = {"name": args.name or f"train --compile {args.dim}/{args.n_layers} {args.dtype}",
              "speedups": {f"{e['stage']}/{e['setting']}": c["speedup"] for e, c in pairs}, "dtype": args.dtype,
              "model": f"{args.dim}/{args.n_layers}", **info, "command": command_line(), "runs": runs}
    return report(args.results, info, bench_title(bench.device), header, rows, notes, result)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = start(build_parser(), argv)
    bench = Bench(args)
    dev = bench.device
    info = machine_info(dev)
    measured_peak = matmul_peak_flops(dev, bench.dtype, args.peak_n)
    print(f"{info['machine']} | torch {info['torch']} | {info['threads']} threads | model {args.dim}/{args.n_layers} "
          f"| {args.dtype} | measured matmul peak {measured_peak / 1e9:,.0f} GFLOP/s | clip {args.clip_path} "
          f"({bench.encoder_layers} layers)", flush=True)
    batch = largest_batch(bench, args.batch_size, args.max_batch) if args.find_max_batch else args.batch_size
    if args.compile:
        return report_turns(args, bench, info, time_turns(bench, args, batch))
    runs, batch = time_settings(bench, args, batch)
    # the peak again at the end, best-of both: load from other processes only ever lowers it
    measured_peak = max(measured_peak, matmul_peak_flops(dev, bench.dtype, args.peak_n))
    peak = peak_flops(dev, bench.dtype) or measured_peak  # a known GPU's datasheet peak, else the measured one
    result = summarize(args, bench, runs, batch, measured_peak, peak)
    result.update(info, command=command_line(), runs=runs)
    return report(args.results, info, bench_title(dev), *table(args, bench, result), result)


if __name__ == "__main__":
    main()
