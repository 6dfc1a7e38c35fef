"""Frozen-CLIP feature cache: each image is encoded once into memory-mapped fp16 shards.

Layout: DIR/<encoder fingerprint>/shard_XXXXX.npy ([n, 50, hidden] float16) + index.json
({image realpath: [shard, row, size, mtime_ns]} for image files, {"blake2b:<content hash>": [shard, row, 0, 0]} for
images stored in parquet data, and the images that failed to decode). The fingerprint
covers the encoder weights and the preprocessing, so a change of either starts a fresh store instead of
reading stale features. Later epochs and the SFT stage reuse what pretraining encoded.
"""
from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from checkpoints.files import atomic_write
from model.vision import VisionEncoder
from data_pipeline.image_decode import ImageError

from .images import ImageRef, open_image_ref
from .parquet import ParquetImage

if TYPE_CHECKING:
    from .dataset import Batch

log = logging.getLogger("minimind")


def batch_features(batch: "Batch", encoder: VisionEncoder, device: torch.device) -> Optional[torch.Tensor]:
    """The one path from a batch's images to the features the model eats: the cached features when the batch
    carries them (read from a FeatureStore by the dataset), otherwise the frozen encoder run on its pixels;
    None for a batch of text-only rows."""
    if batch.features is not None:
        return batch.features.to(device, non_blocking=True).float()
    if batch.pixels is None:
        return None
    return encoder.encode_pixels(batch.pixels.to(device, non_blocking=True))


def _stat_key(ref: ImageRef) -> tuple[str, int, int]:
    """The index key of an image and what makes its entry fresh (parquet images are content-addressed)."""
    if isinstance(ref, ParquetImage):
        return ref.key, 0, 0
    st = os.stat(ref)
    return os.path.realpath(ref), st.st_size, st.st_mtime_ns


def _key(ref: ImageRef) -> str:
    return ref.key if isinstance(ref, ParquetImage) else os.path.realpath(ref)


class _Pixels(Dataset):
    def __init__(self, paths: list[ImageRef], encoder: VisionEncoder):
        self.paths, self.preprocess = paths, encoder.preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.preprocess(open_image_ref(self.paths[i])), ""
        except ImageError as e:
            return i, torch.zeros(3, self.preprocess.size, self.preprocess.size), str(e)


class FeatureStore:
    """Public API: `ensure` (encode what is missing), `reload` (re-read the index another process wrote),
    `get` (one image's features), `len()` (images stored)."""

    def __init__(self, root: str, fingerprint: str):
        self.dir = os.path.join(root, fingerprint)
        os.makedirs(self.dir, exist_ok=True)
        self.index_file = os.path.join(self.dir, "index.json")
        self._shards: dict[int, np.ndarray] = {}
        self.reload()

    def __len__(self) -> int:
        return len(self.entries)

    def reload(self) -> None:
        """Read the index from disk (after another rank filled the store)."""
        if os.path.exists(self.index_file):
            data = json.loads(open(self.index_file).read())
        else:
            data = {"entries": {}, "failed": {}, "n_shards": 0}
        self.entries: dict[str, list] = data["entries"]
        self.failed: dict[str, str] = data["failed"]
        self.n_shards: int = data["n_shards"]

    def _fresh(self, path: ImageRef) -> Optional[list]:
        real, size, mtime = _stat_key(path)
        entry = self.entries.get(real)
        return entry if entry is not None and entry[2:] == [size, mtime] else None

    def missing(self, paths: list[ImageRef]) -> list[ImageRef]:
        return [p for p in paths if self._fresh(p) is None and _key(p) not in self.failed]

    def ensure(self, paths: list[ImageRef], encoder: VisionEncoder, batch_size: int = 64, num_workers: int = 0) -> int:
        """Encode the images that have no fresh entry yet into a new shard; returns how many were encoded."""
        todo = self.missing(paths)
        if not todo:
            return 0
        shard_id = self.n_shards
        shard_path = os.path.join(self.dir, f"shard_{shard_id:05d}.npy")
        tmp_path = shard_path + ".partial.npy"
        out = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=np.float16,
                                        shape=(len(todo), 50, encoder.hidden_size))
        loader = DataLoader(_Pixels(todo, encoder), batch_size=batch_size, num_workers=num_workers)
        failed: dict[str, str] = {}
        from tqdm import tqdm

        for idx, pixels, errors in tqdm(loader, desc="encoding images (feature cache)", unit="batch",
                                        disable=len(todo) < 2 * batch_size):
            feats = encoder.encode_pixels(pixels).cpu().numpy().astype(np.float16)
            out[idx.numpy()] = feats
            for i, err in zip(idx.tolist(), errors):
                if err:
                    failed[_key(todo[i])] = err
        out.flush()
        del out
        os.replace(tmp_path, shard_path)
        for row, p in enumerate(todo):
            real, size, mtime = _stat_key(p)
            if real not in failed:
                self.entries[real] = [shard_id, row, size, mtime]
        self.failed.update(failed)
        self.n_shards += 1
        data = json.dumps({"entries": self.entries, "failed": self.failed, "n_shards": self.n_shards})
        atomic_write(self.index_file, lambda f: f.write(data.encode()))
        return len(todo)

    def get(self, path: ImageRef) -> torch.Tensor:
        """Features [50, hidden] (fp16) of an image; ImageError if it failed to decode when encoded."""
        real = _key(path)
        if real in self.failed:
            raise ImageError(self.failed[real])
        entry = self.entries.get(real)
        if entry is None:
            raise KeyError(f"{path} is not in the feature cache {self.dir}")
        shard_id, row = entry[0], entry[1]
        if shard_id not in self._shards:  # opened lazily in each worker process
            self._shards[shard_id] = np.load(os.path.join(self.dir, f"shard_{shard_id:05d}.npy"), mmap_mode="r")
        return torch.from_numpy(np.array(self._shards[shard_id][row]))
