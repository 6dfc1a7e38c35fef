"""What a training run is asked to do: the two stages' defaults and `RunConfig`, the one declaration of every
command-line flag (help, choices, per-stage default and least value on each field; trainer.flags builds the
parser from it), resolved once (the preset's size filled in, the values checked) into the frozen record the loop
reads.

The model-size flags (--preset, --dim, --n_layers, ...) are a subset of those fields (`MODEL_SIZE_FLAGS`), added
to other parsers by `add_model_size_args` and read back by `model_size` for the trainer, the benchmarks and the
demo.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Union

import torch

from model.config import PRESETS
from data_pipeline.parquet import is_parquet
from model.vision import DEFAULT_CLIP_PATH, V3_TOWER_PATH
from runtime.packages import missing_packages

from .flags import add_flags, check_minimums, flag


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
    v3_name: str = ""  # 3v: upstream's file names, out/{v3_name}_{dim}{_moe}.pth, started from out/{v3_init}_...
    v3_init: str = ""


PRETRAIN = Stage(name="pretrain", data_path="./dataset/LLaVA-Pretrain/chat-translated.json",
                 images_path="./dataset/pretrain_images", image_prefix="", learning_rate=4e-4, log_interval=10,
                 init_suffix="_llm", allow_new_projection=True,
                 init_hint="download the MiniMind LLM weights with `python scripts/download.py --what llm`",
                 v3_name="pretrain_vlm", v3_init="llm")
SFT = Stage(name="sft", data_path="./dataset/LLaVA-Instruct/llava_instruct_230k.json",
            images_path="./dataset/sft_images", image_prefix="COCO_train2014_", learning_rate=1e-6,
            log_interval=100, init_suffix="_vlm_pretrain", allow_new_projection=False,
            init_hint="run 1-pretrain_vlm.py first", v3_name="sft_vlm", v3_init="pretrain_vlm")

# 3v's defaults (upstream's trainer/train_{pretrain,sft}_vlm.py), used where a flag is left at its default. The
# freezing policies map to upstream's --freeze_llm 2 (pretrain: the projection only) and 1 (SFT: the projection
# and the first and last LLM blocks); AdamW's weight decay is torch's default, 0.01.
V3_STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": {"learning_rate": 4e-4, "batch_size": 16, "max_seq_len": 450, "freeze_llm": 1,
                 "data_path": "./dataset/pretrain_i2t.parquet"},
    "sft": {"learning_rate": 5e-6, "batch_size": 4, "max_seq_len": 768, "freeze_llm": 3,
            "data_path": "./dataset/sft_i2t.parquet"},
}
V3_COMMON_DEFAULTS: dict[str, Any] = {"epochs": 2, "log_interval": 100, "weight_decay": 0.01,
                                      "clip_path": V3_TOWER_PATH}
V3_SIZE_DEFAULTS: dict[str, Any] = {"dim": 768, "n_layers": 8, "n_heads": 8, "n_kv_heads": 4}
V3_DEFAULTED = {*V3_STAGE_DEFAULTS["pretrain"], *V3_COMMON_DEFAULTS, *V3_SIZE_DEFAULTS, "preset"}


class _Defaulted:
    """A flag value that is the flag's declared default (not given on the command line): 3v's defaults replace it."""


class _DefaultInt(int, _Defaulted):
    pass


class _DefaultFloat(float, _Defaulted):
    pass


class _DefaultStr(str, _Defaulted):
    pass


_DEFAULT_TYPES = {int: _DefaultInt, float: _DefaultFloat, str: _DefaultStr}


def defaulted(value: Any) -> Any:
    """`value` marked as a default (None and other types are left as they are)."""
    return _DEFAULT_TYPES[type(value)](value) if type(value) in _DEFAULT_TYPES else value


def is_default(value: Any) -> bool:
    return isinstance(value, _Defaulted)


def plain(value: Any) -> Any:
    """`value` without the default mark."""
    return next(t for t in _DEFAULT_TYPES if isinstance(value, t))(value) if is_default(value) else value


class ConfigError(ValueError):
    """A flag value the run cannot use (the message names the flag)."""


def _preset_help(stage: Stage) -> str:
    return ", ".join(f"{k}: dim {v['dim']}, {v['n_layers']} layers" for k, v in PRESETS.items())


def _init_help(stage: Stage) -> str:
    return f"start from this checkpoint (default out/{{dim}}{{_moe}}{stage.init_suffix}.pth)"


def _default_device(stage: Stage) -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def _of_stage(name: str):
    """A per-stage default: the stage's attribute `name`."""
    return lambda stage: getattr(stage, name)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Every training flag, declared once: each field is the flag `--<name>` (trainer.flags generates the parser
    from these fields, in this order: v1's flags first, then the model size, then the newer ones). Resolved once
    by `from_args`: `dim` and `n_layers` hold the sizes the preset and overrides give, and the counts are checked.
    The loop, the file names and the logs read this; nothing writes to it."""

    # v1's flags (same names and meanings)
    out_dir: str = flag("out", doc="where the checkpoints, resume files and logs go")
    epochs: int = flag(19, minimum=1, doc="passes over the training data")
    batch_size: int = flag(32, minimum=1, doc="samples per micro-batch (per process)")
    learning_rate: float = flag(_of_stage("learning_rate"), doc="peak learning rate (cosine decay to a tenth)")
    device: str = flag(_default_device, default_doc="cuda:0 when CUDA is available, else cpu",
                       doc="where to train (under torchrun each process takes its LOCAL_RANK GPU)")
    dtype: str = flag("bfloat16", "autocast dtype on CUDA (CPU trains in float32 unless --cpu_bf16)",
                      choices=["bfloat16", "float16", "float32"])
    use_wandb: bool = flag(False, doc="log to Weights & Biases")
    wandb_project: str = flag("MiniMind-V", doc="the Weights & Biases project")
    num_workers: int = flag(8, minimum=0, doc="data-loader worker processes")
    data_path: str = flag(_of_stage("data_path"), doc="the training data (JSON, JSONL or parquet)")
    # v1 scripts pass --ddp and --local_rank; DDP is detected from torchrun's environment
    ddp: bool = flag(False, "accepted for v1 compatibility; DDP is detected from torchrun's env")
    accumulation_steps: int = flag(1, "micro-batches per optimizer step", minimum=1)
    grad_clip: float = flag(1.0, doc="gradient-norm clipping threshold")
    warmup_iters: int = flag(0, "optimizer steps of linear warmup")
    log_interval: int = flag(_of_stage("log_interval"), "optimizer steps between log lines", minimum=1)
    save_interval: int = flag(100, "optimizer steps between checkpoints", minimum=1)
    # torch.distributed.launch passes --local-rank since torch 2.0
    local_rank: int = flag(-1, "accepted for v1 compatibility", aliases=("--local-rank",))
    # the model size (MODEL_SIZE_FLAGS; also taken by the benchmarks through add_model_size_args)
    preset: str = flag("minimind-v-small", _preset_help, choices=sorted(PRESETS))
    dim: int = flag(None, "overrides the preset's width")
    n_layers: int = flag(None, "overrides the preset's depth")
    n_heads: int = flag(16, doc="attention heads")
    n_kv_heads: int = flag(8, doc="key/value heads (grouped-query attention)")
    use_moe: bool = flag(False, doc="mixture-of-experts feed-forward layers")
    max_seq_len: int = flag(200, minimum=1, doc="tokens per training row, image tokens included")
    # paths
    clip_path: str = flag(DEFAULT_CLIP_PATH, doc="the CLIP vision tower's folder")
    tokenizer_path: Optional[str] = flag(
        None, "default: the start checkpoint's own tokenizer (recorded in its sidecar; the official one for a "
              "published file), or model/minimind_tokenizer with --from_scratch")
    images_path: str = flag(_of_stage("images_path"), doc="the folder the records' image names are in")
    image_prefix: str = flag(_of_stage("image_prefix"), "prepended to each record's image file name")
    init: Optional[str] = flag(None, _init_help)
    from_scratch: bool = flag(False, "start from random weights (no init checkpoint)")
    resume: bool = flag(False, "continue exactly from this stage's resume checkpoint")
    allow_encoder_mismatch: bool = flag(
        False, "start or resume from a checkpoint trained with another vision encoder than --clip_path (its "
               "projection is then re-fitted to this one); by default that is refused")
    # data
    multi_turn: bool = flag(False, "keep every turn (v1 SFT keeps the first only)")
    strict_data: bool = flag(False, "a bad record is an error instead of a counted skip")
    feature_cache: Optional[str] = flag(None, "encode each image once into a fp16 store here", metavar="DIR")
    pad_to_max: bool = flag(False, "pad every batch to max_seq_len (v1 behaviour; slower)")
    skip_text_only: bool = flag(
        False, "skip records without an image (v1 behaviour); by default they train in the same batches")
    pack_same_image: int = flag(
        1, "pack up to K single-question records about the same image into one row; each question sees the image "
           "and itself only, so training is unchanged while the image tokens are paid once per row",
        metavar="K", minimum=1)
    group_by_length: bool = flag(
        False, "batch samples of similar length together (shuffled mega-batches, sorted inside): less padding")
    # validation while training
    val_data: Optional[str] = flag(None, "held-out data (JSON, JSONL or parquet) to validate on", metavar="PATH")
    val_images_path: Optional[str] = flag(None, "image folder for --val_data (default: --images_path)")
    eval_interval: int = flag(
        0, "optimizer steps between validations (0: at the end only); the last step always validates", minimum=0)
    val_samples: int = flag(
        200, "validation records whose first answer is scored by greedy exact match (0: loss only)", minimum=0)
    save_best: bool = flag(
        False, "also keep the checkpoint with the best validation accuracy (or loss) as ..._best.pth")
    # training
    optimizer: str = flag("adamw", choices=["adamw", "adam"], doc="the optimizer")
    weight_decay: float = flag(0.0, doc="the optimizer's weight decay")
    freeze_llm: int = flag(0, "0: train projection + LLM (v1); 1: projection only (3v pretrain); 2: projection + "
                              "last LLM block; 3: projection + first and last LLM blocks (3v SFT)",
                           choices=[0, 1, 2, 3])
    max_steps: Optional[int] = flag(
        None, "stop after this many optimizer steps in total (each is --accumulation_steps micro-batches)",
        minimum=1)
    seed: int = flag(1337, doc="the random seed (new weights, data order)")
    nan_policy: str = flag("stop", "a non-finite loss stops the run after saving (stop) or skips that step (skip)",
                           choices=["stop", "skip"])
    compile: bool = flag(False, "torch.compile the training step: one graph per stage, no graph break (dense); on "
                                "CPU it needs a working C++ compiler, else the run trains eager and says so")
    cpu_bf16: bool = flag(False, "bf16 autocast on CPU")
    generation: Optional[str] = flag(
        None, "v1 (CLIP, 50-token placeholder) or 3v (minimind-3v: SigLIP2 tower, 64 x <|image_pad|>, upstream's data "
              "format, labels, file names and stage defaults); default: the start checkpoint's, else v1",
        choices=["v1", "3v"])

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunConfig":
        """Resolve parsed flags (build_parser's); a value the run cannot use raises ConfigError."""
        names = {f.name for f in fields(cls)}
        if set(vars(args)) != names:  # a Namespace built by hand with other names: a bug
            raise TypeError(f"RunConfig and the flags disagree on {sorted(set(vars(args)) ^ names)}")
        check_minimums(cls, args, ConfigError)
        size = model_size(args)
        preset = is_default(args.preset)  # a size no flag gives: 3v takes it from the start checkpoint
        dim, n_layers = size["dim"], size["n_layers"]
        return cls(**{**vars(args), "dim": defaulted(dim) if preset and args.dim is None else dim,
                      "n_layers": defaulted(n_layers) if preset and args.n_layers is None else n_layers})

    def for_generation(self, stage: Stage, generation: str, start_size: Optional[dict[str, Any]] = None) -> "RunConfig":
        """This run as `generation` runs it: for 3v, each flag left at its default takes 3v's (V3_*_DEFAULTS; the
        size from the start checkpoint, `start_size`, when there is one); every value plain."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if generation == "3v":
            wanted = {**V3_SIZE_DEFAULTS, **(start_size or {}), **V3_COMMON_DEFAULTS, **V3_STAGE_DEFAULTS[stage.name]}
            values |= {k: v for k, v in wanted.items() if k in values and is_default(values[k])}
            values["use_moe"] = self.use_moe or bool((start_size or {}).get("use_moe"))
        return RunConfig(**{k: plain(v) for k, v in values.items()} | {"generation": generation})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# The flags that set the model's size, shared with the benchmarks (add_model_size_args) and read by model_size.
MODEL_SIZE_FLAGS = ("preset", "dim", "n_layers", "n_heads", "n_kv_heads", "use_moe", "max_seq_len")


def check_packages(config: RunConfig) -> None:
    """ConfigError, in one line, where the run needs a package the demo's install leaves out (wandb, pyarrow)."""
    parquet = any(p is not None and is_parquet(p) for p in (config.data_path, config.val_data))
    for needed, module, what in ((config.use_wandb, "wandb", "--use_wandb"), (parquet, "pyarrow", "parquet data")):
        problem = missing_packages([module], what) if needed else None
        if problem:
            raise ConfigError(problem)


def add_model_size_args(parser: argparse.ArgumentParser, default_preset: str = "minimind-v-small") -> None:
    """--preset picks a published size; --dim/--n_layers (and the head counts) override it."""
    add_flags(parser, RunConfig, None, names=MODEL_SIZE_FLAGS, defaults={"preset": default_preset})


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


def build_parser(stage: Stage) -> argparse.ArgumentParser:
    """Every training flag (RunConfig's fields) with the stage's defaults, in the order `--help` prints them."""
    p = argparse.ArgumentParser(description=f"MiniMind-V {stage.name} (run with torchrun for several GPUs)")
    add_flags(p, RunConfig, stage)
    p.set_defaults(**{name: defaulted(p.get_default(name)) for name in V3_DEFAULTED})  # see RunConfig.for_generation
    return p


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
        name = f"{stage.v3_name}_{checkpoint_stem(args)}" if args.generation == "3v" else \
            f"{checkpoint_stem(args)}_vlm_{stage.name}"  # 3v: upstream's names (sft_vlm_768.pth)
        base = os.path.join(args.out_dir, name)
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
