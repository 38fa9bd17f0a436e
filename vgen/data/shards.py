"""Image shards: safetensors files of uint8 NCHW images, written in bounded memory, read by memmap.

A shard holds `images` (uint8, N x 3 x R x R) and `ids` (int64, N: the dataset-wide image ids of
the rows, a check that index and shard agree). Shards are capped in bytes so that neither writing
nor reading ever needs more than one shard's worth of memory.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from vgen.atomic import atomic_path
from vgen.errors import ManifestError
from vgen.manifest import sha256_file


class ShardWriter:
    """Append images of one split; every `rows_per_shard` images become one shard file."""

    def __init__(self, directory: Path, split: str, resolution: int, rows_per_shard: int):
        self.directory = directory
        self.split = split
        self.shape = (3, resolution, resolution)
        self.rows_per_shard = rows_per_shard
        self.buffer = np.empty((rows_per_shard, *self.shape), dtype=np.uint8)
        self.ids = np.empty(rows_per_shard, dtype=np.int64)
        self.fill = 0
        self.shards: list[dict] = []  # manifest entries of the shards written so far

    @property
    def next_location(self) -> tuple[str, int]:
        """(shard file, row) that the next appended image will get."""
        return self._name(len(self.shards)), self.fill

    def _name(self, number: int) -> str:
        return f"shards/{self.split}-{number:05d}.safetensors"

    def append(self, image_id: int, chw: np.ndarray) -> None:
        self.buffer[self.fill] = chw
        self.ids[self.fill] = image_id
        self.fill += 1
        if self.fill == self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        name = self._name(len(self.shards))
        path = self.directory / name
        tensors = {"images": self.buffer[: self.fill], "ids": self.ids[: self.fill]}
        with atomic_path(path) as tmp:
            # No safetensors metadata: its key order varies between processes, which would make
            # identical shards hash differently. The dataset manifest describes the shards.
            save_file(tensors, str(tmp))
        self.shards.append({"file": name, "split": self.split, "rows": self.fill, "sha256": sha256_file(path)})
        self.fill = 0


def rows_per_shard(resolution: int, shard_mb: float) -> int:
    return max(1, int(shard_mb * 2**20) // (3 * resolution * resolution))


def open_shard(path: Path) -> dict[str, np.ndarray]:
    """Memory-map the tensors of a shard without reading them (the safetensors layout is simple:
    an 8-byte little-endian header length, a JSON header with dtype/shape/offsets, then raw data)."""
    dtypes = {"U8": np.uint8, "I64": np.int64}
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > 100 * 2**20:
                raise ValueError(f"header length {header_len} is implausible")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, struct.error) as e:
        raise ManifestError(f"{path}: not a readable safetensors shard ({e})") from None
    size = os.path.getsize(path)
    arrays = {}
    for name in ("images", "ids"):
        info = header.get(name)
        if not info or info.get("dtype") not in dtypes:
            raise ManifestError(f"{path}: shard lacks tensor '{name}' of a supported dtype")
        start, end = info["data_offsets"]
        offset = 8 + header_len + start
        if offset + (end - start) > size:
            raise ManifestError(f"{path}: tensor '{name}' extends past the end of the file (truncated?)")
        arrays[name] = np.memmap(path, dtype=dtypes[info["dtype"]], mode="r", offset=offset, shape=tuple(info["shape"]))
    return arrays
