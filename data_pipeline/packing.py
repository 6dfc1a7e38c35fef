"""--pack_same_image: several questions about the same images share one row, each question a segment.

The model lets a segment attend to the shared prefix and to itself only, at the positions it would have alone
(MiniMindLM.run_blocks, given the row's segment_ids), so each question is trained exactly as in its own row,
while the image tokens (50 per image for v1, 64 for 3v) are paid once per row instead of once per question.
"""
from __future__ import annotations

import torch

from model.config import IMAGE_TOKENS, V3_IMAGE_TOKENS
from model.vlm import find_image_spans

from .images import image_ref_key
from .tokens import IGNORE_INDEX, Sample
from .v3_tokens import image_runs


def shared_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def pack_rows(samples: list[Sample], per_row: int, max_seq_len: int, image_ids: torch.Tensor,
              generation: str = "v1") -> list[Sample]:
    """Pack up to per_row samples that share their images into one row: the common prefix (the user turn's
    start and the image span) once, then each sample's own tokens (its question and answer) as a segment.

    Samples are packed only where the packed row trains exactly as the samples alone: the same images, a shared
    prefix that holds every image span and no supervised token, and a segment that starts unsupervised (its
    first token is never a target). The rest stay rows of their own. image_ids: v1's 50 span ids, or 3v's one
    `<|image_pad|>` id (generation "3v": each image a run of 64 of it)."""
    groups: dict[tuple, list[Sample]] = {}
    for s in samples:
        key = tuple(image_ref_key(ref) for ref in s.images)
        groups.setdefault(key if key else ("text", s.id), []).append(s)
    rows: list[Sample] = []
    for members in groups.values():
        open_row: list[Sample] = []
        prefix = images_end = 0
        for s in members:
            if open_row:
                p = min(prefix, shared_prefix(open_row[0].input_ids, s.input_ids))
                length = p + sum(len(m.input_ids) - p for m in (*open_row, s))
                # every image span inside the shared prefix; no target in it or at a segment's first token
                if len(open_row) < per_row and length <= max_seq_len and 0 < images_end <= p and \
                        all(_unsupervised_through(m, p) for m in (*open_row, s)):
                    open_row.append(s)
                    prefix = p
                    continue
                rows.append(_packed_row(open_row, prefix))
            open_row, prefix, images_end = [s], len(s.input_ids), _images_end(s, image_ids, generation)
        if open_row:
            rows.append(_packed_row(open_row, prefix))
    return rows


def _images_end(s: Sample, image_ids: torch.Tensor, generation: str = "v1") -> int:
    """Where the sample's last image span ends (0 without images, or when not every image has its whole span)."""
    if not s.images:
        return 0
    if generation == "3v":
        runs = image_runs(s.input_ids, int(image_ids))
        whole = len(runs) == len(s.images) and all(length == V3_IMAGE_TOKENS for _, length in runs)
        return runs[-1][0] + V3_IMAGE_TOKENS if whole else 0
    _, starts = find_image_spans(torch.tensor([s.input_ids]), image_ids)
    return int(starts[-1]) + IMAGE_TOKENS if starts.numel() == len(s.images) else 0


def _unsupervised_through(s: Sample, position: int) -> bool:
    """No label at positions 0..position (the shared prefix and the segment's first token)."""
    return position < len(s.labels) and all(label == IGNORE_INDEX for label in s.labels[:position + 1])


def _packed_row(members: list[Sample], prefix: int) -> Sample:
    if len(members) == 1:
        return members[0]
    first = members[0]
    ids, labels, segment_ids = first.input_ids[:prefix], first.labels[:prefix], [0] * prefix
    for k, m in enumerate(members, start=1):
        ids, labels = ids + m.input_ids[prefix:], labels + m.labels[prefix:]
        segment_ids += [k] * (len(m.input_ids) - prefix)
    return Sample(f"{first.id}(+{len(members) - 1})", first.images, ids, labels, segment_ids)
