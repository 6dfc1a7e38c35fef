"""The one training loop shared by 1-pretrain_vlm.py and 2-sft_vlm.py.

Single process or DDP (torchrun; NCCL on GPU, gloo on CPU). AdamW, v1 cosine schedule to lr/10 with
warmup, bf16/fp16 autocast on CUDA (GradScaler for fp16 only), gradient accumulation with no_sync,
clipping, freezing policies, a frozen-CLIP feature cache, atomic checkpoints, exact resume, and
SIGINT/SIGTERM that save before exiting.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from .checkpoint import (CheckpointError, config_path_for, load_object, load_weights, read_state_dict,
                         remove_stale_temp_files, save_checkpoint, save_object, unwrap, has_projection_bias)
from .dataset import DataError, VLMDataset, collate
from .feature_cache import FeatureStore
from .LMConfig import LMConfig
from .model import MiniMindVLM, count_parameters
from .tokenizer_utils import DEFAULT_TOKENIZER_PATH, image_token_ids, load_tokenizer
from .vision_utils import DEFAULT_CLIP_PATH, load_vision_encoder, stand_in_warning

log = logging.getLogger("minimind")


@dataclass(frozen=True)
class Stage:
    name: str  # "pretrain" or "sft": names the output file
    data_path: str
    images_path: str
    image_prefix: str
    learning_rate: float
    log_interval: int
    init_suffix: str  # the checkpoint this stage starts from: out/{dim}{_moe}{init_suffix}.pth
    allow_new_projection: bool  # the LLM-only checkpoint has no projection yet


PRETRAIN = Stage("pretrain", "./dataset/LLaVA-Pretrain/chat-translated.json", "./dataset/pretrain_images", "",
                 4e-4, 10, "_llm", True)
SFT = Stage("sft", "./dataset/LLaVA-Instruct/llava_instruct_230k.json", "./dataset/sft_images",
            "COCO_train2014_", 1e-6, 100, "_vlm_pretrain", False)


def build_parser(stage: Stage) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=f"MiniMind-V {stage.name} (run with torchrun for several GPUs)")
    a = p.add_argument
    # v1 arguments
    a("--out_dir", default="out")
    a("--epochs", type=int, default=19)
    a("--batch_size", type=int, default=32)
    a("--learning_rate", type=float, default=stage.learning_rate)
    a("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    a("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
      help="autocast dtype on CUDA (CPU trains in float32 unless --cpu_bf16)")
    a("--use_wandb", action="store_true")
    a("--wandb_project", default="MiniMind-V")
    a("--num_workers", type=int, default=8)
    a("--data_path", default=stage.data_path)
    a("--ddp", action="store_true", help="accepted for v1 compatibility; DDP is detected from torchrun's env")
    a("--accumulation_steps", type=int, default=1)
    a("--grad_clip", type=float, default=1.0)
    a("--warmup_iters", type=int, default=0)
    a("--log_interval", type=int, default=stage.log_interval)
    a("--save_interval", type=int, default=100)
    a("--local_rank", type=int, default=-1, help="accepted for v1 compatibility")
    # model
    a("--dim", type=int, default=512)
    a("--n_layers", type=int, default=8)
    a("--n_heads", type=int, default=16)
    a("--n_kv_heads", type=int, default=8)
    a("--use_moe", action="store_true")
    a("--max_seq_len", type=int, default=200)
    # paths
    a("--clip_path", default=DEFAULT_CLIP_PATH)
    a("--tokenizer_path", default=DEFAULT_TOKENIZER_PATH)
    a("--images_path", default=stage.images_path)
    a("--image_prefix", default=stage.image_prefix, help="prepended to each record's image file name")
    a("--init", default=None, help=f"start from this checkpoint (default out/{{dim}}{{_moe}}{stage.init_suffix}.pth)")
    a("--from_scratch", action="store_true", help="start from random weights (no init checkpoint)")
    a("--resume", action="store_true", help="continue exactly from this stage's resume checkpoint")
    # data
    a("--multi_turn", action="store_true", help="keep every turn (v1 SFT keeps the first only)")
    a("--strict_data", action="store_true", help="a bad record is an error instead of a counted skip")
    a("--feature_cache", default=None, metavar="DIR", help="encode each image once into a fp16 store here")
    a("--pad_to_max", action="store_true", help="pad every batch to max_seq_len (v1 behaviour; slower)")
    # training
    a("--optimizer", default="adamw", choices=["adamw", "adam"])
    a("--weight_decay", type=float, default=0.0)
    a("--freeze_llm", type=int, default=0, choices=[0, 1, 2],
      help="0: train projection + LLM (v1); 1: projection only; 2: projection + last LLM block")
    a("--max_steps", type=int, default=None, help="stop after this many steps in total")
    a("--seed", type=int, default=1337)
    a("--nan_policy", default="stop", choices=["stop", "skip"],
      help="a non-finite loss stops the run after saving (stop) or skips that step (skip)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--cpu_bf16", action="store_true", help="bf16 autocast on CPU")
    return p


def checkpoint_stem(args) -> str:
    return f"{args.dim}{'_moe' if args.use_moe else ''}"


# ------------------------------------------------------------------------------------------ helpers
def lr_at(it: int, total: int, lr: float, warmup: int) -> float:
    """v1 schedule: linear warmup, then cosine from lr to lr/10 over the remaining iterations."""
    min_lr = lr / 10
    if it < warmup:
        return lr * it / warmup
    if it > total:
        return min_lr
    progress = (it - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def apply_freeze(model: MiniMindVLM, policy: int) -> None:
    for p in model.parameters():
        p.requires_grad_(policy == 0)
    model.vision_proj.requires_grad_(True)
    if policy == 2:
        model.layers[-1].requires_grad_(True)


def matmul_flops_per_token(config: LMConfig, seq_len: float, head_fraction: float = 1.0) -> float:
    """Training FLOPs per token: 6 x matmul parameters + attention scores. The output head counts only for the
    `head_fraction` of tokens where it runs (training computes logits at supervised positions only)."""
    d, L = config.dim, config.n_layers
    kv = config.n_kv_heads * config.head_dim
    ffn = 3 * d * config.ffn_hidden_dim * (config.num_experts_per_tok + (config.n_shared_experts is not None)
                                           if config.use_moe else 1)
    per_layer = d * d * 2 + 2 * d * kv + ffn
    params = L * per_layer + d * config.vocab_size * head_fraction + config.vision_dim * d / seq_len * 50
    return 6 * params + 6 * L * d * seq_len  # causal attention: QK^T and AV, forward + backward, half masked


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: Optional[int] = None,
                      reps: int = 5, rounds: int = 3) -> float:
    """Dense matmul peak in FLOP/s: best-of `rounds` timings of `reps` n x n matmuls (2 n^3 FLOPs each)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm up (and pick the kernel)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return 2 * n ** 3 / best


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The device's dense matmul peak: a table for known GPUs, a quick measurement on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "4090": 165e12, "3090": 71e12, "L4": 121e12}
        for key, value in table.items():
            if key in name:
                return value if dtype != torch.float32 else value / 2
        return 100e12
    return matmul_peak_flops(device, dtype, n=1024, reps=3, rounds=5)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2], "numpy": np.random.get_state()[1].tolist(),
             "numpy_pos": int(np.random.get_state()[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch; set_epoch each epoch) that can start `skip` samples in."""

    skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves at the next step boundary and exits cleanly."""

    def __init__(self):
        self.signal: Optional[int] = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.signal is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("received signal %d: saving at the end of this step, then exiting", signum)


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)


# ------------------------------------------------------------------------------------------ the run
def train(args: argparse.Namespace, stage: Stage) -> dict[str, Any]:
    """Run one training stage; returns a summary (final loss, steps, skipped records, paths)."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    setup_logging(rank)
    if distributed:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available() and str(args.device).startswith("cuda"):
            device = torch.device(f"cuda:{local_rank}")
            torch.cuda.set_device(device)
            dist.init_process_group("nccl")
        else:
            device = torch.device("cpu")
            dist.init_process_group("gloo")
    else:
        device = torch.device(args.device)
    is_main = rank == 0
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)

    try:
        return _train(args, stage, device, rank, world, distributed, is_main)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(args, stage: Stage, device, rank: int, world: int, distributed: bool, is_main: bool) -> dict:
    os.makedirs(args.out_dir, exist_ok=True)
    stem = checkpoint_stem(args)
    out_path = os.path.join(args.out_dir, f"{stem}_vlm_{stage.name}.pth")
    resume_path = os.path.join(args.out_dir, f"{stem}_vlm_{stage.name}_resume.pth")
    metrics_path = os.path.join(args.out_dir, f"{stem}_vlm_{stage.name}_log.jsonl")
    if is_main and not args.resume and os.path.exists(metrics_path):
        os.remove(metrics_path)
    if is_main:  # temp files of saves that a kill interrupted: never resumed from, only taking space
        for tmp in remove_stale_temp_files([out_path, config_path_for(out_path), resume_path]):
            log.info("removed %s, left by an interrupted save", tmp)

    tokenizer = load_tokenizer(args.tokenizer_path)
    # ----- model and its starting weights
    init_sd = None
    if not args.from_scratch:
        init_path = args.init or os.path.join(args.out_dir, f"{stem}{stage.init_suffix}.pth")
        if not os.path.exists(init_path):
            hint = ("download the MiniMind LLM weights with `python scripts/download.py --what llm`"
                    if stage is PRETRAIN else "run 1-pretrain_vlm.py first")
            raise FileNotFoundError(f"start checkpoint not found: {init_path}. {hint}, pass --init PATH, "
                                    f"or --from_scratch to start from random weights")
        init_sd = read_state_dict(init_path)
    encoder = load_vision_encoder(args.clip_path, device)
    if stand_in_warning(args.clip_path):
        log.warning(stand_in_warning(args.clip_path))
    config = LMConfig(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                      use_moe=args.use_moe, max_seq_len=args.max_seq_len, image_ids=image_token_ids(tokenizer),
                      vision_dim=encoder.hidden_size,
                      vision_proj_bias=bool(init_sd is not None and has_projection_bias(init_sd)))
    model = MiniMindVLM(config)
    if init_sd is not None:
        report = load_weights(model, init_sd, source=init_path, allow_new_projection=stage.allow_new_projection)
        log.info("loaded %s%s", init_path, f" (new: {', '.join(report.new_keys)})" if report.new_keys else "")
    apply_freeze(model, args.freeze_llm)
    model.to(device)

    # ----- data
    store = FeatureStore(args.feature_cache, encoder.fingerprint) if args.feature_cache else None
    dataset = VLMDataset(args.data_path, args.images_path, tokenizer, args.max_seq_len, args.image_prefix,
                         args.multi_turn, args.strict_data, encoder.preprocess, store)
    log.info("%s: %d samples; %s", args.data_path, len(dataset), dataset.skips.summary())
    if len(dataset) == 0:
        raise DataError(f"{args.data_path}: no usable records ({dataset.skips.summary()})")
    if store is not None:
        if is_main:
            n = store.ensure(dataset.image_paths(), encoder, num_workers=min(args.num_workers, 4))
            log.info("feature cache %s: %d images encoded now, %d cached", store.dir, n, len(store.entries))
        if distributed:
            dist.barrier()
        store._load_index()
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    pad_to = args.max_seq_len if args.pad_to_max else None
    loader_kwargs = dict(batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                         collate_fn=lambda items: collate(items, pad_to), pin_memory=device.type == "cuda",
                         drop_last=False, persistent_workers=False)
    iters_per_epoch = math.ceil(len(sampler) / args.batch_size)
    total_iters = args.epochs * iters_per_epoch

    # ----- optimisation
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = opt_cls(trainable, lr=args.learning_rate, weight_decay=args.weight_decay, **fused)
    amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    if device.type == "cuda" and amp_dtype != torch.float32:
        autocast = lambda: torch.autocast("cuda", dtype=amp_dtype)  # noqa: E731
    elif device.type == "cpu" and args.cpu_bf16:
        amp_dtype = torch.bfloat16
        autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    else:
        amp_dtype = torch.float32
        autocast = contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and amp_dtype == torch.float16)

    n_trainable = sum(p.numel() for p in trainable)
    log.info("model: %.3fM parameters (%.3fM trainable, freeze_llm=%d), %s, dtype %s, world %d",
             count_parameters(model) / 1e6, n_trainable / 1e6, args.freeze_llm, device,
             str(amp_dtype).replace("torch.", ""), world)

    # ----- resume
    epoch, step_in_epoch, global_step, nan_skips = 0, 0, 0, 0
    if args.resume:
        if not os.path.exists(resume_path):
            raise FileNotFoundError(f"--resume: no resume checkpoint at {resume_path}")
        state = load_object(resume_path)
        load_weights(model, state["model"], source=resume_path)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        epoch, step_in_epoch, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        nan_skips = state.get("nan_skips", 0)
        set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
        log.info("resumed from %s at epoch %d step %d (global %d)", resume_path, epoch, step_in_epoch, global_step)

    train_model = model
    if args.compile:
        train_model = torch.compile(model)
    if distributed:
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda"
                                              else None, find_unused_parameters=args.use_moe)

    def save(final: bool = False) -> None:
        rngs = [None] * world
        if distributed:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if is_main:
            save_checkpoint(model, out_path)
            save_object({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
                         "global_step": global_step, "nan_skips": nan_skips, "rng": rngs}, resume_path)
            log.info("saved %s%s", out_path, " (final)" if final else "")
        if distributed:
            dist.barrier()

    wandb_run = None
    if args.use_wandb and is_main:
        import wandb

        wandb_run = wandb.init(project=args.wandb_project, config=vars(args),
                               name=f"MiniMind-V-{stage.name}-Epoch-{args.epochs}-BatchSize-{args.batch_size}"
                                    f"-LearningRate-{args.learning_rate}")

    stop = StopRequest()
    peak = peak_flops(device, amp_dtype)
    max_steps = args.max_steps if args.max_steps is not None else total_iters
    losses: list[float] = []
    skipped_images = 0
    from tqdm import tqdm

    bar = tqdm(total=min(total_iters, max_steps), initial=global_step, disable=not is_main, unit="step",
               desc=stage.name, dynamic_ncols=True, mininterval=2.0)
    try:
        window = {"t": time.perf_counter(), "tokens": 0, "images": 0, "wait": 0.0, "steps": 0, "loss_sum": 0.0,
                  "loss_n": 0, "supervised": 0}
        done = global_step >= max_steps
        saved_at = -1
        bad_in_accumulation = False
        model.train()
        while epoch < args.epochs and not done:
            sampler.set_epoch(epoch)
            # resume mid-epoch: skip the samples already trained (the order is fixed by seed + epoch)
            sampler.skip = step_in_epoch * args.batch_size
            batches = iter(DataLoader(dataset, **loader_kwargs))
            while True:
                t_wait = time.perf_counter()
                batch = next(batches, None)
                window["wait"] += time.perf_counter() - t_wait
                if batch is None:
                    break
                for rid, reason in batch["skipped"]:
                    skipped_images += 1
                    if skipped_images <= 5:
                        log.warning("skipping record %s: %s", rid, reason)
                lr = lr_at(global_step, total_iters, args.learning_rate, args.warmup_iters)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                boundary = (step_in_epoch + 1) % args.accumulation_steps == 0 or step_in_epoch + 1 == iters_per_epoch
                if "input_ids" in batch:
                    input_ids = batch["input_ids"].to(device, non_blocking=True)
                    labels = batch["labels"].to(device, non_blocking=True)
                    if "features" in batch:
                        features = batch["features"].to(device, non_blocking=True).float()
                    else:
                        features = encoder.encode_pixels(batch["pixels"].to(device, non_blocking=True))
                    sync = contextlib.nullcontext() if (boundary or not distributed) else train_model.no_sync()
                    with sync:
                        with autocast():
                            loss = train_model(input_ids, features, labels=labels, loss_only=True).loss
                        scaler.scale(loss / args.accumulation_steps).backward()
                    loss_value = loss.item()
                    window["tokens"] += batch["n_tokens"]
                    window["supervised"] += int((batch["labels"][:, 1:] != -100).sum())  # CPU tensor: no device sync
                    window["images"] += input_ids.shape[0]
                else:  # every image of this batch failed to decode: nothing to learn from it
                    loss_value = float("nan")
                bad_in_accumulation |= "input_ids" in batch and not math.isfinite(loss_value)
                if boundary:
                    if scaler.is_enabled():
                        scaler.unscale_(optimizer)
                    norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip if args.grad_clip > 0 else math.inf)
                    # With fp16 the GradScaler skips overflowing steps itself; otherwise a non-finite gradient is a
                    # fault. Ranks agree on it (one tiny all-reduce per optimizer step) so they act together.
                    flag = torch.tensor(float(bad_in_accumulation or (not scaler.is_enabled() and
                                                                      not bool(torch.isfinite(norm)))), device=device)
                    if distributed:
                        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    bad_in_accumulation = False
                    if flag.item() > 0:
                        optimizer.zero_grad(set_to_none=True)
                        if args.nan_policy == "skip":
                            nan_skips += 1
                            log.warning("non-finite loss or gradient at step %d: step skipped (%d so far)",
                                        global_step, nan_skips)
                        else:
                            save(final=False)
                            raise FloatingPointError(
                                f"non-finite loss or gradient (loss {loss_value}) at step {global_step}: stopped; the "
                                f"last good weights are saved in {out_path} (resume with --resume, or pass "
                                f"--nan_policy skip to skip such steps)")
                    else:
                        scaler.step(optimizer)
                        scaler.update()
                        optimizer.zero_grad(set_to_none=True)
                if "input_ids" in batch and math.isfinite(loss_value):
                    losses.append(loss_value)
                    window["loss_sum"] += loss_value
                    window["loss_n"] += 1
                step_in_epoch += 1
                global_step += 1
                window["steps"] += 1
                bar.update(1)
                if is_main and (global_step % args.log_interval == 0 or global_step == max_steps):
                    _log_progress(args, epoch, step_in_epoch, iters_per_epoch, global_step, max_steps, loss_value, lr,
                                  window, config, peak, device, world, bar, wandb_run, metrics_path)
                done = global_step >= max_steps
                if step_in_epoch == iters_per_epoch:  # the position a resume continues from
                    epoch, step_in_epoch = epoch + 1, 0
                if boundary and (stop.signal is not None or done or global_step % args.save_interval == 0):
                    save(final=done)
                    saved_at = global_step
                    if stop.signal is not None:
                        log.warning("stopped by signal %d at step %d; resume with --resume", stop.signal, global_step)
                        return {"stopped": True, "global_step": global_step, "losses": losses}
                if done or step_in_epoch == 0:
                    break
        if saved_at != global_step:
            save(final=True)
    finally:
        bar.close()  # before any error line, so it starts on a line of its own
    if distributed:
        _check_replicas(model, rank)
    if wandb_run is not None:
        wandb_run.finish()
    summary = {"stopped": False, "global_step": global_step, "losses": losses, "checkpoint": out_path,
               "skipped_records": dataset.skips.total, "skipped_images": skipped_images, "nan_skips": nan_skips}
    log.info("done: %d steps, final loss %.4f, %s; %d images failed to decode", global_step,
             losses[-1] if losses else float("nan"), dataset.skips.summary(), skipped_images)
    return summary


def _log_progress(args, epoch, step_in_epoch, iters_per_epoch, global_step, max_steps, loss, lr, window, config,
                  peak, device, world, bar, wandb_run, metrics_path: str) -> None:
    now = time.perf_counter()
    elapsed = max(now - window["t"], 1e-9)
    if window["loss_n"]:  # the mean over the interval: a smoother curve than the last step's loss
        loss = window["loss_sum"] / window["loss_n"]
    tokens_s = window["tokens"] * world / elapsed
    images_s = window["images"] * world / elapsed
    avg_len = window["tokens"] / max(window["images"], 1)
    head_fraction = window["supervised"] / max(window["tokens"], 1)
    # a window whose batches all lost their images trained no tokens: no MFU (and no division by a zero length)
    mfu = tokens_s / world * matmul_flops_per_token(config, avg_len, head_fraction) / peak if avg_len else 0.0
    wait = 100 * window["wait"] / elapsed
    remaining = (min(max_steps, args.epochs * iters_per_epoch) - global_step) * elapsed / max(window["steps"], 1)
    bar.write(f"epoch {epoch + 1}/{args.epochs} ({step_in_epoch}/{iters_per_epoch}) step {global_step} "
              f"loss {loss:.4f} lr {lr:.3e} | {tokens_s:,.0f} tok/s {images_s:,.1f} img/s MFU {100 * mfu:.1f}% "
              f"data-wait {wait:.1f}% | ETA {remaining / 60:.1f} min | peak mem {peak_memory_mb(device):,.0f} MB")
    metrics = {"step": global_step, "epoch": epoch, "loss": loss, "lr": lr, "tokens_per_s": tokens_s,
               "images_per_s": images_s, "mfu": mfu, "data_wait_pct": wait}
    with open(metrics_path, "a") as f:  # one JSON line per log interval: the loss curve, for plots
        f.write(json.dumps(metrics) + "\n")
    if wandb_run is not None:
        wandb_run.log(metrics, step=global_step)
    window.update(t=now, tokens=0, images=0, wait=0.0, steps=0, loss_sum=0.0, loss_n=0, supervised=0)


def _check_replicas(model: MiniMindVLM, rank: int) -> None:
    """DDP keeps replicas identical; verify it and say so (a mismatch is a bug worth stopping for)."""
    checksum = torch.tensor([sum(float(p.double().sum()) for p in model.parameters())], dtype=torch.float64)
    gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    print(f"rank {rank} weights checksum {checksum.item():.10e}", flush=True)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"DDP replicas differ after training: {[g.item() for g in gathered]}")
    if rank == 0:
        log.info("replicas identical across %d ranks", len(gathered))


def main(stage: Stage, argv: Optional[list[str]] = None) -> None:
    args = build_parser(stage).parse_args(argv)
    try:
        train(args, stage)
    except (OSError, DataError, CheckpointError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
