"""Atomic Parquet shards and the distributed reductions of the pipeline.

A shard file appears only complete: it is written to a temporary name in the same directory,
fsynced and renamed (``os.replace`` is atomic on POSIX), so an interrupted run leaves either the
old state or the new shard, never a torn file, and a resumed run skips shards already present.

Temporary names carry their writer, ``.<final name>.<pid>@<host>.<random>.tmp``, so a later
run can tell a file left by a killed process (see :mod:`xtf_kernels.xtf.rundir`) from one a
live process is still writing. They are created with mode ``0o666`` minus the umask, as
``open()`` would, so the results are as readable as any other file the user creates.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import torch

__all__ = [
    "write_table_atomic",
    "write_json_atomic",
    "atomic_path",
    "create_tmp",
    "host_tag",
    "parse_tmp_name",
    "raise_if_any_rank_failed",
    "RankFailedError",
    "read_shard",
    "shard_ok",
    "dist_info",
    "all_reduce_sum",
    "barrier",
]

_TMP_RE = re.compile(r"^\.(?P<final>.+)\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.(?P<rand>[0-9a-f]{8})\.tmp$")


@functools.cache
def host_tag() -> str:
    """This machine as ``[A-Za-z0-9-]``: host name, plus the PID namespace where Linux has one.

    Two writers with the same tag share a process table, so a pid can be checked for life.
    """
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:48] or "host"
    try:
        ns = re.sub(r"\D", "", os.readlink("/proc/self/ns/pid"))
    except OSError:
        ns = ""
    return f"{host}-ns{ns}" if ns else host


def parse_tmp_name(name: str) -> tuple[str, int, str] | None:
    """``(final name, writer pid, writer host tag)`` of a temp name made here, else None."""
    m = _TMP_RE.match(name)
    if m is None:
        return None
    return m["final"], int(m["pid"]), m["host"]


def create_tmp(path: str | os.PathLike) -> Path:
    """Create an empty temp file next to ``path`` (``O_EXCL``, mode ``0o666`` minus the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}@{host_tag()}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temp path next to ``path``; on success it is fsynced and renamed to ``path``.

    The temp file exists (empty, see :func:`create_tmp`) before the block runs; the block
    writes it by name. On any exception (KeyboardInterrupt included) the temp file is removed
    and ``path`` is untouched.
    """
    path = Path(path)
    tmp = create_tmp(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_table_atomic(table: pa.Table, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``table`` to ``path`` as Parquet atomically (temp file + fsync + rename)."""
    path = Path(path)
    if metadata:
        meta = dict(table.schema.metadata or {})
        meta.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp), compression="zstd")
    return path


def write_json_atomic(obj, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented, key-sorted JSON atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
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
    torch = sys.modules.get("torch")  # no process group before torch is imported (``xtf export``)
    dist = None if torch is None else torch.distributed
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _reduce_device() -> torch.device:
    import torch

    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(arr: np.ndarray, op: str) -> np.ndarray:
    """``arr`` reduced over ranks with ``torch.distributed.ReduceOp.<op>`` (a copy on one rank)."""
    a = np.ascontiguousarray(arr)
    if dist_info()[1] == 1:
        return a.copy()
    import torch

    t = torch.from_numpy(a.copy()).to(_reduce_device())
    torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op))
    return t.cpu().numpy()


def all_reduce_sum(arr: np.ndarray) -> np.ndarray:
    """Sum a NumPy array over all ranks (identity without a process group). int64 sums are exact."""
    return _all_reduce(arr, "SUM")


def all_reduce_max(arr: np.ndarray) -> np.ndarray:
    """Element-wise max over ranks."""
    return _all_reduce(arr, "MAX")


def barrier() -> None:
    """Wait for all ranks (no-op without a process group)."""
    if dist_info()[1] > 1:
        import torch

        torch.distributed.barrier()


class RankFailedError(RuntimeError):
    """Another rank failed a collective step (its own message says why)."""


def raise_if_any_rank_failed(exc: BaseException | None) -> None:
    """Collective: re-raise ``exc`` where a rank failed, and fail the others with a pointer to it.

    Call it on every rank after a step only some ranks may fail (e.g. rank 0 checking the
    output directory), so no rank is left waiting in a barrier for one that gave up.
    """
    rank, world = dist_info()
    if world > 1:
        flags = np.zeros(world, dtype=np.int64)
        flags[rank] = exc is not None
        failed = np.flatnonzero(all_reduce_sum(flags)).tolist()
    else:
        failed = [0] if exc is not None else []
    if exc is not None:
        raise exc
    if failed:
        raise RankFailedError(f"rank(s) {failed} failed; see the message printed by rank {failed[0]}")
