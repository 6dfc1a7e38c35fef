"""MiniMind-V web chat (streamlit): upload an image, ask about it, and watch the answer stream in.

Under each answer an "Inside the model" panel (inference/web_inspect.py) shows where the answer looked in the image; it is
computed only once opened.

Run it from the repository root, either way:

    python web_server.py [--out_dir out] [--clip_path DIR] [--tokenizer_path DIR] [--device cpu|cuda] \\
        [--quantize none|int8] [--cpu_kernel auto|...] [--allow_encoder_mismatch] [--server.port 8501 ...]
    streamlit run web_server.py --server.address 127.0.0.1 -- [--out_dir out] \\
        [--clip_path model/clip_model/clip-vit-base-patch32] [--tokenizer_path DIR] [--device cpu|cuda]

`python web_server.py` starts `streamlit run web_server.py` itself: flags of the form `--section.option`
(streamlit's own, e.g. `--server.port`) go to streamlit, the rest to this script (checked first: an unknown flag
or a bad value is argparse's one-line error).

CPU inference (inference.cpu.prepare, docs/cpu_inference.md): --cpu_kernel auto (default), default, compiled, bf16
or int8 (--quantize int8 is the same). The sidebar's "int8 weights (CPU)" toggle starts from --quantize and reloads
the model in int8 (on: int8 takes the place of any --cpu_kernel) or on --cpu_kernel (off); on a GPU it is disabled
(int8 here is CPU only). The sidebar caption shows the line saying which kernel runs.

The checkpoint picker lists the .pth files in --out_dir and the MiniMind model directories (a published
`minimind-v-v1-small` clone, or an export) in --out_dir and the project root; model directories come first, then
`*_vlm_sft.pth`. The tokenizer is the checkpoint's own (checkpoints.tokenizer_pairing.checkpoint_tokenizer) unless
--tokenizer_path is given.

Binding: streamlit binds to `--server.address`. `.streamlit/config.toml` sets `address = "127.0.0.1"`, so a
plain `streamlit run web_server.py` (from the repository root) is reachable from this machine only; to expose it
on other addresses pass `--server.address 0.0.0.0` (there is no authentication: do that on trusted networks only).

Uploads: png, jpg, jpeg, webp, bmp and gif (first frame) up to MAX_UPLOAD_MB. The limit is passed to the uploader,
set as `server.maxUploadSize` in `.streamlit/config.toml`, and checked again here before an image is decoded.
The images asked about together are capped by the rule the API applies too (inference.chat.VLMChat.max_images:
8, or fewer when the model's context cannot hold their 50-token spans); more are refused before decoding.
The page's plain logic (arguments, checkpoint list, upload checks) lives in inference/web_support.py.

Arguments after `--` belong to this script. Each default can also come from an environment variable
(MINIMIND_OUT_DIR, MINIMIND_CLIP_PATH, MINIMIND_TOKENIZER_PATH, MINIMIND_DEVICE, MINIMIND_QUANTIZE,
MINIMIND_CPU_KERNEL); a flag given after `--` wins.
The variables are how tests configure the app: `streamlit.testing.v1.AppTest` runs the script in-process with
pytest's own sys.argv and has no way to pass script arguments.

If the default CLIP directory is missing but the untrained stand-in (scripts/build_stand_in_clip.py) exists, the
stand-in is used and the page says so in a warning. The tower family follows the chosen checkpoint: a minimind-3v
checkpoint, with --clip_path left at the CLIP default, gets the SigLIP2 tower at model/siglip2-base-p32-256-ve, else
its untrained stand-in (scripts/build_stand_in_siglip.py, with a warning); its uploads lose their alpha channel as
upstream's do (v1 puts transparency over white). A missing checkpoint, CLIP or tokenizer is shown as an error
that says how to get it; the server keeps running. The model is loaded once per (checkpoint file and its
modification time, CLIP path, tokenizer path, device, quantisation and CPU kernel) and shared by all sessions.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402
from PIL import Image  # noqa: E402

from inference.chat import (MAX_IMAGES, GenerationSettings, StreamStats, TooManyImagesError, Turn,  # noqa: E402
                            VLMChat, check_image_count)
from inference.web_support import (IMAGE_TYPES, MAX_UPLOAD_MB, NO_CHECKPOINT_HELP, UPLOAD_ACCEPT,  # noqa: E402,F401
                                   ServerArgs, check_launch_flags, checkpoint_generation, checkpoint_stamp,
                                   display_copy, error_text, format_params, image_id, kernel_to_load,
                                   list_checkpoints, parse_args, resolve_clip_path, resolve_tower_path, split_flags,
                                   validate_upload)
from data_pipeline.image_decode import ImageError  # noqa: E402

SINGLE_IMAGE_WIDTH, IMAGE_WIDTH = 320, 200  # pixels: one image, or each of several


# ---------------------------------------------------------------------------------------------- streamlit


@st.cache_resource(show_spinner="Loading the model...", max_entries=2)
def load_chat(ckpt: str, clip_path: str, tokenizer_path: Optional[str], device: str,
              stamp: tuple[int, int], quantize: str = "none", cpu_kernel: str = "auto",
              allow_encoder_mismatch: bool = False) -> VLMChat:
    """Loaded once per key and shared by every session; `stamp` reloads a checkpoint rewritten in place, and
    `quantize` / `cpu_kernel` / `allow_encoder_mismatch` go to VLMChat.load (inference.cpu.prepare,
    checkpoints.vision_pairing)."""
    return VLMChat.load(ckpt, clip_path, tokenizer_path, device, quantize=quantize, cpu_kernel=cpu_kernel,
                        allow_encoder_mismatch=allow_encoder_mismatch)


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


def sidebar_quantize(args: ServerArgs) -> str:
    """The "int8 weights (CPU)" toggle, starting from --quantize: "int8" or "none". Disabled, with a note, when the
    model is not on the CPU (int8 here is CPU only)."""
    on_cpu = args.device.split(":")[0] == "cpu"
    start_on = args.quantize == "int8" or args.cpu_kernel == "int8"
    int8 = st.sidebar.toggle("int8 weights (CPU)", value=start_on, key="int8", disabled=not on_cpu,
                             help="Reload the model with its decoder's linear layers in int8: faster on a CPU; "
                                  "answers may differ slightly from fp32")
    if not on_cpu:
        st.sidebar.caption(f"int8 weights run on the CPU only (this model runs on `{args.device}`).")
    return "int8" if int8 else "none"


def try_load(ckpt: Optional[str], clip_path: str, args: ServerArgs,
             quantize: str) -> tuple[Optional[VLMChat], Optional[str]]:
    if ckpt is None:
        return None, None
    try:
        quantize, kernel = kernel_to_load(args, quantize == "int8")  # the toggle's int8 replaces any kernel
        return load_chat(ckpt, clip_path, args.tokenizer_path, args.device, checkpoint_stamp(ckpt), quantize,
                         kernel, args.allow_encoder_mismatch), None
    except Exception as e:  # a bad file or path must not take the server down
        return None, f"Could not load the model: {error_text(e)}"


def set_images(images: list[Image.Image], uids: tuple[str, ...], names: list[str]) -> None:
    st.session_state.update(images=images, image_ids=uids, image_names=names, history=[], turn_ids={},
                            inspections={})


def uploader(chat: Optional[VLMChat]) -> list[Any]:
    """The uploaded files, in order (several images are asked about together). The browser filters by
    UPLOAD_ACCEPT; validate_upload checks type and size, handle_upload the count."""
    limit = chat.max_images() if chat is not None else MAX_IMAGES
    return st.file_uploader(f"Images ({', '.join(IMAGE_TYPES)}; GIF: first frame; up to {MAX_UPLOAD_MB} MB each; "
                            f"up to {limit} are asked about together, in order)", type=UPLOAD_ACCEPT,
                            max_upload_size=MAX_UPLOAD_MB, key="uploader", accept_multiple_files=True) or []


def keep_note() -> str:
    names = st.session_state["image_names"]
    if names:
        return f"Still using the previous image{'s' if len(names) > 1 else ''} ({', '.join(names)}) and its " \
               f"conversation."
    return "Upload an image to ask about it."


def handle_upload(uploads: Sequence[Any], chat: Optional[VLMChat]) -> None:
    """Make a new set of valid uploads the current images (a new conversation); if any upload is invalid, or
    there are more than one question can take, report it and keep the previous images and conversation."""
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
        check_upload_count(len(uploads), chat)  # before decoding: 300 uploads cost nothing
        generation = chat.generation if chat is not None else "v1"  # 3v drops alpha as upstream, v1 composites
        images = [validate_upload(upload.name, d, generation=generation) for upload, d in zip(uploads, data)]
    except (ImageError, TooManyImagesError) as e:
        st.error(f"{e}. {keep_note()}")
        return
    had_history = bool(state["history"])
    names = [upload.name for upload in uploads]
    set_images(images, uids, names)
    if had_history:
        st.info(f"New image{'s' if len(names) > 1 else ''} ({', '.join(names)}): started a new conversation.")


def check_upload_count(n_images: int, chat: Optional[VLMChat]) -> None:
    """The rule the API applies too (inference.chat): MAX_IMAGES, or fewer when the model's context is small."""
    if chat is None:
        check_image_count(n_images, MAX_IMAGES)
    else:
        chat.check_image_count(n_images)


def show_images() -> None:
    images = st.session_state["images"]
    if not images:
        st.caption("No image yet: questions are answered from the text alone.")
        return
    width = SINGLE_IMAGE_WIDTH if len(images) == 1 else IMAGE_WIDTH
    st.image([display_copy(image, width) for image in images], caption=st.session_state["image_names"],
             width=width)


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
        args = parse_args(sys.argv[1:], ROOT)
    except argparse.ArgumentError as e:
        st.error(f"Bad command-line argument: {e}. Usage: streamlit run web_server.py -- [--out_dir DIR] "
                 f"[--clip_path DIR] [--tokenizer_path DIR] [--device cpu|cuda] [--quantize none|int8] "
                 f"[--cpu_kernel auto|default|...] [--allow_encoder_mismatch]")
        st.stop()
    st.sidebar.header("Model")
    ckpt, ckpt_error = sidebar_checkpoint(args.out_dir)
    # the tower family follows the checkpoint: CLIP for v1, minimind-3v's SigLIP2 (or its stand-in) for 3v
    generation = checkpoint_generation(ckpt) if ckpt else "v1"
    clip_path, clip_warning = resolve_tower_path(args.clip_path, generation, ROOT)
    quantize = sidebar_quantize(args)
    caption = st.sidebar.empty()  # filled once the model (and so its tokenizer) is known
    st.sidebar.header("Generation")
    settings = sidebar_settings()
    st.sidebar.button("Clear chat", on_click=clear_chat, key="clear_chat", width="stretch")

    chat, load_error = try_load(ckpt, clip_path, args, quantize)
    tokenizer = chat.tokenizer_path if chat else (args.tokenizer_path or "the checkpoint's own")
    kernel = f"  \n`{chat.kernel_line}`" if chat else ""
    tower = "SigLIP2" if generation == "3v" else "CLIP"
    caption.caption(f"{tower}: `{clip_path}`  \nTokenizer: `{tokenizer}`  \nDevice: `{args.device}`{kernel}")
    st.title(f"MiniMind-V ({format_params(chat.n_params)})" if chat else "MiniMind-V (no model loaded)")
    if clip_warning:
        st.warning(clip_warning)
    for message in (ckpt_error, load_error):
        if message:
            st.error(message)

    handle_upload(uploader(chat), chat)
    show_images()

    show_history(st.session_state["history"], chat)
    prompt = st.chat_input("Ask about the image", key="question")
    if prompt is not None:
        ask(chat, prompt, settings)


def launch_streamlit(argv: Sequence[str]) -> None:
    """`python web_server.py ...` becomes `streamlit run web_server.py [streamlit flags] -- [app flags]`, run from
    the repository root (where .streamlit/config.toml is). The process is replaced, so signals reach streamlit."""
    streamlit_flags, app_flags = split_flags(argv)
    check_launch_flags(app_flags, ROOT)
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
