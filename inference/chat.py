"""Chat with a trained model about an image: the inference path shared by 3-eval_chat.py, web_server.py
and serve_openai_api.py (prompt building, history trimming, streaming text)."""
from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from PIL import Image

from checkpoints.checkpoint import load_model, read_checkpoint
from model.config import IMAGE_TOKENS
from inference.cpu.prepare import prepare_for_cpu_inference
from model.decoder import count_parameters
from checkpoints.tokenizer import (count_span_openings, encode, image_pad_id, image_placeholder, image_token_ids,
                                   load_tokenizer, max_token_chars, neutralise_placeholder, render_chat)
from checkpoints.tokenizer_pairing import checkpoint_tokenizer
from model.vision import VisionEncoder, load_vision_encoder
from checkpoints.vision_pairing import check_encoder_family, check_vision_encoder, encoder_record, tower_for
from model.vlm import MiniMindVLM

from .batcher import DecodeRequest, DynamicBatcher

# Temperatures below this are treated as 0 (greedy): logits / 1e-300 overflow to inf and sampling gets NaN.
MIN_TEMPERATURE = 1e-3
MIN_TOP_P = 1e-6
DEFAULT_QUESTION = "这个图片描述的是什么内容？"  # v1's default: "What does this picture describe?"
# minimind-3v's eval_vlm.py: its question ("Describe the main objects and the scene in this picture.") and sampling
V3_QUESTION = "请描述这张图中的主要物体和场景。"
V3_ANSWER_DEFAULTS = {"prompt": V3_QUESTION, "temperature": 0.7, "top_k": 50, "top_p": 0.85}
MAX_IMAGES = 8  # images per question in every front end; each fills a 50-token span of the prompt
# Context tokens the image spans and the template must leave free, for at least a short question and answer.
MIN_TEXT_ROOM = 8
Turn = tuple[str, str]  # (question, answer)
Images = Union[None, Image.Image, Sequence[Image.Image]]


class TooManyImagesError(ValueError):
    """More images than one question can take: over MAX_IMAGES, or more spans than the model's context holds."""

    def __init__(self, n_images: int, limit: int, context: Optional[int] = None, image_tokens: int = IMAGE_TOKENS):
        if context is None or limit >= MAX_IMAGES:
            reason = f"at most {MAX_IMAGES} images per question"
        else:
            reason = (f"this model's context ({context} tokens) holds at most {limit} image(s) per question, each "
                      f"taking {image_tokens + 1} tokens of the prompt (and never more than {MAX_IMAGES})")
        super().__init__(f"{n_images} image{' is' if n_images == 1 else 's are'} too many: {reason}")
        self.n_images, self.limit = n_images, limit


def check_image_count(n_images: int, limit: int = MAX_IMAGES, context: Optional[int] = None,
                      image_tokens: int = IMAGE_TOKENS) -> None:
    """Raise TooManyImagesError when n_images is over limit (context: the model's, named in the message, as is
    image_tokens: each image's placeholder, 50 for v1 and 64 for 3v, plus its newline)."""
    if n_images > limit:
        raise TooManyImagesError(n_images, limit, context, image_tokens)


def as_image_list(images: Images) -> list[Image.Image]:
    if images is None:
        return []
    return [images] if isinstance(images, Image.Image) else list(images)


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
    """Filled in by VLMChat.stream: token counts for usage reports and finish reasons, and the token ids
    themselves (what the attention inspection reruns)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_ids: list[int] = field(default_factory=list)
    completion_ids: list[int] = field(default_factory=list)


class VLMChat:
    """A loaded model, tokenizer and vision encoder, with question answering over an image."""

    def __init__(self, model: MiniMindVLM, tokenizer, encoder: VisionEncoder, tokenizer_path: Optional[str] = None):
        self.model, self.tokenizer, self.encoder = model.eval(), tokenizer, encoder
        self.tokenizer_path = tokenizer_path  # where the tokenizer came from (for display)
        self.device = next(model.parameters()).device
        self.eos_id = tokenizer.eos_token_id
        self._encode_lock = threading.Lock()
        self._max_images: Optional[int] = None
        # counted as loaded: the CPU kernels and int8 keep the decode weights in forms that are not parameters
        self._n_params = count_parameters(model)
        self.kernel_line: Optional[str] = None  # what prepare_cpu() did for CPU inference (inference.cpu.prepare)

    @classmethod
    def load(cls, ckpt: Union[str, os.PathLike], clip_path: str, tokenizer_path: Optional[str] = None,
             device: str = "cpu", max_seq_len: Optional[int] = None, quantize: str = "none",
             cpu_kernel: str = "default", allow_encoder_mismatch: bool = False, **overrides) -> "VLMChat":
        """Load all three parts; a missing one is an error that says how to get it.

        `ckpt` is a .pth/.safetensors file or a Hugging Face model directory. The tokenizer is `tokenizer_path`
        when given, else the checkpoint's own (checkpoints.tokenizer_pairing.checkpoint_tokenizer), and must match its record.
        The encoder at `clip_path` (v1's CLIP default stands for a 3v checkpoint's SigLIP2 tower:
        checkpoints.vision_pairing.tower_for) must be the one the checkpoint records (checkpoints.vision_pairing; a mismatch is a
        VisionEncoderMismatch unless `allow_encoder_mismatch`, the apps' --allow_encoder_mismatch).
        The model's shape comes from the checkpoint; `overrides` (e.g. dim, n_layers) must agree with it.
        `quantize` and `cpu_kernel` go to prepare_cpu (the apps' --quantize and --cpu_kernel)."""
        source = read_checkpoint(ckpt)
        tokenizer_path, _ = checkpoint_tokenizer(source, tokenizer_path)
        tokenizer = load_tokenizer(tokenizer_path)
        generation = source.stored.get("generation", "v1")  # read from the checkpoint, never from its name
        encoder = load_vision_encoder(tower_for(generation, clip_path), device)
        check_encoder_family(generation, encoder, source.path)  # v1 takes CLIP, 3v SigLIP: always refused
        check_vision_encoder(source.vision_record, encoder_record(encoder), source.path, allow_encoder_mismatch)
        image_ids = image_pad_id(tokenizer) if generation == "3v" else image_token_ids(tokenizer)
        model = load_model(source, image_ids=image_ids, device=device, max_seq_len=max_seq_len, **overrides)
        chat = cls(model, tokenizer, encoder, tokenizer_path)
        chat.prepare_cpu(quantize, cpu_kernel)
        return chat

    def prepare_cpu(self, quantize: str = "none", cpu_kernel: str = "default") -> str:
        """Quantise the model and/or choose its CPU kernel (inference.cpu.prepare.prepare_for_cpu_inference), in
        place; the line saying what was done is returned and kept in `kernel_line`. A model already converted
        (not "none"/"default") is not converted again: that is a ValueError."""
        self.kernel_line = prepare_for_cpu_inference(self.model, quantize, cpu_kernel)
        return self.kernel_line

    @property
    def generation(self) -> str:
        """"v1" or "3v": which prompt placeholder, tower and sampling defaults the model goes with."""
        return self.model.config.generation

    @property
    def n_params(self) -> int:
        """The model's parameters as loaded (the tied embedding counted once), whatever kernel it runs on."""
        return self._n_params

    def max_images(self) -> int:
        """The most images one question can hold: MAX_IMAGES, or fewer when the context cannot hold their spans,
        the chat template and MIN_TEXT_ROOM tokens for the question and the answer."""
        if self._max_images is None:
            context, n = self.model.config.max_seq_len, 0
            while n < MAX_IMAGES and len(self._turn_ids("", None, n + 1)) + MIN_TEXT_ROOM <= context:
                n += 1
            self._max_images = n
        return self._max_images

    def check_image_count(self, n_images: int) -> None:
        """Raise TooManyImagesError when one question cannot hold n_images (see max_images)."""
        check_image_count(n_images, self.max_images(), self.model.config.max_seq_len, self.model.config.image_tokens)

    def build_prompt(self, question: str, history: Sequence[Turn] = (), n_images: int = 1,
                     reserve: int = 0) -> list[int]:
        """Token ids of the conversation ending with the assistant header for `question`.

        The image placeholders (one per image, each on its own line, in order) lead the earliest kept user
        turn. The newest turns that fit max_seq_len minus
        `reserve` are kept (older ones are dropped); when even the question alone does not fit, its oldest tokens
        are cut. The placeholder spans are never cut, and user text cannot forge or cut one (neutralise_placeholder).
        Work is bounded by the budget, not the request: turns are tokenised once each, newest first, and text
        longer than the budget could ever hold is skipped or cut before tokenising. More images than max_images()
        raise TooManyImagesError, so the prompt never exceeds max_seq_len.
        """
        self.check_image_count(int(n_images))
        budget = max(self.model.config.max_seq_len - self.answer_room(reserve, n_images), 1)
        max_chars = budget * max_token_chars(self.tokenizer)  # more characters than this cannot fit
        question = neutralise_placeholder(question[-max_chars:], self.generation)
        if not history:  # a single question: nothing to drop
            return self._fit_question(question, n_images, budget)
        kept: list[list[int]] = []  # plain token ids of the kept turns, newest first
        first_with_image: Optional[list[int]] = None  # the oldest kept turn, with the placeholder
        question_ids = self._turn_ids(question, None, 0)
        used = len(question_ids)
        for q, a in reversed(list(history)):
            if len(q) + len(a) > max_chars:
                break
            q, a = neutralise_placeholder(q, self.generation), neutralise_placeholder(a, self.generation)
            plain = self._turn_ids(q, a, 0)
            opening = self._turn_ids(q, a, n_images) if n_images else plain
            if used + len(opening) > budget:
                break
            kept.append(plain)
            first_with_image, used = opening, used + len(plain)
        if not kept:
            return self._fit_question(question, n_images, budget)
        kept[-1] = first_with_image
        ids = [token for turn in reversed(kept) for token in turn] + question_ids
        self._check_spans(ids, n_images)
        return ids

    def answer_room(self, reserve: int, n_images: int) -> int:
        """How many of the `reserve` tokens asked for the answer the prompt leaves free: at most half of the
        context left after the template and the image spans, so that a small context (the demo model's 128)
        asked for a long answer still keeps the question instead of cutting it down to its last token."""
        if reserve <= 0:
            return 0
        fixed = len(self._turn_ids("", None, n_images))
        return max(0, min(reserve, (self.model.config.max_seq_len - fixed) // 2))

    def _turn_ids(self, question: str, answer: Optional[str], n_images: int) -> list[int]:
        """One turn (led by n_images placeholders) rendered by the chat template; each turn starts with a special
        token, so turns tokenised one by one join into exactly the ids of the whole conversation tokenised at once."""
        content = f"{image_placeholder(self.generation)}\n" * n_images + question
        messages = [{"role": "user", "content": content}]
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        return encode(self.tokenizer, render_chat(self.tokenizer, messages))

    def _fit_question(self, question: str, n_images: int, budget: int) -> list[int]:
        """The question alone, its oldest tokens cut so that the prompt fits `budget` (the image spans stay)."""
        ids = self._turn_ids(question, None, n_images)
        if len(ids) > budget and question:
            marker = "\x00"  # split the rendered turn around the question to cut only the question's tokens
            text = render_chat(self.tokenizer, [{"role": "user", "content": (
                f"{image_placeholder(self.generation)}\n" * n_images) + marker}])
            head, tail = (encode(self.tokenizer, part) for part in text.split(marker, 1))
            keep = max(budget - len(head) - len(tail), 0)
            body = encode(self.tokenizer, question)
            ids = head + (body[len(body) - keep:] if keep else []) + tail
        self._check_spans(ids, n_images)
        return ids

    def _check_spans(self, ids: list[int], n_images: int) -> None:
        image_ids = self.model.config.image_ids
        if self.generation == "3v" and image_ids is not None:  # runs of the one placeholder id, each a whole image
            runs = [len(list(run)) for token, run in itertools.groupby(ids) if token == image_ids[0]]
            if len(runs) != n_images or any(n != self.model.config.image_tokens for n in runs):
                raise ValueError("the prompt holds a forged or broken image placeholder run")
        elif image_ids is not None and count_span_openings(ids, image_ids) != n_images:
            raise ValueError("the prompt holds a forged or broken image placeholder span")

    def image_features(self, images: Images) -> Optional[torch.Tensor]:
        """Features [n, 50 (v1) or 64 (3v), hidden] of one image or a sequence of them (None when there is none)."""
        images = as_image_list(images)
        if not images:
            return None
        with self._encode_lock:  # the encoder's feature hook is per call: one call at a time
            return self.encoder.encode_images(images).to(self.device)

    def stream(self, question: str, image: Images = None, history: Sequence[Turn] = (),
               settings: GenerationSettings = GenerationSettings(),
               stats: Optional[StreamStats] = None,
               cancelled: Optional[Callable[[], bool]] = None,
               batcher: Optional[DynamicBatcher] = None) -> Iterator[str]:
        """Yield the answer text piece by piece (never splitting a multi-byte character); `stats`, when given,
        holds the prompt and generated token counts as generation goes. `image` is one image, a sequence of
        them (asked about together, in order) or None. `cancelled()` is asked before the images are encoded,
        before the prompt is run and before every decode step: when it says True the stream ends there, so a
        request whose client has gone costs at most one more step.

        With a batcher the request is decoded together with other concurrent ones (inference.batcher), which asks
        cancelled() at every step as well; closing this generator also takes the request out of its batch."""
        cancelled = cancelled or (lambda: False)
        images = as_image_list(image)
        ids = self.build_prompt(question, history, len(images), reserve=min(settings.max_new_tokens, 64))
        stats = stats if stats is not None else StreamStats()
        stats.prompt_tokens, stats.completion_tokens = len(ids), 0
        stats.prompt_ids, stats.completion_ids = list(ids), []
        generator = None
        if settings.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(settings.seed)
        # a temperature this small is greedy in effect, and dividing logits by it overflows to inf/nan; a top_p
        # this small keeps only the likeliest token (greedy), and in float32 it would round to 0 and drop them all
        greedy = settings.temperature < MIN_TEMPERATURE or (settings.top_p is not None and settings.top_p < MIN_TOP_P)
        temperature = 0.0 if greedy else settings.temperature
        if cancelled():
            return
        features = self.image_features(images)
        if batcher is not None:
            request = DecodeRequest(ids, features, settings.max_new_tokens, temperature, settings.top_k,
                                    settings.top_p, settings.repetition_penalty, settings.seed, client_gone=cancelled)
            try:
                yield from self._text_pieces(batcher.submit(request).tokens(), stats)
            finally:
                request.cancel.set()
            return
        steps = self.model.generate_stream(
            torch.tensor([ids], device=self.device), features,
            max_new_tokens=settings.max_new_tokens, temperature=temperature, top_k=settings.top_k,
            top_p=settings.top_p, repetition_penalty=settings.repetition_penalty, eos_token_id=self.eos_id,
            generator=generator)

        def token_ids() -> Iterator[int]:
            while not cancelled():  # each next() is one step: the prompt (prefill) first, then one token each
                next_ids = next(steps, None)
                if next_ids is None:
                    return
                yield int(next_ids[0])

        yield from self._text_pieces(token_ids(), stats)

    def _text_pieces(self, token_ids: Iterator[int], stats: StreamStats) -> Iterator[str]:
        """The new text as each token arrives, holding back an incomplete UTF-8 sequence."""
        tokens: list[int] = []
        stats.completion_ids = tokens  # filled as tokens come
        shown = ""
        for token in token_ids:
            tokens.append(token)
            stats.completion_tokens = len(tokens)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its remaining bytes
                continue
            if len(text) > len(shown):
                yield text[len(shown):]
                shown = text
