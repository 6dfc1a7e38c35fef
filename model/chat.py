"""Chat with a trained model about an image: the inference path shared by 3-eval_chat.py, web_server.py
and serve_openai_api.py (prompt building, history trimming, streaming text)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
from PIL import Image

from .checkpoint import load_model
from .LMConfig import IMAGE_SPECIAL_TOKEN
from .model import MiniMindVLM, count_parameters
from .tokenizer_utils import encode, image_token_ids, load_tokenizer, render_chat
from .vision_utils import VisionEncoder, load_vision_encoder

DEFAULT_QUESTION = "这个图片描述的是什么内容？"  # v1's default: "What does this picture describe?"
Turn = tuple[str, str]  # (question, answer)


@dataclass
class GenerationSettings:
    temperature: float = 0.5
    top_k: Optional[int] = 8
    top_p: Optional[float] = None
    max_new_tokens: int = 256
    repetition_penalty: float = 1.0
    seed: Optional[int] = None


@dataclass
class StreamStats:
    """Filled in by VLMChat.stream: token counts for usage reports and finish reasons."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


class VLMChat:
    """A loaded model, tokenizer and vision encoder, with question answering over an image."""

    def __init__(self, model: MiniMindVLM, tokenizer, encoder: VisionEncoder):
        self.model, self.tokenizer, self.encoder = model.eval(), tokenizer, encoder
        self.device = next(model.parameters()).device
        self.eos_id = tokenizer.eos_token_id

    @classmethod
    def load(cls, ckpt: Union[str, os.PathLike], clip_path: str, tokenizer_path: str,
             device: str = "cpu", max_seq_len: Optional[int] = None, **overrides) -> "VLMChat":
        """Load all three parts; a missing one is an error that says how to get it.

        The model's shape comes from the checkpoint; `overrides` (e.g. dim, n_layers) must agree with it."""
        tokenizer = load_tokenizer(tokenizer_path)
        encoder = load_vision_encoder(clip_path, device)
        model = load_model(ckpt, image_ids=image_token_ids(tokenizer), device=device, max_seq_len=max_seq_len,
                           **overrides)
        return cls(model, tokenizer, encoder)

    @property
    def n_params(self) -> int:
        return count_parameters(self.model)

    def build_prompt(self, question: str, history: Sequence[Turn] = (), has_image: bool = True,
                     reserve: int = 0) -> list[int]:
        """Token ids of the conversation ending with the assistant header for `question`.

        The image placeholder leads the earliest kept user turn. Older turns are dropped first until the
        prompt plus `reserve` new tokens fits max_seq_len; the placeholder span itself is never cut.
        """
        budget = self.model.config.max_seq_len - reserve
        turns = list(history)
        while True:
            messages = []
            for i, (q, a) in enumerate(turns + [(question, None)]):
                content = f"{IMAGE_SPECIAL_TOKEN}\n{q}" if (i == 0 and has_image) else q
                messages.append({"role": "user", "content": content})
                if a is not None:
                    messages.append({"role": "assistant", "content": a})
            ids = encode(self.tokenizer, render_chat(self.tokenizer, messages))
            if len(ids) <= budget or not turns:
                return ids
            turns = turns[1:]

    def image_features(self, image: Optional[Image.Image]) -> Optional[torch.Tensor]:
        return None if image is None else self.encoder.encode_images([image]).to(self.device)

    def stream(self, question: str, image: Optional[Image.Image] = None, history: Sequence[Turn] = (),
               settings: GenerationSettings = GenerationSettings(),
               stats: Optional[StreamStats] = None) -> Iterator[str]:
        """Yield the answer text piece by piece (never splitting a multi-byte character); `stats`, when given,
        holds the prompt and generated token counts as generation goes."""
        ids = self.build_prompt(question, history, image is not None, reserve=min(settings.max_new_tokens, 64))
        stats = stats if stats is not None else StreamStats()
        stats.prompt_tokens, stats.completion_tokens = len(ids), 0
        generator = None
        if settings.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(settings.seed)
        tokens: list[int] = []
        shown = ""
        for next_ids in self.model.generate_stream(
                torch.tensor([ids], device=self.device), self.image_features(image),
                max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_k=settings.top_k,
                top_p=settings.top_p, repetition_penalty=settings.repetition_penalty, eos_token_id=self.eos_id,
                generator=generator):
            tokens.append(int(next_ids[0]))
            stats.completion_tokens = len(tokens)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its remaining bytes
                continue
            if len(text) > len(shown):
                yield text[len(shown):]
                shown = text
