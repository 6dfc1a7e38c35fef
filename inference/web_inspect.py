"""The web demo's "inside the model" panel (web_server.py opens it under an answer): where the answer looks in
the uploaded image, per answer token and layer, and the tokenised prompt with the 50 image positions marked.

Imported only when a panel is opened, so matplotlib is not loaded for a plain chat.
"""
from __future__ import annotations

import html
from typing import Sequence

import streamlit as st
from PIL import Image

from model.config import IMAGE_TOKENS

from .attention_map import AttentionMaps, inspect_answer
from .attention_plot import heatmap_png, layer_rows, token_texts
from .chat import VLMChat

WHOLE_ANSWER = "whole answer"
ALL_LAYERS = "all layers (mean)"
TOKEN_STYLE = "display:inline-block;margin:1px;padding:0 3px;border-radius:3px;font-family:monospace;"
TEXT_COLOUR, IMAGE_COLOUR = "background:#e8e8e8;", "background:#ffb347;"


def inspection(chat: VLMChat, image: Image.Image, key: str, prompt_ids: Sequence[int],
               answer_ids: Sequence[int]) -> AttentionMaps:
    """The attention maps of one answer: computed on first use, then kept in the session."""
    cache = st.session_state.setdefault("inspections", {})
    if key not in cache:
        with st.spinner("Recomputing the answer's attention explicitly..."):
            cache[key] = inspect_answer(chat.model, prompt_ids, answer_ids, chat.image_features(image))
    return cache[key]


def prompt_html(tokens: Sequence[str], image_start: int, image_tokens: int = IMAGE_TOKENS, cls_tokens: int = 1,
                grid_side: int = 7) -> str:
    """The prompt's tokens as chips; the image positions (v1: 50, CLS then 7x7 patches; 3v: 64, 8x8 patches) in
    orange, each titled with what it holds."""
    chips = []
    for pos, token in enumerate(tokens):
        offset = pos - image_start
        if 0 <= offset < image_tokens:
            patch = offset - cls_tokens
            what = "CLS" if patch < 0 else f"patch ({patch // grid_side},{patch % grid_side})"
            chips.append(f'<span class="image-pos" title="position {pos}: {what}" '
                         f'style="{TOKEN_STYLE}{IMAGE_COLOUR}">{html.escape(token)}</span>')
        else:
            chips.append(f'<span class="text-pos" title="position {pos}" '
                         f'style="{TOKEN_STYLE}{TEXT_COLOUR}">{html.escape(token)}</span>')
    return "".join(chips)


def show_inspection(chat: VLMChat, image: Image.Image, key: str, prompt_ids: Sequence[int],
                    answer_ids: Sequence[int]) -> None:
    if not answer_ids:
        st.caption("The answer is empty: no answer token to inspect.")
        return
    maps = inspection(chat, image, key, prompt_ids, answer_ids)
    if maps.image_start is None:
        st.caption("This prompt holds no image placeholder: nothing to show.")
        return
    tokens = token_texts(chat.tokenizer, answer_ids)
    token_options = [WHOLE_ANSWER, *[f"{i}: '{t}'" for i, t in enumerate(tokens)]]
    layer_options = [ALL_LAYERS, *[f"layer {i}" for i in range(maps.n_layers)]]
    token_choice = st.select_slider("Answer token", token_options, value=WHOLE_ANSWER, key=f"token_{key}")
    layer_choice = st.select_slider("Layer", layer_options, value=ALL_LAYERS, key=f"layer_{key}")
    query = None if token_choice == WHOLE_ANSWER else token_options.index(token_choice) - 1
    layer = None if layer_choice == ALL_LAYERS else layer_options.index(layer_choice) - 1
    grid, cls = maps.patch_grid(layer, query), maps.cls_weight(layer, query)
    patches = float(grid.sum())
    left, right = st.columns([3, 2])
    with left:
        st.image(heatmap_png(image, grid, f"{token_choice}, {layer_choice}"), width="stretch")
    with right:
        st.markdown(f"**Attention to the image:** {100 * (cls + patches):.1f}%  \n"
                    f"({f'CLS {100 * cls:.1f}%, ' if maps.cls_tokens else ''}"
                    f"{maps.grid_side ** 2} patches {100 * patches:.1f}%)  \n"
                    f"**to text:** {100 * (1 - cls - patches):.1f}%")
        st.caption("Mean over heads. Brighter = more attention; the colour scale runs from 0 to this map's "
                   "largest patch weight. Row i of the answer is the position that produced token i.")
    rows = layer_rows(maps)
    st.table({"layer": [r["layer"] for r in rows],
              "image %": [f"{100 * r['image']:.1f}" for r in rows],
              "patches %": [f"{100 * r['patches']:.1f}" for r in rows],
              "text %": [f"{100 * r['text']:.1f}" for r in rows]})
    side, cls_note = maps.grid_side, "CLS then " if maps.cls_tokens else ""
    st.markdown(f"**The prompt as the model reads it** (orange: the {maps.image_tokens} image positions, {cls_note}"
                f"{side}x{side} patches, whose placeholder embeddings are replaced by the projected image features)")
    st.markdown(prompt_html(token_texts(chat.tokenizer, prompt_ids), maps.image_start, maps.image_tokens,
                            maps.cls_tokens, side), unsafe_allow_html=True)
