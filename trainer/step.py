"""One optimizer step, the unit the trainer and bench/train_throughput.py both run.

`train_step` takes the micro-batches of one step: for each, features (cache or encoder), forward under autocast,
backward of loss / accumulation_steps (DDP's gradient sync only on the last), then unscale, clip, and the optimizer
step, unless a loss or the gradient is not finite (then the gradients are dropped and the caller decides).
Also here: the v1 learning-rate schedule, the freezing policies and the autocast/optimizer setup.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch

from data_pipeline.dataset import Batch
from data_pipeline.feature_store import batch_features
from checkpoints.checkpoint import unwrap
from model.vision import VisionEncoder
from model.vlm import MiniMindVLM

from .compile_step import mark_dynamic_dims
from .distributed import Distributed
from .metrics import StepMetrics
from .state import TrainState

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def lr_at(it: int, total: int, lr: float, warmup: int) -> float:
    """v1 schedule over optimizer steps: linear warmup, then cosine from lr to lr/10 over the remaining steps."""
    min_lr = lr / 10
    if it < warmup:
        return lr * it / warmup
    if it > total:
        return min_lr
    progress = (it - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def apply_freeze(model: MiniMindVLM, policy: int) -> None:
    """0: train everything but CLIP (v1); 1: the projection only; 2: the projection and the last block; 3: the
    projection and the first and last blocks (3v's SFT; embeddings, output head and final norm stay frozen)."""
    for p in model.parameters():
        p.requires_grad_(policy == 0)
    model.vision_proj.requires_grad_(True)
    if policy in (2, 3):
        model.layers[-1].requires_grad_(True)
    if policy == 3:
        model.layers[0].requires_grad_(True)


def autocast_for(device: torch.device, dtype: str, cpu_bf16: bool) -> tuple[Callable[[], ContextManager], torch.dtype]:
    """The autocast context and its dtype: --dtype on CUDA; float32 on CPU unless --cpu_bf16."""
    amp_dtype = AMP_DTYPES[dtype]
    if device.type == "cuda" and amp_dtype != torch.float32:
        return (lambda: torch.autocast("cuda", dtype=amp_dtype)), amp_dtype
    if device.type == "cpu" and cpu_bf16:
        return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)), torch.bfloat16
    return contextlib.nullcontext, torch.float32


def new_train_state(model: torch.nn.Module, device: torch.device, amp_dtype: torch.dtype, optimizer: str = "adamw",
                    lr: float = 4e-4, weight_decay: float = 0.0, fused: bool = False) -> TrainState:
    """A fresh TrainState: AdamW (or Adam) over the trainable parameters, fused on CUDA (or when asked), and a
    GradScaler that is only enabled for float16 on CUDA."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt_cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    kwargs = {"fused": True} if device.type == "cuda" or fused else {}
    opt = opt_cls(trainable, lr=lr, weight_decay=weight_decay, **kwargs)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and amp_dtype == torch.float16)
    return TrainState(optimizer=opt, scaler=scaler)


@dataclass(frozen=True)
class StepContext:
    """What stays the same from one step to the next."""

    encoder: VisionEncoder
    device: torch.device
    autocast: Callable[[], ContextManager]
    accumulation_steps: int = 1
    grad_clip: float = 1.0  # <= 0: no clipping
    dist: Optional[Distributed] = None  # None: a single process
    compiled: bool = False  # the model is under torch.compile: its inputs' varying sizes are marked dynamic


def train_step(model: torch.nn.Module, micro_batches: list[Batch], state: TrainState, lr: float,
               ctx: StepContext) -> StepMetrics:
    """Train on the micro-batches of one optimizer step (a batch whose images all failed adds nothing)."""
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    config = unwrap(model).config
    metrics = StepMetrics(loss=float("nan"), micro_batches=len(micro_batches))
    losses = []
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        if batch.empty:
            if last and ctx.dist is not None and ctx.dist.enabled:
                _backward_zero(model, state, ctx)
            continue
        sync = model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()
        with sync:
            features = batch_features(batch, ctx.encoder, ctx.device)
            inputs = _model_inputs(batch, features, ctx.device)
            if ctx.compiled:
                mark_dynamic_dims(inputs)
            with ctx.autocast():
                loss = model(**inputs).loss
            if features is None:
                loss = _with_projection(model, loss)
            # v1 divides by accumulation_steps even for the shorter last group of an epoch
            state.scaler.scale(loss / ctx.accumulation_steps).backward()
        losses.append(loss.item())
        supervised = batch.supervised
        metrics.tokens += batch.n_tokens
        metrics.padded_tokens += batch.input_ids.numel()
        metrics.images += batch.n_images
        metrics.flops += config.train_flops(batch.lengths, supervised, batch.n_images)
    if losses:
        metrics.loss = sum(losses) / len(losses)
    metrics.non_finite = not _apply_update(state, ctx, bad_loss=not all(map(math.isfinite, losses)))
    return metrics


def _model_inputs(batch: Batch, features: Optional[torch.Tensor], device: torch.device) -> dict:
    """The forward's arguments for a batch: the spans and supervised positions the collate step found travel
    with it, so the forward has no host sync (compiled, the step has no graph break)."""
    def to_device(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.to(device, non_blocking=True)

    spans = None if batch.image_rows is None or features is None else \
        (to_device(batch.image_rows), to_device(batch.image_starts))
    return dict(input_ids=to_device(batch.input_ids), image_features=features, labels=to_device(batch.labels),
                loss_only=True, segment_ids=to_device(batch.segment_ids), image_spans=spans,
                loss_positions=to_device(batch.loss_positions))


def _with_projection(model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """A text-only loss with the projection kept in the graph at weight zero (DDP and freeze_llm=1 need it)."""
    return loss + 0.0 * sum(p.sum() for p in unwrap(model).vision_proj.parameters())


def _backward_zero(model: torch.nn.Module, state: TrainState, ctx: StepContext) -> None:
    """Under DDP the backward of an optimizer step's last micro-batch all-reduces the gradients and waits for every
    rank, so a rank whose last micro-batch lost every image still runs one: a two-token text row with its loss
    multiplied by zero. It adds zero gradients (DDP averages the other ranks' gradients with them) and reduces
    what earlier micro-batches accumulated; skipping it hung every other rank in the all-reduce."""
    ids = torch.zeros(1, 2, dtype=torch.long, device=ctx.device)
    with ctx.autocast():
        loss = model(ids, None, labels=ids, loss_only=True).loss
    state.scaler.scale(0.0 * _with_projection(model, loss)).backward()


def _apply_update(state: TrainState, ctx: StepContext, bad_loss: bool) -> bool:
    """Unscale, clip and step; False (gradients dropped, no update) when the loss or gradient is not finite."""
    if state.scaler.is_enabled():
        state.scaler.unscale_(state.optimizer)
    params = [p for g in state.optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, ctx.grad_clip if ctx.grad_clip > 0 else math.inf)
    # With fp16 the GradScaler skips overflowing steps itself; otherwise a non-finite gradient is a fault. Ranks
    # agree on it (one tiny all-reduce per optimizer step) so they act together.
    bad = bad_loss or (not state.scaler.is_enabled() and not bool(torch.isfinite(norm)))
    if ctx.dist is not None:
        bad = ctx.dist.any(bad)
    if bad:
        state.optimizer.zero_grad(set_to_none=True)
        return False
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    return True
