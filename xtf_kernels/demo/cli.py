"""``xtf demo`` / ``python -m xtf_kernels.demo``: the end-to-end comparison on embedded data.

Examples::

    xtf demo                          # default scale, 1 seed, within 240 s on 2 CPU cores
    xtf demo --smoke --out /tmp/demo  # CI-sized run, under a minute
    xtf demo --seeds 0 1 2 --ablation --readings --out runs/demo
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from dataclasses import replace

__all__ = ["add_parser", "build_parser", "main"]

#: The keys of :data:`.run.SCALES`, here so that building the parser (``xtf --help``) does not
#: import torch; a test keeps the two equal.
SCALE_NAMES: tuple[str, ...] = ("default", "medium", "smoke")


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--out", default=None, help="output directory (default: a new temporary directory)")
    p.add_argument("--smoke", action="store_true", help="tiny CI-sized run (same as --scale smoke)")
    p.add_argument("--scale", choices=SCALE_NAMES, default="default", help="model / data / budget preset")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (mean +/- std over them)")
    p.add_argument("--ablation", action="store_true", help="also fine-tune with each rule alone and each pair")
    p.add_argument("--readings", action="store_true",
                   help="also XTF under the paper preset, official with RI received, official with input-embedding TR")
    p.add_argument("--regime", choices=["full", "lora"], default=None,
                   help="fine-tuning regime (default: the scale's, chosen on the validation split)")
    p.add_argument("--eval-split", choices=["test", "validation"], default="test",
                   help="split to evaluate on (validation: for design choices; never tune on test)")
    p.add_argument("--workers", type=int, default=None, help="processes for the fine-tuning arms (default 2)")
    p.add_argument("--finetune-steps", type=int, default=None, help="override the fine-tuning budget")
    p.add_argument("--pretrain-steps", type=int, default=None, help="override the pretraining budget")
    p.add_argument("--baseline-ratio", type=float, default=None,
                   help="kept fraction for SLM / Token Cleaning (default: XTF's kept fraction)")
    p.add_argument("--scorer", choices=["auto", "framework", "builtin"], default="auto",
                   help="deprecated: the demo always scores with the framework (xtf score); 'builtin' warns")
    p.add_argument("--collect", nargs="+", default=None, metavar="DIR",
                   help="do not train: aggregate the seed results found under DIR(s) (seeds run as separate "
                        "processes) into --out")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 for the smoke/default scales, torch's default otherwise)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--quiet", action="store_true", help="print only the table and the report path")
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``demo`` subcommand on an ``argparse`` subparsers object (used by ``xtf``)."""
    if not hasattr(subparsers, "add_parser"):
        raise TypeError("subparsers: expected the object returned by ArgumentParser.add_subparsers()")
    p = subparsers.add_parser("demo", help="end-to-end XTF demo on generated math data (CPU, minutes)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(p)
    p.set_defaults(func=_run)
    return p


def build_parser() -> argparse.ArgumentParser:
    """Stand-alone parser of ``python -m xtf_kernels.demo``."""
    return _configure(argparse.ArgumentParser(prog="python -m xtf_kernels.demo", description=__doc__,
                                              formatter_class=argparse.RawDescriptionHelpFormatter))


def _run(a: argparse.Namespace) -> int:
    import torch

    threads = a.threads
    if threads is None and (a.smoke or a.scale in ("smoke", "default")):
        threads = 1  # tiny matmuls: one thread is faster than two, and much faster on a busy CPU
    if threads is not None and threads < 1:
        raise ValueError(f"--threads: expected a positive int, got {threads}")
    prev = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_inner(a, threads)
    finally:
        torch.set_num_threads(prev)


def _run_inner(a: argparse.Namespace, threads: int | None) -> int:
    import torch

    from .aggregate import collect
    from .report import comparison_table, detection_table
    from .run import SCALES, run_demo

    cfg = SCALES["smoke" if a.smoke else a.scale]
    over = {}
    for flag, key in (("finetune_steps", "finetune_steps"), ("pretrain_steps", "pretrain_steps")):
        v = getattr(a, flag)
        if v is not None:
            if v < 1:
                raise ValueError(f"--{flag.replace('_', '-')}: expected a positive int, got {v}")
            over[key] = v
    if a.baseline_ratio is not None:
        if not 0.0 < a.baseline_ratio <= 1.0:
            raise ValueError(f"--baseline-ratio: expected a number in (0, 1], got {a.baseline_ratio}")
        over["baseline_ratio"] = a.baseline_ratio
    if a.scorer == "builtin":
        import warnings

        warnings.warn("xtf demo: --scorer builtin is deprecated and ignored; the demo scores with the framework "
                      "(xtf_kernels.xtf.score_dataset)", DeprecationWarning, stacklevel=1)
        print("xtf demo: warning: --scorer builtin is deprecated and ignored (the framework scorer is used)",
              file=sys.stderr)
    if a.regime is not None:
        over["regime"] = a.regime
    if a.workers is not None:
        if a.workers < 1:
            raise ValueError(f"--workers: expected a positive int, got {a.workers}")
        over["workers"] = a.workers
    cfg = replace(cfg, ablation=bool(a.ablation), readings=bool(a.readings), eval_split=a.eval_split, **over)
    if any(s < 0 for s in a.seeds):
        raise ValueError(f"--seeds: expected ints >= 0, got {a.seeds}")
    if a.eval_split == "validation" and not a.collect:
        from .selection import REPORTED_SEEDS

        if set(a.seeds) & set(REPORTED_SEEDS):
            print(f"xtf demo: warning: seeds {sorted(set(a.seeds) & set(REPORTED_SEEDS))} are the reported seeds; "
                  "design choices on the validation split should use other seeds (e.g. 100 101)", file=sys.stderr)
    out = a.out or tempfile.mkdtemp(prefix="xtf-demo-")
    if a.collect:
        res = collect(out, a.collect)
    else:
        from ..backends import resolve_backend

        # a first-use build of the native kernels (announced on stderr) is not part of any timing
        resolve_backend("auto", torch.device("cpu"), torch.float32)
        res = run_demo(cfg, out, a.seeds, progress=not a.no_progress, quiet=a.quiet)
    print()
    print(textwrap.fill(res["interpretation"], width=100))
    print()
    print(comparison_table(res))
    print()
    print(detection_table(res))
    native = f"native backend: {res['native_backend']}; " if res.get("native_backend") else ""
    print(f"\nseeds {res['seeds']} ({res['eval_split']} split); {res['params']:,} parameters; {native}"
          f"torch threads: {threads or torch.get_num_threads()} per process; "
          f"{res['seconds']:.0f} s in total")
    print(f"report: {out}/report.html")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m xtf_kernels.demo``; returns the exit status (2 on bad input)."""
    a = build_parser().parse_args(argv)
    try:
        return _run(a)
    except KeyboardInterrupt:
        print("\nxtf demo: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as e:
        print(f"xtf demo: error: {e}", file=sys.stderr)
        return 2
