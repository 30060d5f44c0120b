"""Environment report: ``python -m xtf_kernels.info``.

Prints the versions that matter (Python, torch, triton, the compiler toolchain), the devices,
and every masked-CE backend with whether it is usable here and, when not, why. Building the
native backend on first use happens here too (once; later runs load the cached build).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from typing import Any


def _version(mod: str) -> str:
    try:
        m = __import__(mod)
    except Exception as exc:  # any import failure is reported, not raised
        return f"not importable ({type(exc).__name__})"
    return str(getattr(m, "__version__", "unknown"))


def collect() -> dict[str, Any]:
    """Everything the report prints, as a JSON-serialisable dict.

    Keys: ``python``, ``platform``, ``versions`` {package: version}, ``devices`` (list of
    str), ``cpu`` {threads, isa flags}, ``toolchain`` {compiler, ninja}, ``backends``
    {name: {"available": bool, "reason": str}}, ``native_cache`` (str).
    """
    import torch

    import xtf_kernels
    from xtf_kernels._native_build import cache_root

    versions = {
        "xtf_kernels": xtf_kernels.__version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
    }
    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            devices.append(f"cuda:{i} {torch.cuda.get_device_name(i)}")
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in have]
                    break
    except OSError:
        pass
    cxx = os.environ.get("CXX", "c++")
    toolchain = {
        "compiler": shutil.which(cxx) or shutil.which("g++") or shutil.which("clang++") or "none",
        "ninja": shutil.which("ninja") or "none",
    }
    backends = {
        name: {"available": ok, "reason": why}
        for name, (ok, why) in xtf_kernels.backend_status().items()
    }
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "devices": devices,
        "cpu": {"threads": torch.get_num_threads(), "isa": flags, "mkldnn": torch.backends.mkldnn.is_available()},
        "toolchain": toolchain,
        "backends": backends,
        "native_cache": str(cache_root()),
    }


def format_report(info: dict[str, Any]) -> str:
    """Human-readable text of :func:`collect`'s dict."""
    lines = [f"xtf_kernels {info['versions']['xtf_kernels']}  (python {info['python']}, {info['platform']})"]
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if k != "xtf_kernels"))
    lines.append("devices:  " + "; ".join(info["devices"]))
    cpu = info["cpu"]
    lines.append(f"cpu:      {cpu['threads']} threads, ISA {' '.join(cpu['isa']) or '-'}, oneDNN {cpu['mkldnn']}")
    lines.append(f"compiler: {info['toolchain']['compiler']}, ninja: {info['toolchain']['ninja']}")
    lines.append(f"native build cache: {info['native_cache']}")
    lines.append("backends:")
    for name, st in info["backends"].items():
        mark = "yes" if st["available"] else "no "
        lines.append(f"  {name:<7} {mark} {st['reason']}".rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the report (``--json`` for machine-readable output). Returns the exit code 0."""
    ap = argparse.ArgumentParser(prog="python -m xtf_kernels.info", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
