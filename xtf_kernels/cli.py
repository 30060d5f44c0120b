"""The ``xtf`` command line: ``xtf score``, ``xtf export``, ``xtf report`` and ``xtf demo``.

``xtf score --model DIR --data FILE.jsonl --out OUT`` scores every response token with XTF
(see :func:`xtf_kernels.xtf.score_dataset`); run it under ``torchrun`` to spread the data over
processes. ``xtf export OUT --to train.jsonl`` writes input_ids + labels (-100 on masked and
prompt tokens); ``xtf report OUT`` writes ``OUT/report/index.html``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def _layers(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--ri-layers: expected comma-separated ints, got {s!r}") from e


def _token_ids(s: str) -> list[int]:
    try:
        ids = [int(x) for x in s.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--protect: expected comma-separated token ids, got {s!r}") from e
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"--protect: expected token ids >= 0, got {s!r}")
    return ids


def _add_score(sub) -> None:
    p = sub.add_parser("score", help="score a dataset with XTF (writes Parquet shards + summary.json)")
    p.add_argument("--model", required=True, help="local Hugging Face causal-LM checkpoint directory (with tokenizer)")
    p.add_argument("--data", required=True, help="JSONL (prompt/response or messages), or a file/dir `datasets` loads")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--ref-model", default=None, help="reference model dir (stores ref log-probs for SLM/Token Cleaning)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--truncation", choices=["right", "skip", "fail"], default="right")
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail", help="bad JSONL line: fail or skip-and-count")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--shard-size", type=int, default=256, help="examples per Parquet shard")
    p.add_argument("--ri-k", type=float, default=1.0, help="RI fence multiplier k (Q1 - k*IQR)")
    p.add_argument("--kn-threshold", type=float, default=0.05, help="mask when S_KN < this")
    p.add_argument("--tr-classes", type=int, default=3)
    p.add_argument("--tr-masked-class", type=int, default=1, help="Multi-Otsu class masked (0 = lowest mean)")
    p.add_argument("--tr-metric", choices=["cosine", "euclidean"], default="cosine")
    p.add_argument("--domain-words", default=None, help="comma-separated domain words for the TR domain vector")
    p.add_argument("--rules", default="ri,kn,tr", help="enabled rules (ablation), e.g. kn,tr")
    p.add_argument("--ri-layers", type=_layers, default=None, help="comma-separated layer indices for RI")
    p.add_argument("--ri-reduce", default="mean_over_queries", help="RI aggregation over queries")
    p.add_argument("--tr-source", choices=["input", "contextual"], default="input",
                   help="TR reading: input-embedding row (paper, default) or the final hidden state per occurrence")
    p.add_argument("--ri-aggregation", choices=["mean", "debiased"], default="mean",
                   help="RI reading: mean over visible queries (default) or received mass / uniform causal attention")
    p.add_argument("--protect", type=_token_ids, default=None, help="comma-separated token ids never masked (e.g. EOS)")
    p.add_argument("--no-eos", action="store_true", help="do not append EOS to prompt/response responses")
    p.add_argument("--no-resume", action="store_true", help="do not reuse shards of an interrupted run")
    p.add_argument("--overwrite", action="store_true", help="replace a run with different settings in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_score)


def _cmd_score(a) -> int:
    from .xtf import RuleConfig, score_dataset

    dist = False
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        import torch.distributed as td

        if not td.is_initialized():
            td.init_process_group("nccl" if _cuda() else "gloo")
            dist = True
    try:
        rules = RuleConfig(ri_k=a.ri_k, kn_threshold=a.kn_threshold, tr_classes=a.tr_classes,
                           tr_masked_class=a.tr_masked_class, enabled=tuple(r.strip() for r in a.rules.split(",") if r.strip()))
        summary = score_dataset(
            a.model, a.data, a.out, rules=rules, batch_size=a.batch_size, max_length=a.max_length,
            dtype=a.dtype, device=a.device, shard_size=a.shard_size, on_error=a.on_error, truncation=a.truncation,
            add_eos=not a.no_eos, ri_layers=a.ri_layers, ri_reduce=a.ri_reduce, tr_metric=a.tr_metric,
            domain_words=None if a.domain_words is None else [w for w in a.domain_words.split(",") if w],
            ref_model=a.ref_model, resume=not a.no_resume, overwrite=a.overwrite, progress=not a.quiet,
            tr_source=a.tr_source, ri_aggregation=a.ri_aggregation, protect=a.protect,
        )
    finally:
        if dist:
            import torch.distributed as td

            td.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        tok, fr = summary["tokens"], summary["masked_fraction"]
        print(f"scored {summary['examples']['scored']} examples, {tok['response']} response tokens; "
              f"masked {tok['masked']} ({fr['any']:.1%}): RI {fr['RI']:.1%}, KN {fr['KN']:.1%}, TR {fr['TR']:.1%} "
              f"-> {os.path.join(a.out, 'summary.json')}")
        am = (summary.get("diagnostics") or {}).get("always_masked")
        if am and am["count"]:
            top = ", ".join(repr(r["token"]) for r in am["top"][:10])
            print(f"warning: {am['count']} token types (>= {am['min_count']} occurrences) are masked at >= "
                  f"{am['share']:.0%} of their occurrences: {top}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write input_ids + labels (-100 on masked and prompt tokens)")
    p.add_argument("dir", help="a scored run directory")
    p.add_argument("--to", required=True, help="output file, .jsonl or .parquet")
    p.add_argument("--format", choices=["jsonl", "parquet"], default=None)
    p.add_argument("--policy", default="xtf", choices=["xtf", "slm", "token_cleaning", "random", "entropy"],
                   help="which keep mask: XTF's rules or a baseline")
    p.add_argument("--ratio", type=float, default=None, help="kept fraction for a baseline (default: XTF's)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_export)


def _cmd_export(a) -> int:
    from .xtf import export_dataset

    info = export_dataset(a.dir, a.to, format=a.format, policy=a.policy, ratio=a.ratio, seed=a.seed)
    print(json.dumps(info))
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="self-contained HTML report with plots")
    p.add_argument("dir", help="a scored run directory")
    p.add_argument("--out", default=None, help="HTML path (default DIR/report/index.html)")
    p.add_argument("--max-examples", type=int, default=200)
    p.add_argument("--hide-prompt", action="store_true")
    p.set_defaults(func=_cmd_report)


def _cmd_report(a) -> int:
    from .xtf import build_report

    path = build_report(a.dir, a.out, max_examples=a.max_examples, show_prompt=not a.hide_prompt)
    print(path)
    return 0


def _add_demo(sub) -> None:
    try:
        mod = importlib.import_module("xtf_kernels.demo.cli")
    except ModuleNotFoundError as e:
        if e.name not in ("xtf_kernels.demo", "xtf_kernels.demo.cli"):
            raise
        p = sub.add_parser("demo", help="(not installed) end-to-end demo")
        p.set_defaults(func=lambda a: _no_demo())
        return
    mod.add_parser(sub)


def _no_demo() -> int:
    print("xtf demo: xtf_kernels.demo is not available in this installation", file=sys.stderr)
    return 2


def build_parser(with_demo: bool = True) -> argparse.ArgumentParser:
    """The ``xtf`` argument parser (the demo subcommand is imported lazily)."""
    ap = argparse.ArgumentParser(prog="xtf", description="XTF token-level noise filtering (arXiv:2602.14536)")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_score(sub)
    _add_export(sub)
    _add_report(sub)
    if with_demo:
        _add_demo(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xtf`` console script; returns the exit status.

    Errors in the input (bad data, bad model directory, existing run) print one clear line to
    stderr and exit with status 2.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    with_demo = bool(args_list) and args_list[0] == "demo"
    ap = build_parser(with_demo=with_demo)
    a = ap.parse_args(args_list)
    try:
        return int(a.func(a) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError, ImportError) as e:
        print(f"xtf {a.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
