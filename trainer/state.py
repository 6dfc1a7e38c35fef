"""Everything an exact resume needs, saved and loaded in one place.

`step` counts optimizer updates (nanoGPT's iter_num, the Hugging Face Trainer's global_step); `batches_in_epoch`
counts the micro-batches of the current epoch already trained, which is where the sampler restarts. A resume
file is only written at an optimizer-step boundary, so the two always agree.

A position only means something in the order it was counted in, so the resume file also records what shapes that
order (`order_record`): the batch size, the world size, the seed, the micro-batches per step, length grouping and
a fingerprint of the training rows (which the data file, --max_seq_len, --pack_same_image, --multi_turn and
--skip_text_only decide). A resume that changes any of them is refused (`ResumeError`), naming what changed.

Every field of a resume file is checked against `RESUME_RULE` (types, sizes, required keys; checkpoints.schema)
before anything is restored: a damaged file is one line naming the file and the field.
"""
from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from checkpoints.checkpoint import load_object, load_weights, save_checkpoint, save_object, unwrap
from checkpoints.files import CheckpointError
from checkpoints.schema import Rule, brief, check, obj, path_and_fingerprint
from checkpoints.tokenizer_pairing import check_resume_tokenizer
from checkpoints.vision_pairing import check_vision_encoder

from .distributed import Distributed

log = logging.getLogger("minimind")


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


INDEX = Rule((int,), low=0)
# One process's random generators (rng_state): Mersenne Twister states of 625 (Python's, its position included)
# and 624 (NumPy's) words; python_pos is in fact Python's gauss_next (a float or None).
RNG_RULE = obj({"torch": Rule((torch.Tensor,)), "python": Rule((list,), min_len=625, max_len=625, each=INDEX),
                "python_pos": Rule((float, type(None))), "numpy": Rule((list,), min_len=624, max_len=624, each=INDEX),
                "numpy_pos": INDEX, "cuda": Rule((list,), each=Rule((torch.Tensor,)))}, optional=("cuda",))
# What TrainState.save writes: every field read back is checked before any is used.
RESUME_RULE = obj({
    "model": Rule((dict,), each=Rule((torch.Tensor,))),
    "optimizer": obj({"state": Rule((dict,)), "param_groups": Rule((list,), each=Rule((dict,)))}),
    "scaler": Rule((dict,)), "step": INDEX, "epoch": INDEX, "batches_in_epoch": INDEX, "nan_skips": INDEX,
    "best": Rule((float, type(None))), "rng": Rule((dict, list), max_len=65_536),
    "tokenizer": path_and_fingerprint(), "vision_encoder": path_and_fingerprint(),
    "order": Rule((dict, type(None)), max_len=64, each=Rule((int, float, str, bool, type(None)), max_len=256)),
}, optional=("nan_skips", "best", "tokenizer", "vision_encoder", "order"))


def read_resume_file(path: str, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the resume file's fields, this rank's RNG states), each checked against RESUME_RULE / RNG_RULE; anything
    else is one CheckpointError line naming the file and the field."""
    state = load_object(path)
    check(state, RESUME_RULE, path, root="the resume file")
    rngs = state["rng"]
    if isinstance(rngs, list):
        if rank >= len(rngs):
            raise CheckpointError(f"{path}: rng holds {len(rngs)} process states, but this process has rank {rank}; "
                                  f"resume with the world size the file was saved with")
        check(rngs[rank], RNG_RULE, path, name=f"rng[{rank}]")
        return state, rngs[rank]
    check(rngs, RNG_RULE, path, name="rng")
    return state, rngs


def restore(target: Any, saved: dict[str, Any], name: str, path: str) -> None:
    """`target.load_state_dict(saved)` (the optimizer, the scaler), or one line naming the file and the field."""
    try:
        target.load_state_dict(saved)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{path}: {name} does not fit this run's model ({type(e).__name__}: "
                              f"{brief(str(e), 120)})") from None


class ResumeError(ValueError):
    """A resume file that cannot be continued under this run's flags (the message says which and how)."""


# The flags that decide which rows form which batch, in which order, and how many batches make a step. The last
# four act through the rows (and the fingerprint would catch them) but are recorded so that a refusal names the
# flag. The data file is checked by its rows, not its path, so a data set copied elsewhere still resumes.
# --pad_to_max is not here: padding changes no order and no position.
ORDER_FLAGS = ("batch_size", "accumulation_steps", "seed", "group_by_length", "pack_same_image", "max_seq_len",
               "multi_turn", "skip_text_only")


def rows_fingerprint(row_lengths: Sequence[int]) -> str:
    """The samplers' whole view of the data: how many rows and each one's length (the order depends on no more)."""
    digest = hashlib.sha256(",".join(map(str, row_lengths)).encode()).hexdigest()[:12]
    return f"{len(row_lengths)} rows, lengths {digest}"


def order_record(flags: Any, world_size: int, row_lengths: Sequence[int]) -> dict[str, Any]:
    """What fixes the training order and the meaning of a saved position (see the module docstring)."""
    return {**{name: getattr(flags, name) for name in ORDER_FLAGS}, "world_size": world_size,
            "training_rows": rows_fingerprint(row_lengths)}


def check_order(saved: Optional[dict[str, Any]], current: dict[str, Any], resume_path: str) -> None:
    """Refuse to continue a resume file in another order than it was saved in; warn when the file (written
    before orders were recorded) cannot be checked."""
    if saved is None:
        log.warning("%s records no batching flags (written by an older version): the training order could not be "
                    "checked; resume with the flags the run started with", resume_path)
        return
    for name, now in current.items():
        then = saved.get(name)
        if then == now:
            continue
        what = {"world_size": "world size (processes)", "training_rows": "training rows (from --data_path)"}.get(
            name, f"--{name}")
        raise ResumeError(f"--resume: {resume_path} was saved with {what} {brief(then, 60)}, but this run has "
                          f"{brief(now, 60)}; a resumed run must keep its order: resume with the saved value, or "
                          f"start a new run without --resume")


@dataclass
class TrainState:
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int = 0  # optimizer updates done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of this epoch already trained
    nan_skips: int = 0  # optimizer steps skipped under --nan_policy skip
    tokenizer: Optional[dict[str, str]] = None  # the record of the tokenizer trained with ({"path", "fingerprint"})
    vision_encoder: Optional[dict[str, str]] = None  # ... and of the vision encoder (checkpoints.vision_pairing)
    best: Optional[float] = None  # the best validation score so far (--save_best)
    order: Optional[dict[str, Any]] = None  # order_record of this run; a resume file must match it
    weights_dtype: Optional[torch.dtype] = None  # the weight file's dtype (3v: float16, as upstream); None: kept

    def save(self, model: torch.nn.Module, weights_path: str, resume_path: str, dist: Distributed) -> None:
        """Write the v1-layout weights and the resume state (rank 0), with every rank's RNG states."""
        rngs = dist.gather_objects(rng_state())
        if dist.is_main:
            save_checkpoint(model, weights_path, tokenizer=self.tokenizer, vision_encoder=self.vision_encoder,
                            dtype=self.weights_dtype)
            save_object({"model": unwrap(model).state_dict(), "optimizer": self.optimizer.state_dict(),
                         "scaler": self.scaler.state_dict(), "step": self.step, "epoch": self.epoch,
                         "batches_in_epoch": self.batches_in_epoch, "nan_skips": self.nan_skips, "best": self.best,
                         "rng": rngs, "tokenizer": self.tokenizer, "vision_encoder": self.vision_encoder,
                         "order": self.order},
                        resume_path)
        dist.barrier()

    def load(self, model: torch.nn.Module, resume_path: str, rank: int, allow_encoder_mismatch: bool = False) -> None:
        """Restore the weights, optimizer, scaler, position and this rank's RNG states from a resume file."""
        state, rng = read_resume_file(str(resume_path), rank)
        if self.tokenizer is not None:  # before anything is restored: a resume must keep its vocabulary
            check_resume_tokenizer(state.get("tokenizer"), self.tokenizer, resume_path)
        if self.vision_encoder is not None:  # ... and its vision encoder
            check_vision_encoder(state.get("vision_encoder"), self.vision_encoder, resume_path, allow_encoder_mismatch)
        if self.order is not None:  # ... and its order (a position counts batches of that order)
            check_order(state.get("order"), self.order, str(resume_path))
        load_weights(model, state["model"], source=resume_path)
        restore(self.optimizer, state["optimizer"], "optimizer", resume_path)
        restore(self.scaler, state["scaler"], "scaler", resume_path)
        self.step, self.epoch = state["step"], state["epoch"]
        self.batches_in_epoch, self.nan_skips = state["batches_in_epoch"], state.get("nan_skips", 0)
        self.best = state.get("best")
        try:
            set_rng_state(rng)
        except (ValueError, TypeError, RuntimeError, OverflowError) as e:
            raise CheckpointError(f"{resume_path}: rng cannot be restored ({type(e).__name__}: "
                                  f"{brief(str(e), 120)})") from None
        log.info("resumed from %s at epoch %d, batch %d of the epoch (step %d)", resume_path, self.epoch,
                 self.batches_in_epoch, self.step)
