"""The layout of a run directory, and what may be created, replaced or removed in it.

A scored run ``out/`` holds ``config.json`` (settings + fingerprint), ``summary.json``,
``pass1/shard-NNNNN.parquet``, ``tokens/shard-NNNNN.parquet`` and, after ``xtf report``,
``report/index.html`` with its PNG plots. The user may keep other files there: this module
only ever deletes the names above and the temp files the writers in :mod:`.shards` create.

Temp files left by a killed writer are removed only when no live process can own them: the
writer (pid, host and PID namespace are in the name) is a dead process of this machine, or
the file is older than this run's ``config.json`` once every rank has passed the final
barrier (no writer of this run is left; a tmp that old belongs to an earlier run).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from . import shards as sh

__all__ = [
    "PASS1",
    "TOKENS",
    "REPORT",
    "PLOT_NAMES",
    "RunExistsError",
    "check_writable_dir",
    "named_os_error",
    "check_existing_run",
    "changed_settings",
    "remove_outputs",
    "remove_stale_tmp",
]

PASS1, TOKENS, REPORT = "pass1", "tokens", "report"
PLOT_NAMES = ("hist_ri", "hist_kn", "hist_tr", "overlap")
_SHARD_RE = re.compile(r"^shard-\d{5}\.parquet$")
_TOP_FILES = ("config.json", "summary.json")
_REPORT_FILES = ("index.html", *(f"{n}.png" for n in PLOT_NAMES))
# temp names of every writer version, old (mkstemp: ".NAME.XXXXXXXX.tmp") and current
_OUR_TMP_RE = re.compile(r"^\.(shard-\d{5}\.parquet|config\.json|summary\.json|index\.html|xtf-probe)\..+\.tmp$")


class RunExistsError(FileExistsError):
    """``out_dir`` holds another run, or the same run while resuming is off.

    ``str(e)`` names the Python arguments; :meth:`describe` ``(cli=True)`` the command-line flags.
    """

    def __init__(self, out: Path, kind: str, changed: tuple[str, ...] = ()) -> None:
        self.out, self.kind, self.changed = out, kind, changed
        super().__init__(self.describe(cli=False))

    def describe(self, cli: bool, names: dict[str, str] | None = None) -> str:
        """The message; ``names`` renames changed settings (e.g. to command-line flags)."""
        ow = "--overwrite" if cli else "overwrite=True"
        if self.kind == "same_no_resume":
            res = "drop --no-resume" if cli else "pass resume=True"
            return (f"{self.out} already holds this run (same settings and data) and resuming is off: "
                    f"pass {ow} to score it again from scratch, or {res} to reuse its finished shards")
        if self.kind == "orphan":
            return (f"{self.out} holds shards but no config.json (not a complete xtf run): "
                    f"pass {ow} to replace them, or choose another output directory")
        changed = [(names or {}).get(c, c) for c in self.changed]
        what = f" ({', '.join(changed)} changed)" if changed else ""
        return (f"{self.out} holds a run with different settings or data{what}: "
                f"pass {ow} to replace it, or choose another output directory")


def check_writable_dir(path: str | os.PathLike, what: str = "out_dir") -> Path:
    """Create ``path`` (with parents) and prove a file can be written in it.

    Raises:
        NotADirectoryError: ``path`` (or a parent) is an existing file.
        OSError: the directory cannot be created or written (permission, read-only file
            system, full disk); the message names ``what`` and the directory.
    """
    p = Path(path)
    for anc in (p, *p.parents):
        if anc.exists():
            if not anc.is_dir():
                raise NotADirectoryError(f"{what}: {anc} is an existing file, not a directory")
            break
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = sh.create_tmp(p / "xtf-probe")
        probe.unlink()
    except OSError as e:
        raise named_os_error(e, f"{what}: cannot write to {p}") from e
    return p


def named_os_error(e: OSError, what: str) -> OSError:
    """The same kind of OSError with the one-line message ``"{what} ({reason})"`` (errno kept)."""
    reason = e.strerror or str(e)
    if isinstance(e, NotADirectoryError) and e.filename:
        reason = f"{e.filename} is not a directory"
    err = type(e)(f"{what} ({reason})")
    err.errno = e.errno
    return err


def changed_settings(old: dict, new: dict) -> tuple[str, ...]:
    """Names of the settings that differ (``rules`` split into its fields, e.g. ``kn_threshold``)."""
    out = [k for k in _changed({k: v for k, v in old.items() if k != "rules"},
                               {k: v for k, v in new.items() if k != "rules"})]
    ro, rn = old.get("rules") or {}, new.get("rules") or {}
    out += [k for k in sorted(set(ro) | set(rn)) if ro.get(k) != rn.get(k)]
    return tuple(out)


def _changed(old: dict, new: dict) -> tuple[str, ...]:
    names = {"examples_sha256": "data"}
    keys = sorted(set(old) | set(new))
    return tuple(names.get(k, k) for k in keys if old.get(k) != new.get(k))


def check_existing_run(out: Path, fingerprint: str, settings: dict, *, resume: bool, overwrite: bool,
                       pass1_fingerprint: str | None = None) -> bool:
    """Decide what to do with what ``out`` already holds (rank 0, before writing config.json).

    Returns True when earlier results were removed (``overwrite``, or only rule parameters
    changed: with ``pass1_fingerprint`` equal to the old run's and ``resume``, pass 1 is kept
    and the rest removed). Raises :class:`RunExistsError` when they would be clobbered or
    ignored without ``overwrite``.
    """
    cfg_path = out / "config.json"
    if cfg_path.is_file():
        try:
            old = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        same = old.get("fingerprint") == fingerprint
        if same and resume:
            return False
        if (not same and resume and not overwrite and pass1_fingerprint is not None
                and old.get("pass1_fingerprint") == pass1_fingerprint):
            remove_outputs(out, keep_pass1=True)  # only the rules changed: pass 1 is reused
            return True
        if not overwrite:
            kind = "same_no_resume" if same else "different"
            raise RunExistsError(out, kind, () if same else _changed(old.get("settings") or {}, settings))
    elif any((out / d).is_dir() and any(_SHARD_RE.match(f.name) for f in (out / d).iterdir()) for d in (PASS1, TOKENS)):
        if not overwrite:
            raise RunExistsError(out, "orphan")
    else:
        return False
    remove_outputs(out)
    return True


def _unlink(p: Path) -> bool:
    try:
        p.unlink()
        return True
    except FileNotFoundError:
        return False


def remove_outputs(out: str | os.PathLike, keep_pass1: bool = False) -> int:
    """Delete the files an xtf run wrote in ``out`` (and its default report); keep the rest.

    ``keep_pass1`` keeps ``pass1/`` (a run whose rule parameters alone change reuses it).
    Sub-directories are removed only when nothing else is left in them. Returns the number
    of files deleted.
    """
    out = Path(out)
    n = sum(_unlink(out / f) for f in _TOP_FILES)
    subs = ((TOKENS, None), (REPORT, _REPORT_FILES)) if keep_pass1 else ((PASS1, None), (TOKENS, None), (REPORT, _REPORT_FILES))
    for sub, names in subs:
        d = out / sub
        if not d.is_dir():
            continue
        for f in d.iterdir():
            ours = _SHARD_RE.match(f.name) if names is None else f.name in names
            if f.is_file() and (ours or _OUR_TMP_RE.match(f.name)):
                n += _unlink(f)
        try:
            d.rmdir()
        except OSError:  # the user's files are still there
            pass
    return n


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def remove_stale_tmp(out: str | os.PathLike, older_than: float | None = None) -> int:
    """Remove temp files that no live writer can own, in ``out`` and its shard directories.

    A temp file goes when its writer is a dead process of this machine (same host and PID
    namespace), or, with ``older_than`` (a file-system timestamp), when it was last modified
    before it. Only xtf's own temp names are considered. Returns the number removed.
    """
    out = Path(out)
    me = sh.host_tag()
    n = 0
    for d in (out, out / PASS1, out / TOKENS, out / REPORT):
        if not d.is_dir():
            continue
        for f in d.iterdir():
            if not _OUR_TMP_RE.match(f.name):
                continue
            who = sh.parse_tmp_name(f.name)
            stale = who is not None and who[2] == me and not _pid_alive(who[1])
            if not stale and older_than is not None:
                try:
                    stale = f.stat().st_mtime < older_than
                except FileNotFoundError:
                    continue
            if stale:
                n += _unlink(f)
    return n
