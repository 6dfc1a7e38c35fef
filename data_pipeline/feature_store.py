"""Frozen-CLIP feature cache: each image is encoded once into memory-mapped fp16 shards.

Layout: DIR/<encoder fingerprint>/shard_XXXXX.npy ([rows, tokens, hidden] float16) + index.json
{"version": 2, "hidden": hidden, "tokens": features per image (50 for CLIP, 64 for 3v's SigLIP2; an index without
it holds 50), "shards": [rows of each shard],
 "entries": {image realpath: [shard, row, size, mtime_ns]} for image files, {"blake2b:<content hash>": [shard, row,
 0, 0]} for images stored in parquet data, "failed": {image: why it did not decode}}.
The fingerprint covers the encoder weights and the preprocessing, so a change of either starts a fresh store instead
of reading stale features. Later epochs and the SFT stage reuse what pretraining encoded.

Several runs may share one cache: a writer holds an exclusive lock (flock on DIR/<fingerprint>/.lock) while it
re-reads the index, encodes what is still missing into a new shard and publishes it (shard first, index last, each
by an atomic rename); a shard, once published, is never rewritten, so a reader's index always names the features
it was written with. Everything read is checked (index schema, each shard's dtype, shape and size against the
index); damage is a FeatureCacheError naming the file and saying how to rebuild.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from checkpoints.files import CheckpointError, atomic_write, first_line, read_json_object, remove_stale_temp_files
from data_pipeline.image_decode import ImageError
from model.vision import VisionEncoder

from .images import ImageRef, open_image_ref
from .parquet import ParquetImage
from .records import DataError

if TYPE_CHECKING:
    from .dataset import Batch

log = logging.getLogger("minimind")

INDEX_VERSION = 2
TOKENS = 50  # features per image of an index that does not say: CLIP ViT-B/32 at 224 px, 49 patches and CLS
LOCK_NAME = ".lock"
PARTIAL_SUFFIX = ".partial.npy"  # a shard being written; only a killed writer leaves one behind


class FeatureCacheError(DataError):
    """A feature cache that is not as it was written; the message names the file and says how to rebuild."""


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


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_npy_header(path: str) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran order, data offset) from a .npy file's header, reading nothing else; ValueError for
    a file that is not a .npy array (FileNotFoundError passes through)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, fortran, dtype = readers[version](f)
        return tuple(shape), dtype, fortran, f.tell()


class FeatureStore:
    """Public API: `ensure` (encode what is missing), `reload` (re-read the index another process wrote),
    `get` (one image's features), `len()` (images stored). FeatureCacheError for a damaged cache."""

    def __init__(self, root: str, fingerprint: str):
        self.dir = os.path.join(root, fingerprint)
        os.makedirs(self.dir, exist_ok=True)
        self.index_file = os.path.join(self.dir, "index.json")
        self._shards: dict[int, np.ndarray] = {}
        self.reload()

    def __len__(self) -> int:
        return len(self.entries)

    def __getstate__(self) -> dict[str, Any]:
        # a DataLoader worker started by spawn reopens the shards itself (pickling a memmap would copy it whole)
        return {**self.__dict__, "_shards": {}}

    def _damaged(self, file: str, what: str) -> FeatureCacheError:
        return FeatureCacheError(f"{file}: {what}; {self._rebuild_hint()}")

    def _rebuild_hint(self) -> str:
        return f"delete {self.dir} to rebuild the feature cache (its images are encoded again on the next run)"

    def _shard_path(self, shard_id: int) -> str:
        return os.path.join(self.dir, f"shard_{shard_id:05d}.npy")

    def reload(self) -> None:
        """Read and check the index and the shards it names (after another rank or run filled the store)."""
        data: dict[str, Any] = {"version": INDEX_VERSION, "hidden": None, "shards": [], "entries": {}, "failed": {}}
        if os.path.exists(self.index_file):
            try:
                data = read_json_object(self.index_file, "feature cache index", self._rebuild_hint())
            except CheckpointError as e:
                raise FeatureCacheError(str(e)) from None
        self.entries, self.failed, self.shard_rows, self.hidden = self._checked_index(data)
        self.tokens = data.get("tokens", TOKENS)
        if not (_is_count(self.tokens) and self.tokens > 0):
            raise self._damaged(self.index_file, "not a feature cache index ('tokens' is not a count of features)")
        self._shards = {shard_id: self._open_shard(shard_id) for shard_id in range(len(self.shard_rows))}
        for key, (shard_id, row, _, _) in self.entries.items():
            if row >= self.shard_rows[shard_id]:
                rows = self.shard_rows[shard_id]
                raise self._damaged(self.index_file, f"index entry {key[-80:]!r} names row {row} of shard "
                                                     f"{shard_id}, which has {rows} rows")

    def _checked_index(self, data: dict[str, Any]) -> tuple[dict[str, list], dict[str, str], list, Optional[int]]:
        """entries, failed, the rows of each shard (None where the index does not record them) and the feature
        width (None where unknown) of an index, its schema checked."""
        def bad(what: str) -> FeatureCacheError:
            return self._damaged(self.index_file, f"not a feature cache index ({what})")

        entries, failed = data.get("entries"), data.get("failed")
        if not isinstance(entries, dict):
            raise bad("'entries' is missing or not an object")
        if not isinstance(failed, dict) or not all(isinstance(v, str) for v in failed.values()):
            raise bad("'failed' is missing or not an object of image -> reason")
        if "version" not in data:  # the layout before version 2: {"entries", "failed", "n_shards"}
            if not _is_count(data.get("n_shards")):
                raise bad("'n_shards' is missing or not a count")
            shard_rows, hidden = [None] * data["n_shards"], None
        elif data["version"] != INDEX_VERSION:
            raise bad(f"version {data['version']!r}; this software reads version {INDEX_VERSION}")
        else:
            shard_rows, hidden = data.get("shards"), data.get("hidden")
            if not isinstance(shard_rows, list) or not all(_is_count(n) and n > 0 for n in shard_rows):
                raise bad("'shards' is missing or not a list of row counts")
            if not (hidden is None and not shard_rows) and not (_is_count(hidden) and hidden > 0):
                raise bad("'hidden' is missing or not a feature width")
        for key, entry in entries.items():
            if not (isinstance(entry, list) and len(entry) == 4 and all(_is_count(v) for v in entry[:3])
                    and isinstance(entry[3], int) and entry[0] < len(shard_rows)):
                raise bad(f"entry {key[-80:]!r} is {str(entry)[:60]}, not [shard, row, size, mtime] of one of its "
                          f"{len(shard_rows)} shards")
        return entries, failed, list(shard_rows), hidden

    def _open_shard(self, shard_id: int) -> np.ndarray:
        """A shard memory-mapped read-only, after checking it is the float16 [rows, tokens, hidden] array the index
        names, whole; the first shard of an index that does not record them gives the rows and the width."""
        path = self._shard_path(shard_id)
        try:
            shape, dtype, fortran, offset = read_npy_header(path)
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise self._damaged(path, "shard missing (the index names it)") from None
        except (ValueError, OSError, EOFError, SyntaxError) as e:
            raise self._damaged(path, f"not a .npy array of features ({first_line(e)})") from None
        rows = self.shard_rows[shard_id] if self.shard_rows[shard_id] is not None else (shape or [0])[0]
        hidden = self.hidden if self.hidden is not None else (shape[2] if len(shape) == 3 else 0)
        expected = (rows, self.tokens, hidden)
        if dtype != np.float16 or fortran or shape != expected or rows == 0:
            wanted = expected if hidden else f"(rows, {self.tokens}, hidden)"
            raise self._damaged(path, f"holds dtype {dtype}, shape {shape}; the index expects dtype float16, shape "
                                      f"{wanted}")
        needed = offset + math.prod(shape) * dtype.itemsize
        if size != needed:
            what = "truncated" if size < needed else "longer than its array"
            raise self._damaged(path, f"{what}: {size} bytes where a float16 shard of shape {shape} has {needed} bytes")
        self.shard_rows[shard_id], self.hidden = rows, hidden
        return np.memmap(path, dtype=np.float16, mode="r", offset=offset, shape=shape)

    def _fresh(self, path: ImageRef) -> Optional[list]:
        real, size, mtime = _stat_key(path)
        entry = self.entries.get(real)
        return entry if entry is not None and entry[2:] == [size, mtime] else None

    def missing(self, paths: list[ImageRef]) -> list[ImageRef]:
        return [p for p in paths if self._fresh(p) is None and _key(p) not in self.failed]

    @contextmanager
    def _writer_lock(self) -> Iterator[None]:
        """Held while a writer reads the index, encodes and publishes: one writer per cache at a time, across
        processes and machines sharing a POSIX file system (flock is released when its process dies)."""
        import fcntl  # POSIX only; imported here so that reading a filled cache needs no lock

        with open(os.path.join(self.dir, LOCK_NAME), "a") as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("feature cache %s: waiting for another run that is filling it", self.dir)
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def ensure(self, paths: list[ImageRef], encoder: VisionEncoder, batch_size: int = 64, num_workers: int = 0) -> int:
        """Encode the images that have no fresh entry yet into a new shard; returns how many were encoded (not
        counting those another run encoded meanwhile). A filled cache is only read (it may be read-only)."""
        if not self.missing(paths):
            return 0
        with self._writer_lock():
            self.reload()  # what other runs published since this store was opened
            if self.hidden is not None and self.hidden != encoder.hidden_size:
                raise self._damaged(self.index_file, f"holds features of width {self.hidden}, but the encoder of "
                                                     f"this fingerprint gives {encoder.hidden_size}")
            if self.shard_rows and self.tokens != encoder.tokens:
                raise self._damaged(self.index_file, f"holds {self.tokens} features per image, but the encoder of "
                                                     f"this fingerprint gives {encoder.tokens}")
            todo = self.missing(paths)
            if not todo:
                return 0
            self._remove_leftovers()
            shard_id = len(self.shard_rows)
            failed = self._write_shard(shard_id, todo, encoder, batch_size, num_workers)
            entries = dict(self.entries)
            for row, p in enumerate(todo):
                real, size, mtime = _stat_key(p)
                if real not in failed:
                    entries[real] = [shard_id, row, size, mtime]
            self._write_index(entries, {**self.failed, **failed}, self.shard_rows + [len(todo)], encoder.hidden_size,
                              encoder.tokens)
            self.reload()
        return len(todo)

    def _remove_leftovers(self) -> None:
        """Delete what killed writers left (half-written shards, index temp files): under the writer lock, no
        live writer has any."""
        for name in os.listdir(self.dir):
            if name.endswith(PARTIAL_SUFFIX):
                try:
                    os.unlink(os.path.join(self.dir, name))
                except FileNotFoundError:
                    pass
        remove_stale_temp_files([self.index_file])

    def _write_shard(self, shard_id: int, todo: list[ImageRef], encoder: VisionEncoder, batch_size: int,
                     num_workers: int) -> dict[str, str]:
        """Encode `todo` into shard `shard_id` through a file of its own name, published by an atomic rename;
        returns the images that failed to decode (their rows hold zeros)."""
        fd, tmp_path = tempfile.mkstemp(prefix=f".shard_{shard_id:05d}.", suffix=PARTIAL_SUFFIX, dir=self.dir)
        os.close(fd)
        try:
            out = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=np.float16,
                                            shape=(len(todo), encoder.tokens, encoder.hidden_size))
            failed = _encode_into(out, todo, encoder, batch_size, num_workers)
            out.flush()
            del out
            with open(tmp_path, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, self._shard_path(shard_id))
        except BaseException:
            if os.path.exists(tmp_path):
                os.unlink(tmp_path)
            raise
        return failed

    def _write_index(self, entries: dict[str, list], failed: dict[str, str], shard_rows: list[int],
                     hidden: int, tokens: int) -> None:
        data = {"version": INDEX_VERSION, "hidden": hidden, "tokens": tokens, "shards": shard_rows, "entries": entries,
                "failed": failed}
        encoded = json.dumps(data).encode()
        atomic_write(self.index_file, lambda f: f.write(encoded))

    def get(self, path: ImageRef) -> torch.Tensor:
        """Features [tokens, hidden] (fp16) of an image; ImageError if it failed to decode when encoded."""
        real = _key(path)
        if real in self.failed:
            raise ImageError(self.failed[real])
        entry = self.entries.get(real)
        if entry is None:
            raise KeyError(f"{path} is not in the feature cache {self.dir}")
        shard_id, row = entry[0], entry[1]
        if shard_id not in self._shards:  # opened again in a worker process started by spawn
            self._shards[shard_id] = self._open_shard(shard_id)
        return torch.from_numpy(np.array(self._shards[shard_id][row]))


def _encode_into(out: np.ndarray, todo: list[ImageRef], encoder: VisionEncoder, batch_size: int,
                 num_workers: int) -> dict[str, str]:
    """Encode the images of `todo` into the rows of `out`; the images that failed to decode, with why."""
    from tqdm import tqdm

    loader = DataLoader(_Pixels(todo, encoder), batch_size=batch_size, num_workers=num_workers)
    failed: dict[str, str] = {}
    for idx, pixels, errors in tqdm(loader, desc="encoding images (feature cache)", unit="batch",
                                    disable=len(todo) < 2 * batch_size):
        out[idx.numpy()] = encoder.encode_pixels(pixels).cpu().numpy().astype(np.float16)
        for i, err in zip(idx.tolist(), errors):
            if err:
                failed[_key(todo[i])] = err
    return failed
