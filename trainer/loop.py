"""The one training loop shared by 1-pretrain_vlm.py and 2-sft_vlm.py, composed of the package's named pieces
(trainer/__init__.py lists them).

A step is one optimizer update of --accumulation_steps micro-batches; --max_steps, --save_interval,
--log_interval, --warmup_iters and the LR schedule all count steps. SIGINT/SIGTERM are checked before every step:
the run saves at that step boundary and exits; --resume continues exactly, and refuses to continue in another
order than the one it was saved in. A run in which no step trained on anything is an error, not a result.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Iterator, Optional, Union

import torch

from data_pipeline.dataset import Batch
from data_pipeline.records import DataError
from checkpoints.checkpoint import config_path_for, save_checkpoint
from model.decoder import count_parameters
from checkpoints.files import CheckpointError, atomic_write, remove_stale_temp_files
from trainer.seed import seed_everything
from checkpoints.tokenizer import TokenizerError, load_tokenizer
from checkpoints.tokenizer_pairing import training_tokenizer
from model.vision import load_vision_encoder
from checkpoints.vision_pairing import stand_in_warning
from checkpoints.vision_pairing import check_encoder_family, check_vision_encoder, encoder_record

from .build import build_data, build_model, build_validator, open_wandb, resolve_generation
from .compile_step import CompileCounts, compile_for_training
from .config import ConfigError, RunConfig, RunPaths, Stage, build_parser, check_packages, run_record
from .distributed import Distributed
from .metrics import (ProgressWindow, StepMetrics, append_jsonl, drop_records_after, peak_flops, peak_memory_mb,
                      progress_line)
from .state import ResumeError, order_record
from .step import StepContext, autocast_for, lr_at, new_train_state, train_step

log = logging.getLogger("minimind")


class StopRequest:
    """While active (a `with` block), SIGINT/SIGTERM set a flag that the loop checks before every step; a second
    signal gives up at once (KeyboardInterrupt). The previous handlers come back when the block ends."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        if self.signal is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("received signal %d: saving at the end of this step, then exiting", signum)


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)


def train(args: Union[argparse.Namespace, RunConfig], stage: Stage) -> dict[str, Any]:
    """Run one training stage (flags as parsed, or already resolved); returns a summary (final loss, steps,
    skipped records, paths)."""
    config = args if isinstance(args, RunConfig) else RunConfig.from_args(args)
    dist = Distributed.from_env(config.device)
    setup_logging(dist.rank)
    seed_everything(config.seed + dist.rank)
    finished = False
    try:
        summary = Run(config, stage, dist).train()
        finished = True
        return summary
    finally:
        dist.close(finished)


class Run:
    """One stage's run: the pieces built once, then `train` loops over optimizer steps."""

    def __init__(self, config: RunConfig, stage: Stage, dist: Distributed):
        config, init = resolve_generation(config, stage)  # v1 or 3v, and that generation's defaults
        check_packages(config)
        self.config, self.stage, self.dist = config, stage, dist
        os.makedirs(config.out_dir, exist_ok=True)
        self.paths = RunPaths.of(config, stage)
        if dist.is_main:
            self._clean_out_dir()
        tokenizer_used, tokenizer, encoder_used = self._tokenizer_and_encoder(init)
        self.model = build_model(config, stage, tokenizer, self.encoder, init).to(dist.device)
        self.data = build_data(config, tokenizer, self.encoder, dist)
        if dist.is_main:
            record = json.dumps(run_record(config, stage, len(self.data.dataset)), indent=2) + "\n"
            atomic_write(self.paths.run, lambda f: f.write(record.encode()))
        autocast, self.amp_dtype = autocast_for(dist.device, config.dtype, config.cpu_bf16)
        self.validator = build_validator(config, tokenizer, self.encoder, dist, self.data.dataset.feature_store,
                                         autocast)
        self.state = new_train_state(self.model, dist.device, self.amp_dtype, config.optimizer,
                                     config.learning_rate, config.weight_decay)
        self.state.tokenizer = tokenizer_used  # recorded in every checkpoint; a resume file must match it
        self.state.weights_dtype = torch.float16 if config.generation == "3v" else None  # 3v's .pth is fp16
        self.state.vision_encoder = encoder_used  # ... and so is the vision encoder
        self.state.order = order_record(config, dist.world, self.data.row_lengths())  # ... and this order
        if config.resume:
            self._resume()
        self.ctx = StepContext(self.encoder, dist.device, autocast, config.accumulation_steps, config.grad_clip,
                               dist)
        self.steps_per_epoch = math.ceil(self.data.batches_per_epoch / config.accumulation_steps)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.max_steps = min(config.max_steps or self.total_steps, self.total_steps)
        self.losses: list[float] = []
        self.skipped_images = 0
        self.micro_batches = 0
        self.steps_run = 0  # optimizer steps this run went through
        self.steps_trained = 0  # ... of which at least one sample trained and the update was applied
        self.saved_at = -1  # the step of the last save
        self.stop = StopRequest()
        self.window = ProgressWindow()

    def _tokenizer_and_encoder(self, init) -> tuple[dict[str, str], Any, dict[str, str]]:
        """(the tokenizer's record, the tokenizer, the encoder's record), each checked against the start checkpoint
        and the generation; the encoder is loaded into self.encoder."""
        config = self.config
        # from scratch: the project's tokenizer of the generation; from a checkpoint: checked against its record
        tokenizer_used = training_tokenizer(config.tokenizer_path, init, config.generation)
        tokenizer = load_tokenizer(tokenizer_used["path"])
        log.info("tokenizer: %s (vocabulary %s)", tokenizer_used["path"], tokenizer_used["fingerprint"][:12])
        if config.generation == "3v" and not os.path.exists(os.path.join(config.clip_path, "config.json")):
            raise FileNotFoundError(f"SigLIP2 tower not found at '{config.clip_path}' (3v's): get it with `python "
                                    f"scripts/download.py --what clip --generation 3v`, or build the untrained "
                                    f"stand-in with `python scripts/build_stand_in_siglip.py` and pass its --clip_path")
        self.encoder = load_vision_encoder(config.clip_path, self.dist.device)
        if stand_in_warning(config.clip_path):
            log.warning(stand_in_warning(config.clip_path))
        check_encoder_family(config.generation, self.encoder, init.path if init is not None else
                             f"this run (--generation {config.generation})")
        encoder_used = encoder_record(self.encoder)
        if init is not None:  # the start checkpoint's projection must have been fitted to this encoder
            check_vision_encoder(init.vision_record, encoder_used, init.path, config.allow_encoder_mismatch)
        return tokenizer_used, tokenizer, encoder_used

    def _clean_out_dir(self) -> None:
        """A fresh run starts a fresh log; temp files of saves that a kill interrupted (never resumed from, only
        taking space) go, the best checkpoint's included."""
        paths = self.paths
        if not self.config.resume and os.path.exists(paths.metrics):
            os.remove(paths.metrics)
        for tmp in remove_stale_temp_files([paths.weights, config_path_for(paths.weights), paths.resume,
                                            paths.best, config_path_for(paths.best)]):
            log.info("removed %s, left by an interrupted save", tmp)

    def _resume(self) -> None:
        """Continue from the resume file: the same vocabulary and order (checked by TrainState.load), and a saved
        position inside this run's epoch (a file from before orders were recorded could hold one past it)."""
        state, path = self.state, self.paths.resume
        if not os.path.exists(path):
            raise FileNotFoundError(f"--resume: no resume checkpoint at {path}")
        state.load(self.model, path, self.dist.rank, self.config.allow_encoder_mismatch)
        if state.batches_in_epoch >= self.data.batches_per_epoch:
            raise ResumeError(
                f"--resume: {path} was saved at batch {state.batches_in_epoch} of epoch {state.epoch + 1}, but an "
                f"epoch of this run has {self.data.batches_per_epoch} batches: the batching changed since the save "
                f"(batch size, processes, --accumulation_steps, --pack_same_image or the data); resume with the "
                f"flags it was saved with")
        if self.dist.is_main and drop_records_after(self.paths.metrics, state.step):
            log.info("dropped log records past step %d: that work is redone", state.step)

    def train(self) -> dict[str, Any]:
        config, state = self.config, self.state
        self._log_setup()
        train_model = self.dist.wrap(self._compiled_if_asked(), config.use_moe)
        wandb_run = open_wandb(config, self.stage, self.dist)
        from tqdm import tqdm

        self.bar = tqdm(total=self.max_steps, initial=state.step, disable=not self.dist.is_main, unit="step",
                        desc=self.stage.name, dynamic_ncols=True, mininterval=2.0)
        try:
            with self.stop:
                self.model.train()
                for micro_batches in self.steps():
                    lr = lr_at(state.step, self.total_steps, config.learning_rate, config.warmup_iters)
                    metrics = train_step(train_model, micro_batches, state, lr, self.ctx)
                    self._after_step(metrics, lr, wandb_run)
                    self._validate_if_due(wandb_run)
                    if state.step % config.save_interval == 0 and state.step < self.max_steps:
                        self.save(final=False)  # the last step is saved below, once it is known to have trained
                finished = state.step >= self.max_steps or state.epoch >= config.epochs
                if not finished and self.stopping:
                    return self._stopped()
                self._check_something_trained()
                if self.saved_at != state.step:
                    self.save(final=True)
        finally:
            self.bar.close()  # before any error line, so it starts on a line of its own
        self.dist.check_replicas(self.model)
        if wandb_run is not None:
            wandb_run.finish()
        return self._summary()

    def _compiled_if_asked(self) -> torch.nn.Module:
        """The model the steps run: under torch.compile with --compile (where inductor can build kernels here;
        otherwise one line says why and training runs eager), else the model itself."""
        self.compile_start = CompileCounts.now()
        if not self.config.compile:
            return self.model
        model, problem = compile_for_training(self.model, self.dist.device)
        if problem is not None:
            log.warning("--compile: %s; training runs eager", problem)
            return model
        self.ctx = dataclasses.replace(self.ctx, compiled=True)
        return model

    @property
    def stopping(self) -> bool:
        """A stop was asked for, on any rank (every rank asks the others, so all stop at the same step)."""
        return self.dist.any(self.stop.signal is not None)

    def steps(self) -> Iterator[list[Batch]]:
        """The micro-batches of each remaining optimizer step, epoch after epoch, until max_steps or a stop
        request (checked before every step). Each pass either yields a step, moves to the next epoch, or ends
        the run: an epoch that ends before its counted batches is an error, never a loop without progress."""
        config, state = self.config, self.state
        while state.epoch < config.epochs and state.step < self.max_steps:
            epoch = state.epoch
            batches = self.data.epoch(epoch, state.batches_in_epoch)
            while state.epoch == epoch and state.step < self.max_steps:
                if self.stopping:
                    return
                group = self._next_group(batches)
                if not group:
                    raise DataError(f"{config.data_path}: the data ended after batch {state.batches_in_epoch} of "
                                    f"epoch {epoch + 1}, which should have {self.data.batches_per_epoch}")
                yield group  # the caller trains it and advances the state (_after_step)

    def _next_group(self, batches: Iterator[Batch]) -> list[Batch]:
        """Up to accumulation_steps batches, stopping at the end of the epoch; logs images that failed."""
        left = self.data.batches_per_epoch - self.state.batches_in_epoch
        group = []
        for _ in range(min(self.config.accumulation_steps, left)):
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
        config, state = self.config, self.state
        if metrics.non_finite:
            if config.nan_policy != "skip":
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
        self.steps_run += 1
        self.steps_trained += metrics.tokens > 0 and not metrics.non_finite
        state.step += 1
        state.batches_in_epoch += metrics.micro_batches
        self.bar.update(1)
        if self.dist.is_main and (state.step % config.log_interval == 0 or state.step == self.max_steps):
            self._log_progress(lr, wandb_run)
        if state.batches_in_epoch == self.data.batches_per_epoch:  # the position a resume continues from
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0

    def _log_progress(self, lr: float, wandb_run) -> None:
        state = self.state
        r = self.window.report(self.dist.world, peak_flops(self.dist.device, self.amp_dtype),
                               self.max_steps - state.step)
        epoch = f"{state.epoch + 1}/{self.config.epochs} ({state.batches_in_epoch}/{self.data.batches_per_epoch})"
        self.bar.write(progress_line(epoch, state.step, self.max_steps, lr, r, peak_memory_mb(self.dist.device)))
        record = {"step": state.step, "epoch": state.epoch, "loss": r["loss"], "lr": lr,
                  "tokens_per_s": r["tokens_per_s"], "images_per_s": r["images_per_s"], "mfu": r["mfu"],
                  "data_wait_pct": r["data_wait_pct"], "padding_pct": r["padding_pct"],
                  "tokens": r["tokens"], "padded_tokens": r["padded_tokens"]}  # this interval's, on this rank
        append_jsonl(self.paths.metrics, record)  # one JSON line per log interval: the loss curve, for plots
        if wandb_run is not None:
            wandb_run.log(record, step=state.step)

    def _validate_if_due(self, wandb_run) -> None:
        """Validate every --eval_interval steps and at the last step; keep the best weights under --save_best.
        A validation with no score (nothing could be scored) is reported as such and is never the best."""
        config, state = self.config, self.state
        if self.validator is None:
            return
        if not (state.step >= self.max_steps or (config.eval_interval > 0 and state.step % config.eval_interval == 0)):
            return
        result = self.validator.run(self.model)  # every rank takes part; all get the same numbers
        improved = result.score is not None and (state.best is None or result.score > state.best)
        if improved:
            state.best = result.score
        if self.dist.is_main:
            self.bar.write(f"step {state.step} {result.line()}" + (" (best)" if improved else ""))
            append_jsonl(self.paths.metrics, {"step": state.step, "epoch": state.epoch, **result.metrics()})
            if wandb_run is not None:
                wandb_run.log(result.metrics(), step=state.step)
            if config.save_best and improved:
                save_checkpoint(self.model, self.paths.best, tokenizer=self.state.tokenizer,
                                vision_encoder=self.state.vision_encoder, dtype=self.state.weights_dtype)
                log.info("saved %s (best so far: %s)", self.paths.best, result.line())
        self.dist.barrier()

    def save(self, final: bool) -> None:
        self.state.save(self.model, self.paths.weights, self.paths.resume, self.dist)
        self.saved_at = self.state.step
        if self.dist.is_main:
            log.info("saved %s%s", self.paths.weights, " (final)" if final else "")

    def _stopped(self) -> dict[str, Any]:
        """Save where the stop request found the run (unless just saved) and say how to continue."""
        if self.saved_at != self.state.step:
            self.save(final=False)
        cause = f"signal {self.stop.signal}" if self.stop.signal is not None else "a signal to another rank"
        log.warning("stopped by %s at step %d; resume with --resume", cause, self.state.step)
        return {"stopped": True, "step": self.state.step, "losses": self.losses}

    def _check_something_trained(self) -> None:
        """A run whose steps all trained nothing (every batch skipped, or every update non-finite) has no result
        to save: that is an error, on every rank at once."""
        if self.steps_run == 0 or self.dist.any(self.steps_trained > 0):
            return  # nothing left to do (a finished run resumed), or some step trained on some rank
        skips = self.data.dataset.skips
        raise DataError(f"nothing trained: none of the {self.steps_run} optimizer steps of this run trained on any "
                        f"sample ({self.config.data_path}: {skips.summary()}; {self.skipped_images} samples whose "
                        f"images failed to decode; {self.state.nan_skips} non-finite steps skipped)")

    def _log_setup(self) -> None:
        config, trainable = self.config, sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("model: %.3fM parameters (%.3fM trainable, freeze_llm=%d), %s, dtype %s, world %d",
                 count_parameters(self.model) / 1e6, trainable / 1e6, config.freeze_llm, self.dist.device,
                 str(self.amp_dtype).replace("torch.", ""), self.dist.world)
        log.info("training to step %d: each optimizer step is %d micro-batch(es) of %d samples per rank "
                 "(%d steps per epoch)", self.max_steps, config.accumulation_steps, config.batch_size,
                 self.steps_per_epoch)

    def _summary(self) -> dict[str, Any]:
        skips = self.data.dataset.skips
        compiled = CompileCounts.now().since(self.compile_start)
        if self.ctx.compiled:
            log.info("%s", compiled.line())
        log.info("done: %d optimizer steps from %d micro-batches this run, final loss %.4f, %s; %d images failed "
                 "to decode", self.state.step, self.micro_batches, self.losses[-1] if self.losses else float("nan"),
                 skips.summary(), self.skipped_images)
        return {"stopped": False, "step": self.state.step, "micro_batches": self.micro_batches,
                "compiled_graphs": compiled.graphs, "graph_breaks": compiled.graph_breaks,
                "losses": self.losses, "checkpoint": self.paths.weights, "skipped_records": skips.total,
                "skipped_images": self.skipped_images, "nan_skips": self.state.nan_skips}


def main(stage: Stage, argv: Optional[list[str]] = None) -> None:
    args = build_parser(stage).parse_args(argv)
    try:
        train(args, stage)
    except (OSError, DataError, CheckpointError, TokenizerError, FloatingPointError, ConfigError,
            ResumeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # a second SIGINT/SIGTERM, or one before the loop began: no save, no traceback
        print("error: interrupted; the files saved before are kept (continue with --resume if one was saved)",
              file=sys.stderr)
        sys.exit(130)
