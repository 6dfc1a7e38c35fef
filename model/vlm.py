"""MiniMindVLM: the decoder plus a projection whose outputs replace each 50-token image placeholder span, and
generation (sampling, KV cache, left-padded batches).
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from .config import IMAGE_TOKENS, LMConfig
from .decoder import KVCache, MiniMindLM, ModelOutput, mask_padding_labels


class VisionProj(nn.Module):
    """v1: Linear 768 -> dim, attribute path `vision_proj.vision_proj.0` as in v1. 3v (mlp): LayerNorm, Linear
    768 -> dim, GELU (exact), Linear dim -> dim, all with bias, at `vision_proj.vision_proj.{0,1,3}`."""

    def __init__(self, vision_dim: int, dim: int, bias: bool, mlp: bool = False):
        super().__init__()
        if mlp:
            self.vision_proj = nn.Sequential(nn.LayerNorm(vision_dim), nn.Linear(vision_dim, dim), nn.GELU(),
                                             nn.Linear(dim, dim))
        else:
            self.vision_proj = nn.Sequential(nn.Linear(vision_dim, dim, bias=bias))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.vision_proj(features)


class ImageSpliceError(ValueError):
    pass


def find_image_spans(input_ids: torch.Tensor, image_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, start) of every complete image placeholder span (`image_ids`, 50 ids) in input_ids [B, T], in
    row-major order. An opening half that does not start a full span means the placeholder was cut short: an
    ImageSpliceError. The one span search, used by the model's splice and by the dataset's truncation check."""
    B, T = input_ids.shape
    n, half = IMAGE_TOKENS, IMAGE_TOKENS // 2
    if T < half:
        empty = input_ids.new_zeros(0)
        return empty, empty
    image_ids = image_ids.to(input_ids.device)
    first = input_ids.unfold(1, half, 1).eq(image_ids[:half]).all(-1)  # [B, T-24]: 25 opening ids
    full = torch.zeros_like(first)
    if T >= n:
        full[:, : T - n + 1] = input_ids.unfold(1, n, 1).eq(image_ids).all(-1)
    if bool((first & ~full).any()):
        row = int((first & ~full).nonzero()[0, 0])
        raise ImageSpliceError(f"row {row}: an image placeholder span is cut short "
                               f"(needs {n} tokens); it was probably truncated")
    rows, starts = full.nonzero(as_tuple=True)
    return rows, starts


def find_image_runs(input_ids: torch.Tensor, marker: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """3v: (row, start, length) of every maximal run of the placeholder id `marker` in input_ids [B, T], in
    row-major order. A run may be shorter than an image (a prompt cut inside its placeholder)."""
    is_marker = input_ids == marker
    run_start = is_marker.clone()
    run_start[:, 1:] &= ~is_marker[:, :-1]  # column 0 always starts a run, so no run crosses rows
    rows, starts = run_start.nonzero(as_tuple=True)
    run_of = run_start.flatten().cumsum(0) - 1  # the run each position belongs to (row-major)
    lengths = torch.bincount(run_of[is_marker.flatten()], minlength=rows.numel())
    return rows, starts, lengths


def splice_image_runs(h: torch.Tensor, input_ids: torch.Tensor, marker: int, image_features: torch.Tensor,
                      project: nn.Module, tokens: int) -> torch.Tensor:
    """3v: h [B, T, dim] with the k-th placeholder run (row-major) replaced by the first run-length rows of
    project(image k) [tokens, dim]. image_features [N, tokens, vision_dim]: one per run, or one per row (N == B)
    when every row holds at most one run. A run longer than one image (two placeholders with nothing between)
    is an ImageSpliceError, as is a count of images that fits neither rule."""
    rows, starts, lengths = find_image_runs(input_ids, marker)
    if rows.numel() == 0:
        return h
    if int(lengths.max()) > tokens:
        k = int(lengths.argmax())
        raise ImageSpliceError(f"row {int(rows[k])}: a run of {int(lengths[k])} image placeholder tokens, more "
                               f"than one image's {tokens} (two placeholders with nothing between?)")
    n_runs, n_images = rows.numel(), image_features.shape[0]
    if n_images != n_runs:
        if n_images == input_ids.shape[0] and int(torch.bincount(rows).max()) <= 1:
            image_features = image_features[rows]
        else:
            raise ImageSpliceError(f"{n_runs} image placeholder run(s) but {n_images} image(s) given")
    proj = project(image_features.to(h.dtype)).to(h.dtype)  # [runs, tokens, dim]
    pos_rows, pos_cols = (input_ids == marker).nonzero(as_tuple=True)
    run = torch.searchsorted(rows * input_ids.shape[1] + starts, pos_rows * input_ids.shape[1] + pos_cols,
                             right=True) - 1
    return h.index_put((pos_rows, pos_cols), proj[run, pos_cols - starts[run]])


class MiniMindVLM(MiniMindLM):
    """MiniMindLM plus a projection whose outputs replace each 50-token image placeholder span."""

    def __init__(self, config: LMConfig):
        super().__init__(config)
        # Created after the LM init, so it keeps PyTorch's default Linear init (as v1).
        v3 = config.generation == "3v"
        self.vision_proj = VisionProj(config.vision_dim, config.dim, config.vision_proj_bias, mlp=v3)
        ids, n_ids = config.image_ids, 1 if v3 else IMAGE_TOKENS  # 3v: one id, repeated 64 times in a prompt
        if ids is not None and len(ids) != n_ids:
            raise ValueError(f"image_ids must hold {n_ids} id(s), got {len(ids)}")
        self.register_buffer("image_ids", torch.tensor(ids if ids is not None else [-1] * n_ids),
                             persistent=False)

    def find_image_spans(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, start) of every complete placeholder span, in row-major order. Raises on a cut-short span."""
        if self.config.image_ids is None:
            raise ImageSpliceError("config.image_ids is not set: fill it from the tokenizer "
                                   "(checkpoints.tokenizer.image_token_ids)")
        return find_image_spans(input_ids, self.image_ids)

    def splice_images(self, h: torch.Tensor, input_ids: torch.Tensor, image_features: Optional[torch.Tensor],
                      image_spans: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """Replace each placeholder span of h [B, T, dim] with projected features, in one step.

        image_features is [N, 50, vision_dim]: one per span in row-major order, or one per row
        (N == B) when every row holds at most one span (rows without a span skip theirs).
        image_spans: the spans' (rows [N], starts [N]) when the caller already knows them (training: the
        collate step put the placeholders there and checked them); no search then, and no host sync, so a
        compiled training step runs the splice without a graph break.
        """
        if image_features is None:
            return h
        if image_features.dim() == 2:
            image_features = image_features.unsqueeze(0)
        if self.config.generation == "3v":
            if self.config.image_ids is None:
                raise ImageSpliceError("config.image_ids is not set: fill it from the tokenizer")
            if image_spans is not None:
                return self._write_runs(h, input_ids, *image_spans, image_features)
            return splice_image_runs(h, input_ids, int(self.image_ids[0]), image_features, self.vision_proj,
                                     self.config.image_tokens)
        if image_spans is not None:
            rows, starts = image_spans
            if rows.shape[0] != image_features.shape[0]:
                raise ImageSpliceError(f"{rows.shape[0]} image span(s) given but {image_features.shape[0]} image(s)")
            return self._write_spans(h, rows, starts, image_features)
        rows, starts = self.find_image_spans(input_ids)
        n_spans, n_images = rows.numel(), image_features.shape[0]
        if n_spans == 0:
            return h
        if n_images != n_spans:
            per_row = torch.bincount(rows, minlength=input_ids.shape[0])
            if n_images == input_ids.shape[0] and int(per_row.max()) <= 1:
                image_features = image_features[rows]
            else:
                raise ImageSpliceError(f"{n_spans} image placeholder span(s) but {n_images} image(s) given")
        return self._write_spans(h, rows, starts, image_features)

    def _write_runs(self, h: torch.Tensor, input_ids: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor,
                    image_features: torch.Tensor) -> torch.Tensor:
        """3v with the runs' starts known (training: the collate step found them): each run's window of
        image_tokens positions takes its image's projected rows where the placeholder id is, and keeps h elsewhere
        (a run cut short by max_seq_len ends inside its window). h is padded by one window, so the shapes do not
        depend on the data: no host sync, and a compiled step has no graph break."""
        if rows.shape[0] != image_features.shape[0]:
            raise ImageSpliceError(f"{rows.shape[0]} image run(s) given but {image_features.shape[0]} image(s)")
        n = self.config.image_tokens
        padded = torch.cat([h, h.new_zeros(h.shape[0], n, h.shape[2])], dim=1)
        ids = torch.cat([input_ids, input_ids.new_full((input_ids.shape[0], n), -1)], dim=1)
        cols = starts[:, None] + torch.arange(n, device=h.device)  # [N, n]
        rows = rows[:, None].expand_as(cols)
        proj = self.vision_proj(image_features.to(h.dtype)).to(h.dtype)  # [N, n, dim]
        keep = (ids[rows, cols] == self.image_ids[0])[..., None]
        padded = padded.index_put((rows, cols), torch.where(keep, proj, padded[rows, cols]))
        return padded[:, : h.shape[1]]

    def _write_spans(self, h: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor,
                     image_features: torch.Tensor) -> torch.Tensor:
        """h with the 50 positions from each (row, start) replaced by that image's projected features."""
        proj = self.vision_proj(image_features.to(h.dtype)).to(h.dtype)  # [N, 50, dim]
        cols = starts[:, None] + torch.arange(IMAGE_TOKENS, device=h.device)  # [N, 50]
        return h.index_put((rows[:, None].expand_as(cols), cols), proj)

    def forward(self, input_ids: torch.Tensor, image_features: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                loss_only: bool = False, last_only: bool = False,
                attention_mask: Optional[torch.Tensor] = None,
                segment_ids: Optional[torch.Tensor] = None,
                image_spans: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                loss_positions: Optional[torch.Tensor] = None) -> ModelOutput:
        """logits [B, T, vocab] for every position (and .loss given labels). Two shortcuts skip the output
        head where it is not needed: loss_only keeps the supervised positions ([N, vocab], training) and
        last_only the last position ([B, 1, vocab], generation). attention_mask (1 = token, 0 = padding):
        left padding for generation, right padding for scoring; padded positions are neither attended to
        nor targets of the loss. segment_ids [B, T] marks packed rows (several questions sharing one image:
        dataset.pack_same_image); each question then sees only the image prefix and itself. image_spans and
        loss_positions (training: the collate step computes both) spare the forward its two host syncs, the
        span search and the supervised-position mask: see splice_images and logits_and_loss."""
        h = self.splice_images(self.embed(input_ids), input_ids, image_features, image_spans)
        h = self.run_blocks(h, cache, attention_mask, segment_ids)
        labels = mask_padding_labels(labels, attention_mask)
        return self.logits_and_loss(h[:, -1:] if last_only else h, labels, loss_only, loss_positions)

    # ----------------------------------------------------------------- generation
    def next_token_logits(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [B, vocab] after the tokens ids [B, 1] that continue the cache (the decode step of
        generate_stream and of inference.batcher)."""
        return self(ids, cache=cache).logits[:, -1]

    @torch.inference_mode()
    def generate_stream(
        self,
        input_ids: torch.Tensor,
        image_features: Optional[torch.Tensor] = None,
        max_new_tokens: int = 256,
        temperature: float = 0.7,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        repetition_penalty: float = 1.0,
        eos_token_id: Optional[int] = None,
        use_cache: bool = True,
        generator: Optional[torch.Generator] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token ids [B] one step at a time; stops at eos (not yielded) or max_new_tokens.

        temperature <= 0 is greedy. Rows that reached eos keep yielding eos until all have. Rows of different
        lengths are left-padded, with attention_mask [B, T] marking the real tokens (pad_rows builds both).
        cache: a KVCache already holding a prefix of every row (room left for input_ids and the answer), which
        input_ids continue: questions about one image share its prefill (KVCache.select_rows). attention_mask
        then covers the prefix too, and the repetition penalty sees input_ids only.
        """
        ids = input_ids
        B = ids.shape[0]
        finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
        mask = None if attention_mask is None or bool(attention_mask.bool().all()) else attention_mask.bool()
        if cache is None and use_cache:
            dtype = next(self.parameters()).dtype
            cache = KVCache(self.config, B, ids.shape[1] + max_new_tokens, ids.device, dtype)
        elif cache is not None and not use_cache:
            raise ValueError("a filled cache was given with use_cache=False")
        logits = self(ids, image_features, cache=cache, last_only=True, attention_mask=mask).logits[:, -1]
        for step in range(max_new_tokens):
            # padding is no earlier token of its row: the repetition penalty sees the row's last token there
            seen = ids if mask is None else torch.where(mask[:, -ids.shape[1]:], ids, ids[:, -1:])
            next_ids = sample_next(logits.float(), seen, temperature, top_k, top_p, repetition_penalty, generator)
            if eos_token_id is not None:
                next_ids = torch.where(finished, torch.full_like(next_ids, eos_token_id), next_ids)
                finished |= next_ids.eq(eos_token_id)
                if bool(finished.all()):
                    return
            yield next_ids
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            if step == max_new_tokens - 1:
                return
            if cache is not None:  # the cache remembers which of its positions are padding
                logits = self.next_token_logits(next_ids[:, None], cache)
            else:  # recompute everything, image included
                logits = self(ids, image_features, last_only=True, attention_mask=mask).logits[:, -1]

    def generate(self, input_ids: torch.Tensor, image_features: Optional[torch.Tensor] = None,
                 **kwargs) -> torch.Tensor:
        """The new token ids [B, n] (prompt excluded, eos excluded); same arguments as generate_stream."""
        steps = list(self.generate_stream(input_ids, image_features, **kwargs))
        if not steps:
            return input_ids.new_zeros(input_ids.shape[0], 0)
        return torch.stack(steps, dim=1)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str = "left",
             device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T], attention_mask [B, T]) of token rows of different lengths: padded on the left for
    generation (every row's next token comes at the end), on the right for scoring and training."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("pad_rows needs at least one row, and no empty row")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, cols] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, cols] = 1
    return ids.to(device), mask.to(device)


def sample_next(logits: torch.Tensor, seen: torch.Tensor, temperature: float, top_k: Optional[int],
                top_p: Optional[float], repetition_penalty: float,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick the next token for each row of logits [B, V]; `seen` [B, T] feeds the repetition penalty."""
    if repetition_penalty != 1.0:
        prev = logits.gather(1, seen)
        # Make already-seen tokens less likely whatever their sign: divide positive, multiply negative.
        logits = logits.scatter(1, seen, torch.where(prev > 0, prev / repetition_penalty, prev * repetition_penalty))
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
