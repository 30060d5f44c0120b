"""Compile-on-first-use of the native CPU kernels in ``csrc/`` (torch.utils.cpp_extension + ninja).

The extension is built once per (sources, torch version, Python, compiler flags, host ISA)
into a cache directory, ``$XTF_CACHE`` or ``~/.cache/xtf_kernels``, under a name derived from
a hash of all of these; later imports load the cached ``.so`` without a compiler round trip.
Concurrent first uses (threads of one process or several processes, e.g. pytest-xdist or
torchrun workers) are serialised by a process lock plus an ``fcntl`` file lock on the build
directory. A machine without a working C++ compiler, ninja or the sources gets a clear
reason from :func:`native_status` instead of an exception at import time. A build (tens of
seconds) says so on stderr when it starts and ends, as does a process waiting for another's.

Sources are looked up in a source checkout (``<repo>/csrc``) and in an installed wheel
(``xtf_kernels/csrc``, copied there by setup.py). ``XTF_NATIVE_SOURCES`` overrides both.

Instruction sets: the default build targets the host (``-march=native``). ``XTF_NATIVE_ISA``
(or ``load_native(isa=...)``) picks another code path that this CPU can run, so every path the
build can take is testable on one machine: ``native`` (default), ``avx512`` (x86-64-v4),
``avx2`` (x86-64-v3) and ``baseline`` (the architecture's base ISA: SSE2 on x86-64). Each is
its own cached build; :func:`available_isas` lists those this CPU runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

_SOURCES = ("masked_ce_cpu.cpp", "masked_ce_bindings.cpp")  # compiled in parallel by ninja
_HEADERS = ("masked_ce_cpu.h",)
_FILES = (*_SOURCES, *_HEADERS)  # what must be present, and what enters the build key
# -fvisibility=hidden: several ISA builds can live in one process; each keeps its own symbols
# -fopenmp: at::parallel_for is a header template whose `#pragma omp parallel` is compiled into
# this library; without the flag the pragma is dropped and the row kernels run on one thread.
# With GCC the library links libgomp.so.1 by soname, which resolves to the copy torch has loaded
# already (one thread pool). Apple's compiler has no -fopenmp: there the kernels stay
# single-threaded; a compiler that refuses the flag elsewhere (clang++ without libomp) gets a
# second build without it (_compile).
_OPENMP = () if sys.platform == "darwin" else ("-fopenmp",)
_CFLAGS = ("-O3", "-std=c++17", "-ffp-contract=fast", "-fno-math-errno", "-fvisibility=hidden",
           "-Wno-unknown-pragmas", "-Wno-psabi")
ISAS = ("native", "avx512", "avx2", "baseline")
# x86 feature flags (/proc/cpuinfo names) each x86-64 level needs
_X86_V3 = ("avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm")  # x86-64-v3
_X86_NEEDS = {
    "avx2": _X86_V3,
    "avx512": (*_X86_V3, "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),  # x86-64-v4
}
_lock = threading.Lock()
_modules: dict[str, ModuleType] = {}
_errors: dict[str, str] = {}


def source_dir() -> Path | None:
    """The directory holding the C++ sources, or None when none is found."""
    env = os.environ.get("XTF_NATIVE_SOURCES")
    cands = [Path(env)] if env else []
    here = Path(__file__).resolve().parent
    cands += [here / "csrc", here.parent / "csrc"]
    for c in cands:
        if all((c / s).is_file() for s in _FILES):
            return c
    return None


def cache_root() -> Path:
    """``$XTF_CACHE`` or ``~/.cache/xtf_kernels``."""
    env = os.environ.get("XTF_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "xtf_kernels"


def _cpu_flags() -> str:
    """The host's CPU feature flags (part of the build key: the build uses -march=native)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def default_isa() -> str:
    """``$XTF_NATIVE_ISA`` or ``"native"``; raises ValueError naming the variable when unknown."""
    isa = os.environ.get("XTF_NATIVE_ISA", "").strip().lower() or "native"
    if isa not in ISAS:
        raise ValueError(f"XTF_NATIVE_ISA: expected one of {', '.join(ISAS)}, got {isa!r}")
    return isa


def available_isas() -> list[str]:
    """The ISA variants this CPU can run (``native`` and ``baseline`` always)."""
    flags = set(_cpu_flags().split())
    out = ["native"]
    if _is_x86():
        out += [isa for isa in ("avx512", "avx2") if all(f in flags for f in _X86_NEEDS[isa])]
    return [*out, "baseline"]


def isa_flags(isa: str) -> tuple[str, ...]:
    """Compiler flags selecting the code path of ``isa`` (one of :data:`ISAS`)."""
    if isa == "native":
        return ("-march=native",)
    if isa == "baseline":
        return ("-march=x86-64", "-mtune=generic") if _is_x86() else ()
    if not _is_x86():
        raise RuntimeError(f"isa={isa!r} is an x86-64 code path; this machine is {platform.machine()}")
    missing = [f for f in _X86_NEEDS[isa] if f not in set(_cpu_flags().split())]
    if missing:
        raise RuntimeError(f"isa={isa!r} needs CPU features this machine lacks: {', '.join(missing)}")
    return ("-march=x86-64-v4",) if isa == "avx512" else ("-march=x86-64-v3",)


def build_key(src: Path, isa: str = "native") -> str:
    """Hash of everything that makes a build reusable: sources, torch, Python, flags, ISA."""
    h = hashlib.sha256()
    for s in _FILES:
        h.update((src / s).read_bytes())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    h.update(" ".join((*_CFLAGS, *_OPENMP, *isa_flags(isa))).encode())
    h.update(_cpu_flags().encode())
    h.update(platform.machine().encode())
    return h.hexdigest()[:16]


def _compiler() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx) or shutil.which("g++") or shutil.which("clang++")


def _say(msg: str) -> None:
    """One line on stderr (the build is slow enough that silence looks like a hang)."""
    print(f"xtf_kernels: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _file_lock(path: Path, waiting: str | None = None) -> Iterator[None]:
    """An exclusive inter-process lock held while the block runs (fcntl where available).

    ``waiting`` is printed when another process holds the lock.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl

            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if waiting:
                    _say(waiting)
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX: the thread lock is all we have
            pass
        try:
            yield
        finally:
            with contextlib.suppress(ImportError):
                import fcntl

                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def load_native(verbose: bool = False, isa: str | None = None) -> ModuleType:
    """Build (first use) or load (cached) the native extension and return the module.

    ``isa``: the code path (:data:`ISAS`); default ``$XTF_NATIVE_ISA`` or ``"native"``.

    Raises:
        ValueError: ``isa`` (or ``XTF_NATIVE_ISA``) is not one of :data:`ISAS`.
        RuntimeError: with the reason, when the sources, a compiler or ninja are missing, the
            CPU cannot run ``isa``, or the build fails (the compiler output is included).
    """
    if isa is None:
        isa = default_isa()
    elif isa not in ISAS:
        raise ValueError(f"isa: expected one of {', '.join(ISAS)}, got {isa!r}")
    mod = _modules.get(isa)
    if mod is not None:
        return mod
    with _lock:
        if isa in _modules:
            return _modules[isa]
        if isa in _errors:
            raise RuntimeError(_errors[isa])
        try:
            _modules[isa] = _build(verbose, isa)
        except Exception as exc:
            err = f"{type(exc).__name__}: {exc}".strip()
            if len(err) > 2000:
                err = err[:1000] + " ... " + err[-1000:]
            _errors[isa] = err
            raise RuntimeError(err) from exc
        return _modules[isa]


def _import_so(name: str, so: Path) -> ModuleType:
    """Import an already built extension module from its shared object."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, so)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {so}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build(verbose: bool, isa: str = "native") -> ModuleType:
    if os.environ.get("XTF_DISABLE_NATIVE", "0") not in ("", "0"):
        raise RuntimeError("disabled by XTF_DISABLE_NATIVE")
    src = source_dir()
    if src is None:
        raise RuntimeError("C++ sources (csrc/masked_ce_cpu.cpp) not found next to the package")
    key = build_key(src, isa)
    name = f"xtf_native_{key}"
    build_dir = cache_root() / name
    so = build_dir / f"{name}.so"
    done = build_dir / "BUILD_OK"
    import torch  # noqa: F401  (the extension links against libtorch: load it first)

    if done.is_file() and so.is_file():  # cached: no compiler or ninja needed
        return _import_so(name, so)
    if _compiler() is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++/clang++)")
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not available (pip install ninja)")
    build_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(build_dir / ".lock", waiting=f"waiting for another process compiling the native CPU kernels in {build_dir}"):
        if done.is_file() and so.is_file():  # another process finished the build meanwhile
            return _import_so(name, so)
        what = "" if isa == "native" else f" ({isa} code path)"
        _say(f"compiling the native CPU kernels{what} (first use on this machine, 30-60 s) into {build_dir} ...")
        t0 = time.perf_counter()
        mod = _compile(name, src, build_dir, isa, verbose)
        done.write_text(f"{key}\n")
        _say(f"native CPU kernels compiled in {time.perf_counter() - t0:.0f} s (cached for later runs)")
        return mod


def _compile(name: str, src: Path, build_dir: Path, isa: str, verbose: bool) -> ModuleType:
    """The extension built with OpenMP; where the compiler cannot (e.g. clang++ without libomp),
    built again without it, its row kernels then on one thread."""
    from torch.utils import cpp_extension

    for omp in (_OPENMP, ()) if _OPENMP else ((),):
        try:  # (load appends to the lists it is given: fresh ones each time)
            return cpp_extension.load(name=name, sources=[str(src / s) for s in _SOURCES],
                                      extra_cflags=[*_CFLAGS, *omp, *isa_flags(isa)], extra_ldflags=list(omp),
                                      build_directory=str(build_dir), verbose=verbose)
        except Exception as exc:  # noqa: BLE001 (the build's own error, re-raised without OpenMP)
            if not omp:
                raise
            first = str(exc).strip().splitlines()[-1:] or [type(exc).__name__]
            _say(f"the build with {' '.join(omp)} failed ({first[0][:200]}); building without OpenMP "
                 "(the row kernels will run on one thread)")
    raise AssertionError("unreachable")


def native_status() -> tuple[bool, str]:
    """(True, build description) when the extension loads here, else (False, why not)."""
    try:
        mod = load_native()
    except (RuntimeError, ValueError) as exc:
        return False, str(exc)
    return True, mod.build_info()
