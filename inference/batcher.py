"""A small dynamic batcher: concurrent generation requests are decoded together, one forward per step.

One decode thread owns the model. It takes the first waiting request, waits up to `max_wait_s` for more (at most
`max_batch` in all), left-pads their prompts with an attention mask (model.vlm.pad_rows) and runs one prefill,
then one forward per new token for the whole batch. Each row samples with its own settings and seed and streams
its tokens to its own queue. A row leaves the batch as soon as it ends (end token, its max_new_tokens, or its
cancel event): its keys and values are dropped from the cache, so the others decode at the smaller size.
Requests that arrive while a batch is decoding join it at the next step while it has room: they are prefilled
on their own and their cache is merged in, right-aligned, with the gap marked as padding. Greedy rows give exactly
the tokens they would give alone (tests/test_padding.py, tests/test_batcher.py), on every fp32 CPU kernel
(inference.cpu; the decode step is the model's next_token_logits, so with the compiled CPU kernel installed there a
lone unpadded row decodes through the compiled step). An int8 model (inference.cpu.quantize) quantises each layer's
activations over the whole batch, so there a row can differ from its answer alone where two tokens nearly tie (a
trained model's clear answers do not: tests/test_cpu_inference_apps.py); max_batch=1 decodes each request as alone.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from model.decoder import KVCache
from model.vlm import MiniMindVLM, pad_rows, sample_next

_END = object()  # pushed after a request's last token


@dataclass
class DecodeRequest:
    """One prompt to continue; tokens arrive on `out` (then the end marker, or an exception)."""

    prompt: list[int]
    image_features: Optional[torch.Tensor]  # [n, 50, vision_dim]: one per placeholder span of the prompt, or None
    max_new_tokens: int
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    cancel: threading.Event = field(default_factory=threading.Event)  # set: leave the batch
    client_gone: Optional[Callable[[], bool]] = None  # asked at every step as well
    out: "queue.Queue" = field(default_factory=queue.Queue)
    generated: list[int] = field(default_factory=list)

    def tokens(self) -> Iterator[int]:
        """The new token ids as they are decoded (blocks); re-raises a failure of the decode thread."""
        while True:
            item = self.out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def ended(self) -> bool:
        return self.cancel.is_set() or (self.client_gone is not None and self.client_gone())

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 and self.repetition_penalty == 1.0


@dataclass
class _Running:
    """The rows decoding together, their samplers and their KV cache (row i of the cache is rows[i])."""

    rows: list[DecodeRequest]
    generators: list
    cache: KVCache


class DynamicBatcher:
    """Decodes the requests given to submit() in batches of up to max_batch, on its own thread."""

    def __init__(self, model: MiniMindVLM, eos_id: int, pad_id: int, max_batch: int = 8, max_wait_s: float = 0.01):
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_s >= 0, got {max_batch} and {max_wait_s}")
        self.model, self.eos_id, self.pad_id = model.eval(), eos_id, pad_id
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.pending: "queue.Queue[DecodeRequest]" = queue.Queue()
        self.batch_sizes: list[int] = []  # the size of every batch started (for tests and the benchmark)
        self.joins = 0  # requests that joined a batch already decoding
        self._thread = threading.Thread(target=self._loop, name="minimind-batcher", daemon=True)
        self._thread.start()

    def submit(self, request: DecodeRequest) -> DecodeRequest:
        self.pending.put(request)
        return request

    # ------------------------------------------------------------------ the decode thread
    def _collect(self) -> list[DecodeRequest]:
        """The first waiting request plus those arriving within max_wait_s, up to max_batch; cancelled ones end."""
        batch = [self.pending.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:  # whatever is already waiting joins at once; then wait out the remaining time
                batch.append(self.pending.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        live = []
        for request in batch:
            if request.ended():  # the client left while waiting
                request.out.put(_END)
            else:
                live.append(request)
        return live

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if not batch:
                continue
            try:
                self.batch_sizes.append(len(batch))
                self._decode(batch)
            except Exception as e:  # every client of the batch (joined ones included) hears of it
                for request in batch:
                    request.out.put(e)

    def _take_waiting(self, room: int) -> list[DecodeRequest]:
        """Requests already waiting (no wait), at most room; cancelled ones end."""
        taken: list[DecodeRequest] = []
        while len(taken) < room:
            try:
                request = self.pending.get_nowait()
            except queue.Empty:
                break
            if request.ended():
                request.out.put(_END)
            else:
                taken.append(request)
        return taken

    @torch.inference_mode()
    def _decode(self, batch: list[DecodeRequest]) -> None:
        """Prefill the batch, then one forward per step until every row has ended. Requests that arrive
        meanwhile join at a step boundary (while there is room): they are prefilled on their own, then their
        keys and values are merged into the running cache. Joined requests are added to `batch`."""
        running, logits = self._prefill(batch)
        self._advance(running, logits)
        while running.rows:
            joining = self._take_waiting(self.max_batch - len(running.rows))
            if joining:
                batch.extend(joining)
                self.joins += len(joining)
                try:
                    new, new_logits = self._prefill(joining)
                    self._advance(new, new_logits)
                except Exception as e:  # a bad joining request fails alone; the running ones go on
                    for request in joining:
                        request.out.put(e)
                else:
                    if new.rows:
                        running = self._merge(running, new)
            device = running.cache.k.device
            step = torch.tensor([[r.generated[-1]] for r in running.rows], device=device)
            self._advance(running, self.model.next_token_logits(step, running.cache))

    def _prefill(self, rows: list[DecodeRequest]) -> tuple["_Running", torch.Tensor]:
        """The rows' prompts (left-padded, images spliced) run into a fresh cache; logits of the last position."""
        model, device = self.model, next(self.model.parameters()).device
        ids, mask = pad_rows([r.prompt for r in rows], self.pad_id, "left", device)
        images = [r.image_features for r in rows if r.image_features is not None]
        features = torch.cat(images).to(device) if images else None  # one span per image row, in row order
        cache = KVCache(model.config, len(rows), ids.shape[1] + max(r.max_new_tokens for r in rows), device,
                        next(model.parameters()).dtype)
        logits = model(ids, features, cache=cache, last_only=True, attention_mask=mask).logits[:, -1]
        generators = [torch.Generator(device=device).manual_seed(r.seed) if r.seed is not None else None
                      for r in rows]
        return _Running(list(rows), generators, cache), logits

    def _advance(self, running: "_Running", logits: torch.Tensor) -> None:
        """Sample each row's next token, stream it, and drop the rows that ended from the batch and its cache."""
        keep = []
        for i, (request, token) in enumerate(zip(running.rows, self._sample(logits.float(), running.rows,
                                                                              running.generators))):
            if token == self.eos_id or request.ended():
                request.out.put(_END)
                continue
            request.generated.append(token)
            request.out.put(token)
            if len(request.generated) >= request.max_new_tokens:
                request.out.put(_END)
            else:
                keep.append(i)
        if len(keep) < len(running.rows):
            cache = running.cache
            index = torch.tensor(keep, dtype=torch.long, device=cache.k.device)
            cache.k, cache.v = cache.k[:, index], cache.v[:, index]
            if cache.key_mask is not None:
                cache.key_mask = cache.key_mask[index]
            running.rows = [running.rows[i] for i in keep]
            running.generators = [running.generators[i] for i in keep]

    def _merge(self, a: "_Running", b: "_Running") -> "_Running":
        """One batch of a's and b's rows: both caches right-aligned at the longer length, the gap before the
        shorter one marked as padding (positions count real keys only, so nothing else changes)."""
        La, Lb = a.cache.length, b.cache.length
        L, Ba = max(La, Lb), len(a.rows)
        rows = a.rows + b.rows
        remaining = max(r.max_new_tokens - len(r.generated) for r in rows)
        cache = KVCache(self.model.config, len(rows), L + remaining, a.cache.k.device, a.cache.k.dtype)
        keys = torch.zeros(len(rows), L, dtype=torch.bool, device=a.cache.k.device)
        for part, rows_slice, length in ((a.cache, slice(0, Ba), La), (b.cache, slice(Ba, None), Lb)):
            cache.k[:, rows_slice, :, L - length:L] = part.k[:, :, :, :length]
            cache.v[:, rows_slice, :, L - length:L] = part.v[:, :, :, :length]
            keys[rows_slice, L - length:] = True if part.key_mask is None else part.key_mask[:, :length]
        cache.key_mask, cache.length = keys, L
        return _Running(rows, a.generators + b.generators, cache)

    @staticmethod
    def _sample(logits: torch.Tensor, rows: list[DecodeRequest], generators: list) -> list[int]:
        """Each row's next token under its own settings (one argmax for an all-greedy batch)."""
        if all(r.greedy for r in rows):
            return logits.argmax(dim=-1).tolist()
        picked = []
        for i, r in enumerate(rows):
            seen = torch.tensor([r.prompt + r.generated], device=logits.device)
            picked.append(int(sample_next(logits[i:i + 1], seen, r.temperature, r.top_k, r.top_p,
                                          r.repetition_penalty, generators[i])[0]))
        return picked
