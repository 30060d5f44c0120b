"""Atomic Parquet shards and the distributed reductions of the pipeline.

A shard file appears only complete: it is written to a temporary name in the same directory,
fsynced and renamed (``os.replace`` is atomic on POSIX), so an interrupted run leaves either the
old state or the new shard, never a torn file, and a resumed run skips shards already present.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

__all__ = [
    "write_table_atomic",
    "write_json_atomic",
    "read_shard",
    "shard_ok",
    "dist_info",
    "all_reduce_sum",
    "barrier",
]


def write_table_atomic(table: pa.Table, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``table`` to ``path`` as Parquet atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if metadata:
        meta = dict(table.schema.metadata or {})
        meta.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(meta)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json_atomic(obj, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented, key-sorted JSON atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def shard_ok(path: str | os.PathLike, expect: dict[str, str] | None = None) -> bool:
    """True when ``path`` is a readable Parquet file whose metadata contains ``expect``."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        meta = pq.read_schema(p).metadata or {}
    except Exception:
        return False
    for k, v in (expect or {}).items():
        if meta.get(k.encode()) != v.encode():
            return False
    return True


def read_shard(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """Read one shard (optionally a subset of columns)."""
    return pq.read_table(path, columns=columns)


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _reduce_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(arr: np.ndarray, op: torch.distributed.ReduceOp) -> np.ndarray:
    a = np.ascontiguousarray(arr)
    if dist_info()[1] == 1:
        return a.copy()
    t = torch.from_numpy(a.copy()).to(_reduce_device())
    torch.distributed.all_reduce(t, op=op)
    return t.cpu().numpy()


def all_reduce_sum(arr: np.ndarray) -> np.ndarray:
    """Sum a NumPy array over all ranks (identity without a process group). int64 sums are exact."""
    return _all_reduce(arr, torch.distributed.ReduceOp.SUM)


def all_reduce_max(arr: np.ndarray) -> np.ndarray:
    """Element-wise max over ranks."""
    return _all_reduce(arr, torch.distributed.ReduceOp.MAX)


def barrier() -> None:
    """Wait for all ranks (no-op without a process group)."""
    if dist_info()[1] > 1:
        torch.distributed.barrier()
