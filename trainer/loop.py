"""The one training loop shared by 1-pretrain_vlm.py and 2-sft_vlm.py, composed of named pieces:

  train_config  the flags and the two stages' defaults        train_step   one optimizer step
  train_state   optimizer, scaler, position, RNG; save/resume  metrics      throughput, MFU, the log line
  distributed   torchrun setup and collectives

A step is one optimizer update of --accumulation_steps micro-batches; --max_steps, --save_interval,
--log_interval, --warmup_iters and the LR schedule all count steps. SIGINT/SIGTERM save at the next step
boundary and exit; --resume continues exactly.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader

from data_pipeline.dataset import Batch, DataError, VLMDataset, collate
from data_pipeline.feature_store import FeatureStore
from data_pipeline.samplers import LengthGroupedSampler, ResumableSampler
from model.checkpoint import Checkpoint, config_path_for, load_weights, read_checkpoint, save_checkpoint
from model.config import LMConfig
from model.config_inference import has_projection_bias
from model.decoder import count_parameters
from model.files import CheckpointError, atomic_write, remove_stale_temp_files
from model.tokenizer import TokenizerError, image_token_ids, load_tokenizer
from model.tokenizer_pairing import training_tokenizer
from model.vision import VisionEncoder, load_vision_encoder, stand_in_warning
from model.vlm import MiniMindVLM

from .config import RunPaths, Stage, build_parser, checkpoint_stem, model_size, run_record
from .distributed import Distributed
from .metrics import (ProgressWindow, StepMetrics, append_jsonl, drop_records_after, peak_flops, peak_memory_mb,
                      progress_line)
from .state import seed_everything
from .step import StepContext, apply_freeze, autocast_for, lr_at, new_train_state, train_step
from .validation import Validator

log = logging.getLogger("minimind")


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


# ------------------------------------------------------------------------------------------ building the run
def start_checkpoint(args: argparse.Namespace, stage: Stage) -> Optional[Checkpoint]:
    """The checkpoint this stage starts from (file or model directory), or None with --from_scratch."""
    if args.from_scratch:
        return None
    init_path = args.init or os.path.join(args.out_dir, f"{checkpoint_stem(args)}{stage.init_suffix}.pth")
    if not os.path.exists(init_path):
        raise FileNotFoundError(f"start checkpoint not found: {init_path}. {stage.init_hint}, pass --init PATH, "
                                f"or --from_scratch to start from random weights")
    return read_checkpoint(init_path)


def build_model(args: argparse.Namespace, stage: Stage, tokenizer, encoder: VisionEncoder,
                init: Optional[Checkpoint]) -> MiniMindVLM:
    """The model at its starting weights (`init`, the stage's start checkpoint, unless --from_scratch), frozen per
    policy."""
    init_sd = init.state_dict if init is not None else None
    config = LMConfig(**model_size(args), image_ids=image_token_ids(tokenizer), vision_dim=encoder.hidden_size,
                      vision_proj_bias=bool(init_sd is not None and has_projection_bias(init_sd)))
    model = MiniMindVLM(config)
    if init is not None:
        report = load_weights(model, init_sd, source=init.path, allow_new_projection=stage.allow_new_projection)
        log.info("loaded %s%s", init.path, f" (new: {', '.join(report.new_keys)})" if report.new_keys else "")
    apply_freeze(model, args.freeze_llm)
    return model


@dataclass
class TrainData:
    dataset: VLMDataset
    sampler: ResumableSampler
    loader_kwargs: dict[str, Any]
    batches_per_epoch: int  # micro-batches

    def epoch(self, epoch: int, skip_batches: int) -> Iterator[Batch]:
        """This rank's batches of `epoch` (the order is fixed by seed + epoch), starting `skip_batches` in."""
        self.sampler.set_epoch(epoch)
        self.sampler.skip = skip_batches * self.loader_kwargs["batch_size"]
        return iter(DataLoader(self.dataset, **self.loader_kwargs))


def build_data(args: argparse.Namespace, tokenizer, encoder: VisionEncoder, dist: Distributed) -> TrainData:
    """The dataset (with its feature store filled by rank 0 when --feature_cache is set) and its sampler."""
    store = FeatureStore(args.feature_cache, encoder.fingerprint) if args.feature_cache else None
    dataset = VLMDataset(args.data_path, args.images_path, tokenizer, args.max_seq_len, args.image_prefix,
                         args.multi_turn, args.strict_data, encoder.preprocess, store, args.skip_text_only,
                         args.pack_same_image)
    packed = sum(s.segments is not None for s in dataset.samples)
    log.info("%s: %d samples%s; %s", args.data_path, len(dataset),
             f" ({packed} of them packed rows of up to {args.pack_same_image} questions on one image)"
             if args.pack_same_image > 1 else "", dataset.skips.summary())
    if len(dataset) == 0:
        raise DataError(f"{args.data_path}: no usable records ({dataset.skips.summary()})")
    if store is not None:
        if dist.is_main:
            n = store.ensure(dataset.image_paths(), encoder, num_workers=min(args.num_workers, 4))
            log.info("feature cache %s: %d images encoded now, %d cached", store.dir, n, len(store))
        dist.barrier()
        store.reload()  # what rank 0 wrote
    if args.group_by_length:
        sampler = LengthGroupedSampler(dataset, [len(s.input_ids) for s in dataset.samples], args.batch_size,
                                       num_replicas=dist.world, rank=dist.rank, seed=args.seed)
    else:
        sampler = ResumableSampler(dataset, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=args.seed)
    pad_to = args.max_seq_len if args.pad_to_max else None
    loader_kwargs = dict(batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                         collate_fn=lambda items: collate(items, pad_to), pin_memory=dist.device.type == "cuda",
                         drop_last=False, persistent_workers=False)
    return TrainData(dataset, sampler, loader_kwargs, math.ceil(len(sampler) / args.batch_size))


def build_validator(args: argparse.Namespace, tokenizer, encoder: VisionEncoder, dist: Distributed, store,
                    autocast) -> Optional[Validator]:
    """The validation set of --val_data (its images go through the same feature store), or None."""
    if args.save_best and not args.val_data:
        raise DataError("--save_best needs --val_data (the best checkpoint is picked by validation)")
    if not args.val_data:
        return None
    dataset = VLMDataset(args.val_data, args.val_images_path or args.images_path, tokenizer, args.max_seq_len,
                         args.image_prefix, args.multi_turn, False, encoder.preprocess, store, args.skip_text_only)
    log.info("validation %s: %d samples (%d scored for accuracy); %s", args.val_data, len(dataset),
             min(args.val_samples, len(dataset)), dataset.skips.summary())
    if len(dataset) == 0:
        raise DataError(f"{args.val_data}: no usable validation records ({dataset.skips.summary()})")
    if store is not None:
        if dist.is_main:
            store.ensure(dataset.image_paths(), encoder, num_workers=min(args.num_workers, 4))
        dist.barrier()
        store.reload()
    return Validator(dataset, tokenizer, encoder, dist, args.batch_size, args.val_samples, autocast)


def open_wandb(args: argparse.Namespace, stage: Stage, dist: Distributed):
    if not (args.use_wandb and dist.is_main):
        return None
    import wandb

    return wandb.init(project=args.wandb_project, config=vars(args),
                      name=f"MiniMind-V-{stage.name}-Epoch-{args.epochs}-BatchSize-{args.batch_size}"
                           f"-LearningRate-{args.learning_rate}")


# ------------------------------------------------------------------------------------------ the run
def train(args: argparse.Namespace, stage: Stage) -> dict[str, Any]:
    """Run one training stage; returns a summary (final loss, steps, skipped records, paths)."""
    dist = Distributed.from_env(args.device)
    setup_logging(dist.rank)
    seed_everything(args.seed + dist.rank)
    try:
        return Run(args, stage, dist).train()
    finally:
        dist.close()


class Run:
    """One stage's run: the pieces built once, then `train` loops over optimizer steps."""

    def __init__(self, args: argparse.Namespace, stage: Stage, dist: Distributed):
        model_size(args)  # resolve --preset before the file names use dim
        self.args, self.stage, self.dist = args, stage, dist
        os.makedirs(args.out_dir, exist_ok=True)
        self.paths = RunPaths.of(args, stage)
        if dist.is_main and not args.resume and os.path.exists(self.paths.metrics):
            os.remove(self.paths.metrics)
        if dist.is_main:  # temp files of saves that a kill interrupted: never resumed from, only taking space
            for tmp in remove_stale_temp_files([self.paths.weights, config_path_for(self.paths.weights),
                                                self.paths.resume]):
                log.info("removed %s, left by an interrupted save", tmp)
        init = start_checkpoint(args, stage)
        tokenizer_used = training_tokenizer(args.tokenizer_path, init)  # checked against the start checkpoint
        tokenizer = load_tokenizer(tokenizer_used["path"])
        log.info("tokenizer: %s (vocabulary %s)", tokenizer_used["path"], tokenizer_used["fingerprint"][:12])
        self.encoder = load_vision_encoder(args.clip_path, dist.device)
        if stand_in_warning(args.clip_path):
            log.warning(stand_in_warning(args.clip_path))
        self.model = build_model(args, stage, tokenizer, self.encoder, init).to(dist.device)
        self.data = build_data(args, tokenizer, self.encoder, dist)
        if dist.is_main:
            record = json.dumps(run_record(args, stage, len(self.data.dataset)), indent=2) + "\n"
            atomic_write(self.paths.run, lambda f: f.write(record.encode()))
        autocast, self.amp_dtype = autocast_for(dist.device, args.dtype, args.cpu_bf16)
        self.validator = build_validator(args, tokenizer, self.encoder, dist, self.data.dataset.feature_store,
                                         autocast)
        self.state = new_train_state(self.model, dist.device, self.amp_dtype, args.optimizer, args.learning_rate,
                                     args.weight_decay)
        self.state.tokenizer = tokenizer_used  # recorded in every checkpoint; a resume file must match it
        if args.resume:
            if not os.path.exists(self.paths.resume):
                raise FileNotFoundError(f"--resume: no resume checkpoint at {self.paths.resume}")
            self.state.load(self.model, self.paths.resume, dist.rank)
            if dist.is_main and drop_records_after(self.paths.metrics, self.state.step):
                log.info("dropped log records past step %d: that work is redone", self.state.step)
        self.ctx = StepContext(self.encoder, dist.device, autocast, args.accumulation_steps, args.grad_clip, dist)
        self.steps_per_epoch = math.ceil(self.data.batches_per_epoch / args.accumulation_steps)
        self.total_steps = args.epochs * self.steps_per_epoch
        self.max_steps = min(args.max_steps, self.total_steps) if args.max_steps is not None else self.total_steps
        self.losses: list[float] = []
        self.skipped_images = 0
        self.micro_batches = 0
        self.window = ProgressWindow()

    def train(self) -> dict[str, Any]:
        args, state = self.args, self.state
        self._log_setup()
        train_model = self.dist.wrap(torch.compile(self.model) if args.compile else self.model, args.use_moe)
        wandb_run, stop, saved_at = open_wandb(args, self.stage, self.dist), StopRequest(), -1
        from tqdm import tqdm

        self.bar = tqdm(total=self.max_steps, initial=state.step, disable=not self.dist.is_main, unit="step",
                        desc=self.stage.name, dynamic_ncols=True, mininterval=2.0)
        try:
            self.model.train()
            for micro_batches in self.steps():
                lr = lr_at(state.step, self.total_steps, args.learning_rate, args.warmup_iters)
                metrics = train_step(train_model, micro_batches, state, lr, self.ctx)
                self._after_step(metrics, lr, wandb_run)
                self._validate_if_due(wandb_run)
                if stop.signal is not None or state.step >= self.max_steps or state.step % args.save_interval == 0:
                    self.save(final=state.step >= self.max_steps)
                    saved_at = state.step
                    if stop.signal is not None:
                        log.warning("stopped by signal %d at step %d; resume with --resume", stop.signal, state.step)
                        return {"stopped": True, "step": state.step, "losses": self.losses}
            if saved_at != state.step:
                self.save(final=True)
        finally:
            self.bar.close()  # before any error line, so it starts on a line of its own
        self.dist.check_replicas(self.model)
        if wandb_run is not None:
            wandb_run.finish()
        return self._summary()

    def steps(self) -> Iterator[list[Batch]]:
        """The micro-batches of each remaining optimizer step, epoch after epoch, until max_steps."""
        args, state = self.args, self.state
        while state.epoch < args.epochs and state.step < self.max_steps:
            batches = self.data.epoch(state.epoch, state.batches_in_epoch)
            epoch = state.epoch
            while state.step < self.max_steps and state.epoch == epoch:
                group = self._next_group(batches)
                if not group:
                    break
                yield group  # the caller trains it and advances the state (_after_step)

    def _next_group(self, batches: Iterator[Batch]) -> list[Batch]:
        """Up to accumulation_steps batches, stopping at the end of the epoch; logs images that failed."""
        left = self.data.batches_per_epoch - self.state.batches_in_epoch
        group = []
        for _ in range(min(self.args.accumulation_steps, left)):
            t_wait = time.perf_counter()
            batch = next(batches, None)
            self.window.data_wait += time.perf_counter() - t_wait
            if batch is None:
                break
            for rid, reason in batch.skipped:
                self.skipped_images += 1
                if self.skipped_images <= 5:
                    log.warning("skipping record %s: %s", rid, reason)
            group.append(batch)
        return group

    def _after_step(self, metrics: StepMetrics, lr: float, wandb_run) -> None:
        """Count the step (or handle its non-finite loss), then log when due."""
        args, state = self.args, self.state
        if metrics.non_finite:
            if args.nan_policy != "skip":
                self.save(final=False)  # the state before this step: --resume redoes it
                raise FloatingPointError(
                    f"non-finite loss or gradient (loss {metrics.loss}) at step {state.step}: stopped; the last good "
                    f"weights are saved in {self.paths.weights} (resume with --resume, or pass --nan_policy skip "
                    f"to skip such steps)")
            state.nan_skips += 1
            log.warning("non-finite loss or gradient at step %d: step skipped (%d so far)", state.step,
                        state.nan_skips)
        if math.isfinite(metrics.loss):
            self.losses.append(metrics.loss)
        self.window.add(metrics)
        self.micro_batches += metrics.micro_batches
        state.step += 1
        state.batches_in_epoch += metrics.micro_batches
        self.bar.update(1)
        if self.dist.is_main and (state.step % args.log_interval == 0 or state.step == self.max_steps):
            self._log_progress(lr, wandb_run)
        if state.batches_in_epoch == self.data.batches_per_epoch:  # the position a resume continues from
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0

    def _log_progress(self, lr: float, wandb_run) -> None:
        state = self.state
        r = self.window.report(self.dist.world, peak_flops(self.dist.device, self.amp_dtype),
                               self.max_steps - state.step)
        epoch = f"{state.epoch + 1}/{self.args.epochs} ({state.batches_in_epoch}/{self.data.batches_per_epoch})"
        self.bar.write(progress_line(epoch, state.step, self.max_steps, lr, r, peak_memory_mb(self.dist.device)))
        record = {"step": state.step, "epoch": state.epoch, "loss": r["loss"], "lr": lr,
                  "tokens_per_s": r["tokens_per_s"], "images_per_s": r["images_per_s"], "mfu": r["mfu"],
                  "data_wait_pct": r["data_wait_pct"], "padding_pct": r["padding_pct"],
                  "tokens": r["tokens"], "padded_tokens": r["padded_tokens"]}  # this interval's, on this rank
        append_jsonl(self.paths.metrics, record)  # one JSON line per log interval: the loss curve, for plots
        if wandb_run is not None:
            wandb_run.log(record, step=state.step)

    def _validate_if_due(self, wandb_run) -> None:
        """Validate every --eval_interval steps and at the last step; keep the best weights under --save_best."""
        args, state = self.args, self.state
        if self.validator is None:
            return
        if not (state.step >= self.max_steps or (args.eval_interval > 0 and state.step % args.eval_interval == 0)):
            return
        result = self.validator.run(self.model)  # every rank takes part; all get the same numbers
        improved = state.best is None or result.score > state.best
        if improved:
            state.best = result.score
        if self.dist.is_main:
            self.bar.write(f"step {state.step} {result.line()}" + (" (best)" if improved else ""))
            record = {"step": state.step, "epoch": state.epoch, **result.metrics()}
            append_jsonl(self.paths.metrics, record)
            if wandb_run is not None:
                wandb_run.log(result.metrics(), step=state.step)
            if args.save_best and improved:
                save_checkpoint(self.model, self.paths.best, tokenizer=self.state.tokenizer)
                log.info("saved %s (best so far: %s)", self.paths.best, result.line())
        self.dist.barrier()

    def save(self, final: bool) -> None:
        self.state.save(self.model, self.paths.weights, self.paths.resume, self.dist)
        if self.dist.is_main:
            log.info("saved %s%s", self.paths.weights, " (final)" if final else "")

    def _log_setup(self) -> None:
        args, trainable = self.args, sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("model: %.3fM parameters (%.3fM trainable, freeze_llm=%d), %s, dtype %s, world %d",
                 count_parameters(self.model) / 1e6, trainable / 1e6, args.freeze_llm, self.dist.device,
                 str(self.amp_dtype).replace("torch.", ""), self.dist.world)
        log.info("training to step %d: each optimizer step is %d micro-batch(es) of %d samples per rank "
                 "(%d steps per epoch)", self.max_steps, args.accumulation_steps, args.batch_size,
                 self.steps_per_epoch)

    def _summary(self) -> dict[str, Any]:
        skips = self.data.dataset.skips
        log.info("done: %d optimizer steps from %d micro-batches this run, final loss %.4f, %s; %d images failed "
                 "to decode", self.state.step, self.micro_batches, self.losses[-1] if self.losses else float("nan"),
                 skips.summary(), self.skipped_images)
        return {"stopped": False, "step": self.state.step, "micro_batches": self.micro_batches,
                "losses": self.losses, "checkpoint": self.paths.weights, "skipped_records": skips.total,
                "skipped_images": self.skipped_images, "nan_skips": self.state.nan_skips}


def main(stage: Stage, argv: Optional[list[str]] = None) -> None:
    args = build_parser(stage).parse_args(argv)
    try:
        train(args, stage)
    except (OSError, DataError, CheckpointError, TokenizerError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
