"""The web demo's plain logic (web_server.py is the streamlit page): its arguments, the checkpoint picker's list,
upload checks and the image copies the page displays. Nothing here imports streamlit, so it is tested directly."""
from __future__ import annotations

import argparse
import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from PIL import Image

from inference.cpu.prepare import ACCEPTED as CPU_KERNEL_CHOICES
from inference.cpu.prepare import QUANTIZE_CHOICES, add_cpu_inference_args, kernel_name
from model.vision import DEFAULT_CLIP_PATH, STAND_IN_CLIP_PATH, V3_TOWER_PATH
from data_pipeline.image_decode import ImageError, open_image
from checkpoints.checkpoint import read_checkpoint
from checkpoints.vision_pairing import clip_or_stand_in, is_stand_in
from checkpoints.vision_pairing import add_encoder_mismatch_arg

from .app_images import open_app_image
from .model_files import find_model_dirs, is_sft_checkpoint, weights_file

MAX_UPLOAD_MB = 10  # keep in step with server.maxUploadSize in .streamlit/config.toml
IMAGE_TYPES = ("png", "jpg", "jpeg", "webp", "bmp", "gif")
# MIME types next to the extensions: the browser filters by both, and streamlit then leaves the server-side check
# to the page (its own extension check would fail the whole script run instead of showing a message).
UPLOAD_ACCEPT = [f"image/{t}" for t in ("png", "jpeg", "webp", "bmp", "gif")] + [f".{t}" for t in IMAGE_TYPES]
ENV_VARS = {"out_dir": "MINIMIND_OUT_DIR", "clip_path": "MINIMIND_CLIP_PATH",
            "tokenizer_path": "MINIMIND_TOKENIZER_PATH", "device": "MINIMIND_DEVICE",
            "quantize": "MINIMIND_QUANTIZE", "cpu_kernel": "MINIMIND_CPU_KERNEL"}
STAND_IN_EFFECT = ("its random features keep only simple things like colour and layout (enough for the easy-VQA "
                   "demo), so answers about real photos are not meaningful.")
# minimind-3v's untrained stand-in tower (scripts/build_stand_in_siglip.py), used for a 3v checkpoint when
# --clip_path is left at v1's CLIP default and its SigLIP2 tower (V3_TOWER_PATH) is missing.
V3_STAND_IN_PATH = "model/clip_model/stand_in_siglip2_base_p32_256"
V3_STAND_IN_EFFECT = "its random features carry nothing of the image, so the answers are not about it."
NO_CHECKPOINT_HELP = ("download the published model (`python scripts/download.py --what model --dim 512`), train one "
                      "(`make demo` on the CPU, or 1-pretrain_vlm.py then 2-sft_vlm.py, which write "
                      "out/*_vlm_sft.pth) or copy a MiniMind-V v1 `*_vlm_sft.pth` there, then reload this page")


@dataclass(frozen=True)
class ServerArgs:
    out_dir: str
    clip_path: str
    tokenizer_path: Optional[str]  # None: the checkpoint's own
    device: str
    quantize: str = "none"  # inference.cpu.prepare: --quantize (the page's int8 toggle starts from it)
    cpu_kernel: str = "auto"  # --cpu_kernel (the toggle's int8 takes its place while on)
    allow_encoder_mismatch: bool = False  # --allow_encoder_mismatch (checkpoints.vision_pairing)


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    name: str
    size_mb: float

    @property
    def label(self) -> str:
        return f"{self.name} ({self.size_mb:.1f} MB)"


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser(env: dict[str, str], root: Path, exit_on_error: bool = False) -> argparse.ArgumentParser:
    """The page's flags, their defaults taken from the environment (ENV_VARS), then from the repository `root`."""
    defaults = {"out_dir": str(root / "out"), "clip_path": str(root / DEFAULT_CLIP_PATH),
                "tokenizer_path": None, "device": None}
    parser = argparse.ArgumentParser(prog="web_server.py", add_help=False, allow_abbrev=False,
                                     exit_on_error=exit_on_error)
    for name, default in defaults.items():
        parser.add_argument(f"--{name}", default=env.get(ENV_VARS[name]) or default)
    add_cpu_inference_args(parser)
    add_encoder_mismatch_arg(parser)
    parser.set_defaults(**{name: env[ENV_VARS[name]] for name in ("quantize", "cpu_kernel") if env.get(ENV_VARS[name])})
    return parser


def parse_args(argv: Sequence[str], root: Path, env: Optional[dict[str, str]] = None) -> ServerArgs:
    """Script arguments (those after `--`); defaults come from the environment, then from the repository `root`.

    Unknown arguments are ignored (under AppTest, argv is pytest's). Raises argparse.ArgumentError on a
    malformed flag, or a bad MINIMIND_QUANTIZE / MINIMIND_CPU_KERNEL, instead of exiting.
    """
    env = dict(os.environ if env is None else env)
    ns, _unknown = build_parser(env, root).parse_known_args(list(argv))
    ns.cpu_kernel = kernel_name(ns.cpu_kernel)  # an older name from the environment, as the flag takes it
    for name, choices in (("quantize", QUANTIZE_CHOICES), ("cpu_kernel", CPU_KERNEL_CHOICES)):
        if getattr(ns, name) not in choices:  # argparse checks the choices of given flags, not of defaults
            raise argparse.ArgumentError(None, f"{ENV_VARS[name]}={getattr(ns, name)!r} is not one of "
                                               f"{', '.join(choices)}")
    return ServerArgs(ns.out_dir, ns.clip_path, ns.tokenizer_path, ns.device or default_device(), ns.quantize,
                      ns.cpu_kernel, ns.allow_encoder_mismatch)


def kernel_to_load(args: ServerArgs, int8: bool) -> tuple[str, str]:
    """(quantize, cpu_kernel) to load the model with when the page's int8 toggle is `int8`: on, int8 takes the
    place of --cpu_kernel whatever it is (compiled, bf16, ...); off, --cpu_kernel runs on fp32 weights."""
    if int8:
        return "none", "int8"
    return "none", "auto" if args.cpu_kernel == "int8" else args.cpu_kernel


def check_launch_flags(argv: Sequence[str], root: Path) -> None:
    """`python web_server.py`'s own flags checked before streamlit starts: an unknown flag or a bad value is
    argparse's one-line error (exit status 2), not a page that ignores it."""
    parser = build_parser(dict(os.environ), root, exit_on_error=True)
    parser.parse_args(list(argv))
    try:
        parse_args(argv, root)
    except argparse.ArgumentError as e:  # a bad MINIMIND_QUANTIZE / MINIMIND_CPU_KERNEL
        parser.error(str(e))


def resolve_clip_path(clip_path: str, root: Path) -> tuple[str, Optional[str]]:
    """The CLIP directory to load and a warning to show when it is the untrained stand-in."""
    path = clip_or_stand_in(clip_path, str(root))
    if path != clip_path:
        return path, (f"The real CLIP encoder is missing ({DEFAULT_CLIP_PATH}), so the UNTRAINED stand-in at "
                      f"{STAND_IN_CLIP_PATH} is used: {STAND_IN_EFFECT} Get the real one with "
                      f"`python scripts/download.py --what clip`.")
    if is_stand_in(path):
        return path, (f"{clip_path} is the UNTRAINED stand-in CLIP: {STAND_IN_EFFECT} Get the real one "
                      f"with `python scripts/download.py --what clip`.")
    return path, None


def checkpoint_generation(path: str) -> str:
    """"v1" or "3v", as the checkpoint itself says (its key names, sidecar or config.json), read once per version
    of its weights. A checkpoint that cannot be read counts as v1 here: loading it then reports what is wrong."""
    try:
        return _generation(path, checkpoint_stamp(path))
    except (OSError, ValueError):
        return "v1"


@functools.lru_cache(maxsize=8)
def _generation(path: str, stamp: tuple[int, int]) -> str:
    return str(read_checkpoint(path).stored.get("generation", "v1"))


def resolve_tower_path(clip_path: str, generation: str, root: Path) -> tuple[str, Optional[str]]:
    """The vision tower to load for a checkpoint of `generation`, and a warning for the page.

    v1: resolve_clip_path. 3v, with --clip_path left at v1's CLIP default: the SigLIP2 tower at V3_TOWER_PATH, else
    its untrained stand-in (said loudly), else a warning saying how to get it. A --clip_path given explicitly is
    used as it is (a CLIP tower for a 3v checkpoint is then refused at load, in one line)."""
    if generation != "3v":
        return resolve_clip_path(clip_path, root)
    if os.path.abspath(clip_path) != os.path.abspath(root / DEFAULT_CLIP_PATH):
        stand_in_note = f"{clip_path} is an UNTRAINED stand-in tower: {V3_STAND_IN_EFFECT}"
        return clip_path, stand_in_note if is_stand_in(clip_path) else None
    real, stand_in = root / V3_TOWER_PATH, root / V3_STAND_IN_PATH
    if real.is_dir():
        return str(real), None
    get_it = f"`python scripts/download.py --generation 3v --what clip` puts it at {V3_TOWER_PATH}"
    if stand_in.is_dir():
        return str(stand_in), (f"This minimind-3v checkpoint's SigLIP2 tower is missing ({V3_TOWER_PATH}), so the "
                               f"UNTRAINED stand-in at {V3_STAND_IN_PATH} is used: {V3_STAND_IN_EFFECT} {get_it}.")
    return str(real), (f"This minimind-3v checkpoint needs the SigLIP2 vision tower, missing at {V3_TOWER_PATH}: "
                       f"{get_it} (or pass --clip_path DIR).")


def list_checkpoints(out_dir: str, model_dir_roots: Sequence[Path] = ()) -> list[CheckpointInfo]:
    """The .pth files directly in out_dir and the model directories in out_dir and `model_dir_roots`, with sizes;
    model directories first, then SFT checkpoints (is_sft_checkpoint), then by name."""
    folder = Path(out_dir)
    found = []
    if folder.is_dir():
        found = [CheckpointInfo(str(p), p.name, p.stat().st_size / 2**20)
                 for p in folder.iterdir() if p.suffix == ".pth" and p.is_file() and not p.name.startswith(".")]
    dirs = {d.resolve(): d for root in (folder, *model_dir_roots) for d in find_model_dirs(root)}
    found += [CheckpointInfo(str(d), f"{d.name}/", weights_file(d).stat().st_size / 2**20) for d in dirs.values()]
    return sorted(found, key=lambda c: (not c.name.endswith("/"), not is_sft_checkpoint(c.name), c.name))


def checkpoint_stamp(path: str) -> tuple[int, int]:
    """(modification time, size) of a checkpoint's weights: a retrained file with the same name is reloaded."""
    path = str(weights_file(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (it was moved or deleted); {NO_CHECKPOINT_HELP}")
    stat = os.stat(path)
    return stat.st_mtime_ns, stat.st_size


def validate_upload(name: str, data: bytes, max_mb: int = MAX_UPLOAD_MB, generation: str = "v1") -> Image.Image:
    """Decode an uploaded image as RGB, or raise ImageError with a one-line reason naming the file. Transparency
    as the model's generation takes it (inference.app_images: v1 over white, 3v alpha dropped as upstream)."""
    if len(data) > max_mb * 2**20:
        raise ImageError(f"{name}: {len(data) / 2**20:.1f} MB is over the {max_mb} MB upload limit")
    ext = Path(name).suffix.lower().lstrip(".")
    if ext not in IMAGE_TYPES:
        raise ImageError(f"{name}: not an accepted image type (use {', '.join(IMAGE_TYPES)})")
    return open_app_image(data, name, generation) if generation == "3v" else open_image(data, name=name)


def display_copy(image: Image.Image, width: int) -> Image.Image:
    """The image as the page shows it, `width` pixels wide at most. Streamlit scales a wider image down itself,
    rounding the height down: a 700x1 image at 320 wide became 320x0, and PIL refused it on every rerun. Here
    the height keeps at least one pixel, and streamlit finds nothing left to scale."""
    w, h = image.size
    if w <= width:
        return image
    return image.resize((width, max(1, round(h * width / w))), Image.BILINEAR)


def image_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def format_params(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def error_text(e: BaseException) -> str:
    """One line for the page: the message of the project's own errors, the type name for anything else."""
    known = (FileNotFoundError, ValueError, ImageError)
    return str(e) if isinstance(e, known) and str(e) else f"{type(e).__name__}: {e}"


def split_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(streamlit's flags, the page's flags): `--section.option [value]` belongs to streamlit."""
    streamlit_flags, app_flags, rest = [], [], list(argv)
    while rest:
        arg = rest.pop(0)
        if arg.startswith("--") and "." in arg.split("=")[0]:
            streamlit_flags.append(arg)
            if "=" not in arg and rest and not rest[0].startswith("--"):
                streamlit_flags.append(rest.pop(0))
        else:
            app_flags.append(arg)
    return streamlit_flags, app_flags
