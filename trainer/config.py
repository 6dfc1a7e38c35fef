"""What a training run is asked to do: the two stages' defaults, the command-line flags, and `RunConfig`, the
flags resolved once (the preset's size filled in, the values checked) into the frozen record the loop reads.

The model-size flags (--preset, --dim, --n_layers, ...) are defined once here, in `add_model_size_args`, and read
back by `model_size` for the trainer, the benchmarks and the demo.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Union

import torch

from model.config import PRESETS
from model.vision import DEFAULT_CLIP_PATH


@dataclass(frozen=True, kw_only=True)
class Stage:
    name: str  # "pretrain" or "sft": names the output files
    data_path: str
    images_path: str
    image_prefix: str
    learning_rate: float
    log_interval: int
    init_suffix: str  # the checkpoint this stage starts from: out/{dim}{_moe}{init_suffix}.pth
    allow_new_projection: bool  # the LLM-only checkpoint has no projection yet
    init_hint: str  # how to get the start checkpoint when it is missing


PRETRAIN = Stage(name="pretrain", data_path="./dataset/LLaVA-Pretrain/chat-translated.json",
                 images_path="./dataset/pretrain_images", image_prefix="", learning_rate=4e-4, log_interval=10,
                 init_suffix="_llm", allow_new_projection=True,
                 init_hint="download the MiniMind LLM weights with `python scripts/download.py --what llm`")
SFT = Stage(name="sft", data_path="./dataset/LLaVA-Instruct/llava_instruct_230k.json",
            images_path="./dataset/sft_images", image_prefix="COCO_train2014_", learning_rate=1e-6,
            log_interval=100, init_suffix="_vlm_pretrain", allow_new_projection=False,
            init_hint="run 1-pretrain_vlm.py first")


def add_model_size_args(parser: argparse.ArgumentParser, default_preset: str = "minimind-v-small") -> None:
    """--preset picks a published size; --dim/--n_layers (and the head counts) override it."""
    a = parser.add_argument
    a("--preset", default=default_preset, choices=sorted(PRESETS),
      help=", ".join(f"{k}: dim {v['dim']}, {v['n_layers']} layers" for k, v in PRESETS.items()))
    a("--dim", type=int, default=None, help="overrides the preset's width")
    a("--n_layers", type=int, default=None, help="overrides the preset's depth")
    a("--n_heads", type=int, default=16)
    a("--n_kv_heads", type=int, default=8)
    a("--use_moe", action="store_true")
    a("--max_seq_len", type=int, default=200)


def model_size(args: Union[argparse.Namespace, "RunConfig"]) -> dict[str, Any]:
    """The LMConfig size fields the flags ask for (the preset, then any explicit override); `args` is left as
    it is."""
    size = dict(PRESETS[args.preset])
    if args.dim is not None:
        size["dim"] = args.dim
    if args.n_layers is not None:
        size["n_layers"] = args.n_layers
    return {**size, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "use_moe": args.use_moe,
            "max_seq_len": args.max_seq_len}


def add_v1_args(p: argparse.ArgumentParser, stage: Stage) -> None:
    """The flags v1's training scripts took (same names and meanings), with the model-size flags."""
    a = p.add_argument
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
    # v1 compatibility: v1 scripts pass --ddp and --local_rank; DDP is detected from torchrun's environment
    a("--ddp", action="store_true", help="accepted for v1 compatibility; DDP is detected from torchrun's env")
    a("--accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    a("--grad_clip", type=float, default=1.0)
    a("--warmup_iters", type=int, default=0, help="optimizer steps of linear warmup")
    a("--log_interval", type=int, default=stage.log_interval, help="optimizer steps between log lines")
    a("--save_interval", type=int, default=100, help="optimizer steps between checkpoints")
    a("--local_rank", type=int, default=-1, help="accepted for v1 compatibility")
    add_model_size_args(p)


def build_parser(stage: Stage) -> argparse.ArgumentParser:
    """Every training flag with the stage's defaults: v1's flags first (`add_v1_args`), then the newer ones, in
    the order `--help` prints them, grouped by comments."""
    p = argparse.ArgumentParser(description=f"MiniMind-V {stage.name} (run with torchrun for several GPUs)")
    add_v1_args(p, stage)
    a = p.add_argument
    # paths
    a("--clip_path", default=DEFAULT_CLIP_PATH)
    a("--tokenizer_path", default=None,
      help="default: the start checkpoint's own tokenizer (recorded in its sidecar; the official one for a published "
           "file), or model/minimind_tokenizer with --from_scratch")
    a("--images_path", default=stage.images_path)
    a("--image_prefix", default=stage.image_prefix, help="prepended to each record's image file name")
    a("--init", default=None, help=f"start from this checkpoint (default out/{{dim}}{{_moe}}{stage.init_suffix}.pth)")
    a("--from_scratch", action="store_true", help="start from random weights (no init checkpoint)")
    a("--resume", action="store_true", help="continue exactly from this stage's resume checkpoint")
    a("--allow_encoder_mismatch", action="store_true",
      help="start or resume from a checkpoint trained with another vision encoder than --clip_path (its projection "
           "is then re-fitted to this one); by default that is refused")
    # data
    a("--multi_turn", action="store_true", help="keep every turn (v1 SFT keeps the first only)")
    a("--strict_data", action="store_true", help="a bad record is an error instead of a counted skip")
    a("--feature_cache", default=None, metavar="DIR", help="encode each image once into a fp16 store here")
    a("--pad_to_max", action="store_true", help="pad every batch to max_seq_len (v1 behaviour; slower)")
    a("--skip_text_only", action="store_true",
      help="skip records without an image (v1 behaviour); by default they train in the same batches")
    a("--pack_same_image", type=int, default=1, metavar="K",
      help="pack up to K single-question records about the same image into one row; each question sees the "
           "image and itself only, so training is unchanged while the image tokens are paid once per row")
    a("--group_by_length", action="store_true",
      help="batch samples of similar length together (shuffled mega-batches, sorted inside): less padding")
    # validation while training
    a("--val_data", default=None, metavar="PATH", help="held-out data (JSON, JSONL or parquet) to validate on")
    a("--val_images_path", default=None, help="image folder for --val_data (default: --images_path)")
    a("--eval_interval", type=int, default=0,
      help="optimizer steps between validations (0: at the end only); the last step always validates")
    a("--val_samples", type=int, default=200,
      help="validation records whose first answer is scored by greedy exact match (0: loss only)")
    a("--save_best", action="store_true",
      help="also keep the checkpoint with the best validation accuracy (or loss) as ..._best.pth")
    # training
    a("--optimizer", default="adamw", choices=["adamw", "adam"])
    a("--weight_decay", type=float, default=0.0)
    a("--freeze_llm", type=int, default=0, choices=[0, 1, 2],
      help="0: train projection + LLM (v1); 1: projection only; 2: projection + last LLM block")
    a("--max_steps", type=int, default=None,
      help="stop after this many optimizer steps in total (each is --accumulation_steps micro-batches)")
    a("--seed", type=int, default=1337)
    a("--nan_policy", default="stop", choices=["stop", "skip"],
      help="a non-finite loss stops the run after saving (stop) or skips that step (skip)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--cpu_bf16", action="store_true", help="bf16 autocast on CPU")
    return p


class ConfigError(ValueError):
    """A flag value the run cannot use (the message names the flag)."""


# Flags that count something the loop divides by or steps through: each must be at least this.
FLAG_MINIMUMS = {"epochs": 1, "batch_size": 1, "accumulation_steps": 1, "log_interval": 1, "save_interval": 1,
                 "pack_same_image": 1, "max_seq_len": 1, "num_workers": 0, "eval_interval": 0, "val_samples": 0,
                 "max_steps": 1}


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Every training flag, resolved once: `dim` and `n_layers` hold the sizes the preset and overrides give, and
    the counts are checked. The loop, the file names and the logs read this; nothing writes to it."""

    out_dir: str
    epochs: int
    batch_size: int
    learning_rate: float
    device: str
    dtype: str
    use_wandb: bool
    wandb_project: str
    num_workers: int
    data_path: str
    ddp: bool  # v1 compatibility only
    accumulation_steps: int
    grad_clip: float
    warmup_iters: int
    log_interval: int
    save_interval: int
    local_rank: int  # v1 compatibility only
    preset: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    use_moe: bool
    max_seq_len: int
    clip_path: str
    tokenizer_path: Optional[str]
    images_path: str
    image_prefix: str
    init: Optional[str]
    from_scratch: bool
    resume: bool
    allow_encoder_mismatch: bool
    multi_turn: bool
    strict_data: bool
    feature_cache: Optional[str]
    pad_to_max: bool
    skip_text_only: bool
    pack_same_image: int
    group_by_length: bool
    val_data: Optional[str]
    val_images_path: Optional[str]
    eval_interval: int
    val_samples: int
    save_best: bool
    optimizer: str
    weight_decay: float
    freeze_llm: int
    max_steps: Optional[int]
    seed: int
    nan_policy: str
    compile: bool
    cpu_bf16: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunConfig":
        """Resolve parsed flags (build_parser's); a value the run cannot use raises ConfigError."""
        names = {f.name for f in fields(cls)}
        if set(vars(args)) != names:  # a flag added to the parser but not here (or the reverse): a bug
            raise TypeError(f"RunConfig and the parser disagree on {sorted(set(vars(args)) ^ names)}")
        for name, minimum in FLAG_MINIMUMS.items():
            value = getattr(args, name)
            if value is not None and value < minimum:
                raise ConfigError(f"--{name} must be at least {minimum} (got {value})")
        size = model_size(args)
        return cls(**{**vars(args), "dim": size["dim"], "n_layers": size["n_layers"]})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunPaths:
    """The files one stage writes under --out_dir."""

    weights: str  # out/{stem}_vlm_{stage}.pth: the v1-layout checkpoint
    resume: str  # ..._resume.pth: weights, optimizer, scaler, position and RNG states
    metrics: str  # ..._log.jsonl: one JSON line per log interval (and per validation)
    run: str  # ..._run.json: what the run trained on and how (the model card of an export reads it)
    best: str  # ..._best.pth: the weights with the best validation metric (--save_best)

    @classmethod
    def of(cls, args: RunConfig, stage: Stage) -> "RunPaths":
        base = os.path.join(args.out_dir, f"{checkpoint_stem(args)}_vlm_{stage.name}")
        return cls(weights=base + ".pth", resume=base + "_resume.pth", metrics=base + "_log.jsonl",
                   run=base + "_run.json", best=base + "_best.pth")


def run_record(args: RunConfig, stage: Stage, n_samples: int) -> dict:
    """The facts about a training run that its checkpoint's model card states."""
    fields = ("data_path", "images_path", "epochs", "batch_size", "accumulation_steps", "learning_rate",
              "max_seq_len", "dtype", "max_steps")
    return {"stage": stage.name, "samples": n_samples, **{k: getattr(args, k) for k in fields if hasattr(args, k)}}


def checkpoint_stem(args: Union[argparse.Namespace, "RunConfig"]) -> str:
    """The size part of the output file names: the resolved width, and _moe for a mixture of experts."""
    return f"{model_size(args)['dim']}{'_moe' if args.use_moe else ''}"
