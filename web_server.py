"""MiniMind-V web chat (streamlit): upload an image, ask about it, and watch the answer stream in.

Under each answer an "Inside the model" panel (inference/web_inspect.py) shows where the answer looked in the image; it is
computed only once opened.

Run it from the repository root, either way:

    python web_server.py [--out_dir out] [--clip_path DIR] [--tokenizer_path DIR] [--device cpu|cuda] \\
        [--server.port 8501 ...]
    streamlit run web_server.py --server.address 127.0.0.1 -- [--out_dir out] \\
        [--clip_path model/clip_model/clip-vit-base-patch32] [--tokenizer_path DIR] [--device cpu|cuda]

`python web_server.py` starts `streamlit run web_server.py` itself: flags of the form `--section.option`
(streamlit's own, e.g. `--server.port`) go to streamlit, the rest to this script.

The checkpoint picker lists the .pth files in --out_dir and the MiniMind model directories (a published
`minimind-v-v1-small` clone, or an export) in --out_dir and the project root; model directories come first, then
`*_vlm_sft.pth`. The tokenizer is the checkpoint's own (model.checkpoint.checkpoint_tokenizer) unless
--tokenizer_path is given.

Binding: streamlit binds to `--server.address`. `.streamlit/config.toml` sets `address = "127.0.0.1"`, so a
plain `streamlit run web_server.py` (from the repository root) is reachable from this machine only; to expose it
on other addresses pass `--server.address 0.0.0.0` (there is no authentication: do that on trusted networks only).

Uploads: png, jpg, jpeg, webp, bmp and gif (first frame) up to MAX_UPLOAD_MB. The limit is passed to the uploader,
set as `server.maxUploadSize` in `.streamlit/config.toml`, and checked again here before an image is decoded.

Arguments after `--` belong to this script. Each default can also come from an environment variable
(MINIMIND_OUT_DIR, MINIMIND_CLIP_PATH, MINIMIND_TOKENIZER_PATH, MINIMIND_DEVICE); a flag given after `--` wins.
The variables are how tests configure the app: `streamlit.testing.v1.AppTest` runs the script in-process with
pytest's own sys.argv and has no way to pass script arguments.

If the default CLIP directory is missing but the untrained stand-in (scripts/build_stand_in_clip.py) exists, the
stand-in is used and the page says so in a warning. A missing checkpoint, CLIP or tokenizer is shown as an error
that says how to get it; the server keeps running. The model is loaded once per (checkpoint file and its
modification time, CLIP path, tokenizer path, device) and shared by all sessions.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402
from PIL import Image  # noqa: E402

from inference.chat import GenerationSettings, StreamStats, Turn, VLMChat  # noqa: E402
from model.checkpoint import find_model_dirs, weights_file  # noqa: E402
from model.vision import (DEFAULT_CLIP_PATH, STAND_IN_CLIP_PATH, ImageError, clip_or_stand_in, is_stand_in,  # noqa: E402
                          open_image)

MAX_UPLOAD_MB = 10  # keep in step with server.maxUploadSize in .streamlit/config.toml
IMAGE_TYPES = ("png", "jpg", "jpeg", "webp", "bmp", "gif")
# MIME types next to the extensions: the browser filters by both, and streamlit then leaves the server-side check
# to this script (its own extension check would fail the whole script run instead of showing a message).
UPLOAD_ACCEPT = [f"image/{t}" for t in ("png", "jpeg", "webp", "bmp", "gif")] + [f".{t}" for t in IMAGE_TYPES]
ENV_VARS = {"out_dir": "MINIMIND_OUT_DIR", "clip_path": "MINIMIND_CLIP_PATH",
            "tokenizer_path": "MINIMIND_TOKENIZER_PATH", "device": "MINIMIND_DEVICE"}
STAND_IN_EFFECT = ("its random features keep only simple things like colour and layout (enough for the easy-VQA "
                   "demo), so answers about real photos are not meaningful.")
NO_CHECKPOINT_HELP = ("download the published model (`python scripts/download.py --what model --dim 512`), train one "
                      "(`make demo` on the CPU, or 1-pretrain_vlm.py then 2-sft_vlm.py, which write "
                      "out/*_vlm_sft.pth) or copy a MiniMind-V v1 `*_vlm_sft.pth` there, then reload this page")


# ---------------------------------------------------------------------------------------------- plain logic


@dataclass(frozen=True)
class ServerArgs:
    out_dir: str
    clip_path: str
    tokenizer_path: Optional[str]  # None: the checkpoint's own
    device: str


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


def parse_args(argv: Sequence[str], env: Optional[dict[str, str]] = None) -> ServerArgs:
    """Script arguments (those after `--`); defaults come from the environment, then from the repository.

    Unknown arguments are ignored (under AppTest, argv is pytest's). Raises argparse.ArgumentError on a
    malformed flag instead of exiting.
    """
    env = dict(os.environ if env is None else env)
    defaults = {"out_dir": str(ROOT / "out"), "clip_path": str(ROOT / DEFAULT_CLIP_PATH),
                "tokenizer_path": None, "device": None}
    parser = argparse.ArgumentParser(prog="web_server.py", add_help=False, allow_abbrev=False,
                                     exit_on_error=False)
    for name, default in defaults.items():
        parser.add_argument(f"--{name}", default=env.get(ENV_VARS[name]) or default)
    ns, _unknown = parser.parse_known_args(list(argv))
    return ServerArgs(ns.out_dir, ns.clip_path, ns.tokenizer_path, ns.device or default_device())


def resolve_clip_path(clip_path: str) -> tuple[str, Optional[str]]:
    """The CLIP directory to load and a warning to show when it is the untrained stand-in."""
    path = clip_or_stand_in(clip_path, str(ROOT))
    if path != clip_path:
        return path, (f"The real CLIP encoder is missing ({DEFAULT_CLIP_PATH}), so the UNTRAINED stand-in at "
                      f"{STAND_IN_CLIP_PATH} is used: {STAND_IN_EFFECT} Get the real one with "
                      f"`python scripts/download.py --what clip`.")
    if is_stand_in(path):
        return path, (f"{clip_path} is the UNTRAINED stand-in CLIP: {STAND_IN_EFFECT} Get the real one "
                      f"with `python scripts/download.py --what clip`.")
    return path, None


def list_checkpoints(out_dir: str, model_dir_roots: Sequence[Path] = ()) -> list[CheckpointInfo]:
    """The .pth files directly in out_dir and the model directories in out_dir and `model_dir_roots`, with sizes;
    model directories first, then *_vlm_sft.pth, then by name."""
    folder = Path(out_dir)
    found = []
    if folder.is_dir():
        found = [CheckpointInfo(str(p), p.name, p.stat().st_size / 2**20)
                 for p in folder.iterdir() if p.suffix == ".pth" and p.is_file() and not p.name.startswith(".")]
    dirs = {d.resolve(): d for root in (folder, *model_dir_roots) for d in find_model_dirs(root)}
    found += [CheckpointInfo(str(d), f"{d.name}/", weights_file(d).stat().st_size / 2**20) for d in dirs.values()]
    return sorted(found, key=lambda c: (not c.name.endswith("/"), not c.name.endswith("_vlm_sft.pth"), c.name))


def checkpoint_stamp(path: str) -> tuple[int, int]:
    """(modification time, size) of a checkpoint's weights: a retrained file with the same name is reloaded."""
    path = str(weights_file(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (it was moved or deleted); {NO_CHECKPOINT_HELP}")
    st_ = os.stat(path)
    return st_.st_mtime_ns, st_.st_size


def validate_upload(name: str, data: bytes, max_mb: int = MAX_UPLOAD_MB) -> Image.Image:
    """Decode an uploaded image as RGB, or raise ImageError with a one-line reason naming the file."""
    if len(data) > max_mb * 2**20:
        raise ImageError(f"{name}: {len(data) / 2**20:.1f} MB is over the {max_mb} MB upload limit")
    ext = Path(name).suffix.lower().lstrip(".")
    if ext not in IMAGE_TYPES:
        raise ImageError(f"{name}: not an accepted image type (use {', '.join(IMAGE_TYPES)})")
    return open_image(data, name=name)


def image_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def format_params(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def error_text(e: BaseException) -> str:
    """One line for the page: the message of the project's own errors, the type name for anything else."""
    known = (FileNotFoundError, ValueError, ImageError)
    return str(e) if isinstance(e, known) and str(e) else f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------- streamlit


@st.cache_resource(show_spinner="Loading the model...", max_entries=2)
def load_chat(ckpt: str, clip_path: str, tokenizer_path: Optional[str], device: str,
              stamp: tuple[int, int]) -> VLMChat:
    """Loaded once per key and shared by every session; `stamp` reloads a checkpoint rewritten in place."""
    return VLMChat.load(ckpt, clip_path, tokenizer_path, device)


def init_state() -> None:
    st.session_state.setdefault("history", [])  # list[Turn] about the current images
    st.session_state.setdefault("turn_ids", {})  # turn_key -> (prompt ids, answer ids), for the inspection panel
    st.session_state.setdefault("inspections", {})  # turn_key -> AttentionMaps, computed when a panel is opened
    st.session_state.setdefault("images", [])  # the current valid images (PIL, RGB), in upload order
    st.session_state.setdefault("image_ids", ())
    st.session_state.setdefault("image_names", [])


def clear_chat() -> None:
    st.session_state.update(history=[], turn_ids={}, inspections={})


def sidebar_checkpoint(out_dir: str) -> tuple[Optional[str], Optional[str]]:
    """(chosen checkpoint path, error to show)."""
    checkpoints = list_checkpoints(out_dir, (ROOT,))
    if not checkpoints:
        st.sidebar.selectbox("Checkpoint", ["(none found)"], disabled=True, key="checkpoint_none")
        return None, f"No checkpoint (*.pth or model directory) in '{out_dir}' or '{ROOT}': {NO_CHECKPOINT_HELP}."
    by_label = {c.label: c.path for c in checkpoints}
    label = st.sidebar.selectbox("Checkpoint", list(by_label), key="checkpoint",
                                 help=f"The .pth files in {out_dir} and the model directories there and in the "
                                      f"project root; the model's shape is read off the weights")
    return by_label[label], None


def sidebar_settings() -> GenerationSettings:
    sb = st.sidebar
    temperature = sb.slider("Temperature", 0.0, 1.5, 0.5, 0.05, key="temperature", help="0 = greedy")
    top_k = sb.slider("Top-k", 1, 50, 8, key="top_k")
    top_p = sb.slider("Top-p", 0.1, 1.0, 1.0, 0.05, key="top_p", help="1.0 = off")
    max_new_tokens = sb.slider("Max new tokens", 16, 1024, 256, 16, key="max_new_tokens")
    return GenerationSettings(temperature=temperature, top_k=top_k, top_p=None if top_p >= 1.0 else top_p,
                              max_new_tokens=max_new_tokens)


def try_load(ckpt: Optional[str], clip_path: str, tokenizer_path: Optional[str], device: str) -> tuple[Optional[VLMChat],
                                                                                              Optional[str]]:
    if ckpt is None:
        return None, None
    try:
        return load_chat(ckpt, clip_path, tokenizer_path, device, checkpoint_stamp(ckpt)), None
    except Exception as e:  # a bad file or path must not take the server down
        return None, f"Could not load the model: {error_text(e)}"


def set_images(images: list[Image.Image], uids: tuple[str, ...], names: list[str]) -> None:
    st.session_state.update(images=images, image_ids=uids, image_names=names, history=[], turn_ids={},
                            inspections={})


def uploader() -> list[Any]:
    """The uploaded files, in order (several images are asked about together). The browser filters by
    UPLOAD_ACCEPT; validate_upload checks type and size."""
    return st.file_uploader(f"Images ({', '.join(IMAGE_TYPES)}; GIF: first frame; up to {MAX_UPLOAD_MB} MB each; "
                            f"several are asked about together, in order)", type=UPLOAD_ACCEPT,
                            max_upload_size=MAX_UPLOAD_MB, key="uploader", accept_multiple_files=True) or []


def keep_note() -> str:
    names = st.session_state["image_names"]
    if names:
        return f"Still using the previous image{'s' if len(names) > 1 else ''} ({', '.join(names)}) and its " \
               f"conversation."
    return "Upload an image to ask about it."


def handle_upload(uploads: Sequence[Any]) -> None:
    """Make a new set of valid uploads the current images (a new conversation); if any upload is invalid,
    report it and keep the previous images and conversation."""
    state = st.session_state
    data = [upload.getvalue() for upload in uploads]
    uids = tuple(image_id(d) for d in data)
    if uids == tuple(state["image_ids"]):
        return
    if not uploads:
        had_history = bool(state["history"])
        set_images([], (), [])
        if had_history:
            st.info("The images were removed: started a new conversation.")
        return
    try:
        images = [validate_upload(upload.name, d) for upload, d in zip(uploads, data)]
    except ImageError as e:
        st.error(f"{e}. {keep_note()}")
        return
    had_history = bool(state["history"])
    names = [upload.name for upload in uploads]
    set_images(images, uids, names)
    if had_history:
        st.info(f"New image{'s' if len(names) > 1 else ''} ({', '.join(names)}): started a new conversation.")


def show_history(history: Sequence[Turn], chat: Optional[VLMChat] = None) -> None:
    for i, (question, answer) in enumerate(history):
        with st.chat_message("user"):
            st.markdown(question)
        with st.chat_message("assistant"):
            st.markdown(answer or "_(empty answer)_")
            inside_the_model(chat, i, question, answer)


def turn_key(index: int, question: str, answer: str) -> str:
    """Names one answered turn of the current image's conversation (widget keys, cached inspections)."""
    text = f"{','.join(st.session_state['image_ids'])}|{index}|{question}|{answer}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def inside_the_model(chat: Optional[VLMChat], index: int, question: str, answer: str) -> None:
    """The "inside the model" panel under an answer. Nothing is computed while it is closed (the expander
    reruns the page when toggled); once opened, the attention is computed once per answer and kept."""
    key = turn_key(index, question, answer)
    ids = st.session_state["turn_ids"].get(key)
    images = st.session_state["images"]
    if chat is None or ids is None or len(images) != 1:
        return  # no model, an answer from before this page load, or not one image to look at
    image = images[0]
    panel = st.expander("Inside the model: where this answer looks in the image", key=f"inside_{key}",
                        on_change="rerun")
    with panel:
        if not panel.open:
            return
        from inference.web_inspect import show_inspection

        show_inspection(chat, image, key, *ids)


def ask(chat: Optional[VLMChat], prompt: str, settings: GenerationSettings) -> None:
    """Stream the answer to one question; on success the turn joins the history."""
    question = prompt.strip()
    if not question:
        st.error("The question is empty: type a question about the image.")
        return
    if chat is None:
        st.error("No model is loaded (see the error above), so the question was not sent.")
        return
    state = st.session_state
    with st.chat_message("user"):
        st.markdown(question)
    stats = StreamStats()
    with st.chat_message("assistant"):
        try:
            pieces = st.write_stream(chat.stream(question, state["images"], list(state["history"]), settings,
                                                 stats))
        except Exception as e:  # generation errors are shown, the conversation so far stays
            st.error(f"Generation failed: {error_text(e)}")
            return
        answer = (pieces if isinstance(pieces, str) else "".join(map(str, pieces))).strip()
        if not answer:
            st.markdown("_(empty answer)_")
        index = len(state["history"])
        state["turn_ids"][turn_key(index, question, answer)] = (stats.prompt_ids, list(stats.completion_ids))
        inside_the_model(chat, index, question, answer)
    state["history"] = [*state["history"], (question, answer)]


def main() -> None:
    st.set_page_config(page_title="MiniMind-V", page_icon=":frame_with_picture:", layout="centered")
    init_state()
    try:
        args = parse_args(sys.argv[1:])
    except argparse.ArgumentError as e:
        st.error(f"Bad command-line argument: {e}. Usage: streamlit run web_server.py -- [--out_dir DIR] "
                 f"[--clip_path DIR] [--tokenizer_path DIR] [--device cpu|cuda]")
        st.stop()
    clip_path, clip_warning = resolve_clip_path(args.clip_path)

    st.sidebar.header("Model")
    ckpt, ckpt_error = sidebar_checkpoint(args.out_dir)
    caption = st.sidebar.empty()  # filled once the model (and so its tokenizer) is known
    st.sidebar.header("Generation")
    settings = sidebar_settings()
    st.sidebar.button("Clear chat", on_click=clear_chat, key="clear_chat", width="stretch")

    chat, load_error = try_load(ckpt, clip_path, args.tokenizer_path, args.device)
    tokenizer = chat.tokenizer_path if chat else (args.tokenizer_path or "the checkpoint's own")
    caption.caption(f"CLIP: `{clip_path}`  \nTokenizer: `{tokenizer}`  \nDevice: `{args.device}`")
    st.title(f"MiniMind-V ({format_params(chat.n_params)})" if chat else "MiniMind-V (no model loaded)")
    if clip_warning:
        st.warning(clip_warning)
    for message in (ckpt_error, load_error):
        if message:
            st.error(message)

    handle_upload(uploader())
    if st.session_state["images"]:
        st.image(st.session_state["images"], caption=st.session_state["image_names"],
                 width=320 if len(st.session_state["images"]) == 1 else 200)
    else:
        st.caption("No image yet: questions are answered from the text alone.")

    show_history(st.session_state["history"], chat)
    prompt = st.chat_input("Ask about the image", key="question")
    if prompt is not None:
        ask(chat, prompt, settings)


def split_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(streamlit's flags, this script's flags): `--section.option [value]` belongs to streamlit."""
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


def launch_streamlit(argv: Sequence[str]) -> None:
    """`python web_server.py ...` becomes `streamlit run web_server.py [streamlit flags] -- [app flags]`, run from
    the repository root (where .streamlit/config.toml is). The process is replaced, so signals reach streamlit."""
    streamlit_flags, app_flags = split_flags(argv)
    command = [sys.executable, "-m", "streamlit", "run", str(Path(__file__).resolve()), *streamlit_flags,
               "--", *app_flags]
    os.chdir(ROOT)
    os.execv(sys.executable, command)


def running_in_streamlit() -> bool:
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    return get_script_run_ctx(suppress_warning=True) is not None


if __name__ == "__main__":  # `streamlit run` and AppTest run this file as __main__; tests import it too
    if running_in_streamlit():
        main()
    else:  # `python web_server.py`, as in v1
        launch_streamlit(sys.argv[1:])
