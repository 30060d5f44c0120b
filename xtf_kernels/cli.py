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
        raise argparse.ArgumentTypeError(f"--protect: expected token ids (2 202 or 2,202), got {s!r}") from e
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"--protect: expected token ids >= 0, got {s!r}")
    return ids


def _percentages(s: str) -> tuple[float, float, float]:
    try:
        v = tuple(float(x) for x in s.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--percentages: expected three comma-separated numbers (RI,KN,TR), got {s!r}") from e
    if len(v) != 3 or not all(0.0 <= x <= 1.0 for x in v):
        raise argparse.ArgumentTypeError(f"--percentages: expected three numbers in [0, 1] (RI,KN,TR), got {s!r}")
    return v  # type: ignore[return-value]


class _ExtendFlat(argparse.Action):
    """``nargs="+"`` of lists, flattened: ``--protect 2 202``, ``--protect 2,202`` and repeats."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        have = getattr(namespace, self.dest, None) or []
        setattr(namespace, self.dest, [*have, *(i for v in values for i in v)])


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
    p.add_argument("--preset", choices=["official", "paper"], default="official",
                   help="official (default): the authors' released rules, capped per sequence; "
                        "paper: the uncapped literal reading of the paper's text")
    p.add_argument("--percentages", type=_percentages, default=None,
                   help="official: per-sequence caps RI,KN,TR (default 0.05,0.10,0.05)")
    p.add_argument("--ri-source", choices=["released", "received"], default=None,
                   help="official: RI as released (constant, flags nothing; default) or attention received "
                        "(layer 0 unless --ri-layers)")
    p.add_argument("--ri-k", type=float, default=None, help="RI fence multiplier k (Q1 - k*IQR; official 1.5, paper 1.0)")
    p.add_argument("--kn-threshold", type=float, default=0.05, help="mask when S_KN < this (p > 1 - this)")
    p.add_argument("--tr-classes", type=int, default=None, help="Multi-Otsu classes (official 5, paper 3)")
    p.add_argument("--tr-masked-class", type=int, default=1, help="paper: Multi-Otsu class masked (0 = lowest mean)")
    p.add_argument("--tr-metric", choices=["cosine", "euclidean"], default="cosine")
    p.add_argument("--domain-words", default=None,
                   help="comma-separated domain words for the TR domain vector (official default: the 16 most "
                        "frequent response words, printed)")
    p.add_argument("--rules", default="ri,kn,tr", help="enabled rules (ablation), any case, e.g. kn,tr or KN,TR")
    p.add_argument("--ri-layers", type=_layers, default=None, help="comma-separated layer indices for RI")
    p.add_argument("--ri-reduce", default="mean_over_queries", help="RI aggregation over queries")
    p.add_argument("--tr-source", choices=["isolated", "input", "contextual"], default=None,
                   help="TR reading: the token run alone (official default), its input-embedding row (paper "
                        "default) or the final hidden state per occurrence (paper only)")
    p.add_argument("--ri-aggregation", choices=["mean", "debiased"], default="mean",
                   help="RI reading: mean over visible queries (default) or received mass / uniform causal attention")
    p.add_argument("--protect", type=_token_ids, nargs="+", action=_ExtendFlat, default=None, metavar="ID",
                   help="token ids never masked (e.g. EOS): --protect 2 202 or --protect 2,202")
    p.add_argument("--no-eos", action="store_true", help="do not append EOS to prompt/response responses")
    p.add_argument("--chat-template", action="store_true",
                   help="render prompt/response records with the tokenizer's chat template (user turn, assistant "
                        "turn); default: prompt tokens + response tokens + EOS, no separator")
    p.add_argument("--no-resume", action="store_true",
                   help="score every shard again instead of reusing those of an interrupted run "
                        "(with --overwrite when --out already holds the run)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (its shards, summary and report; other files are kept)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (model loading, scoring)")
    p.add_argument("--pack", action="store_true",
                   help="pack whole examples into rows of up to --max-length tokens (--batch-size rows per "
                        "forward): same records, fewer padded positions")
    p.set_defaults(func=_cmd_score)


def _cmd_score(a) -> int:
    from .xtf import RuleConfig, score_dataset
    from .xtf.rules import parse_rules

    dist = False
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        import torch.distributed as td

        if not td.is_initialized():
            td.init_process_group("nccl" if _cuda() else "gloo")
            dist = True
    try:
        rules = RuleConfig(preset=a.preset, ri_k=a.ri_k, kn_threshold=a.kn_threshold, tr_classes=a.tr_classes,
                           tr_masked_class=a.tr_masked_class, enabled=parse_rules(a.rules), tr_source=a.tr_source,
                           ri_source=a.ri_source, percentages=a.percentages)
        summary = score_dataset(
            a.model, a.data, a.out, rules=rules, batch_size=a.batch_size, max_length=a.max_length,
            dtype=a.dtype, device=a.device, shard_size=a.shard_size, on_error=a.on_error, truncation=a.truncation,
            add_eos=not a.no_eos, ri_layers=a.ri_layers, ri_reduce=a.ri_reduce, tr_metric=a.tr_metric,
            domain_words=None if a.domain_words is None else [w for w in a.domain_words.split(",") if w],
            ref_model=a.ref_model, resume=not a.no_resume, overwrite=a.overwrite, progress=not a.quiet,
            ri_aggregation=a.ri_aggregation, protect=a.protect, pack=a.pack,
            chat_template=a.chat_template,
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
        tr = summary["thresholds"]["tr"]
        if summary.get("preset") == "official" and tr.get("domain_words"):
            how = "given" if tr.get("domain") == "words" else "the most frequent response words; --domain-words overrides"
            print(f"TR domain words ({how}): {', '.join(tr['domain_words'])}")
        for line in score_notes(summary):
            print(line)
        am = (summary.get("diagnostics") or {}).get("always_masked")
        if am and am["count"]:
            top = ", ".join(repr(r["token"]) for r in am["top"][:10])
            print(f"warning: {am['count']} token types (>= {am['min_count']} occurrences) are masked at >= "
                  f"{am['share']:.0%} of their occurrences: {top}")
    return 0


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def score_notes(summary: dict) -> list[str]:
    """Lines telling what a score run skipped, truncated and reused, and why (empty when nothing)."""
    ex, st = summary["examples"], summary.get("settings", {})
    ctx, trunc = st.get("max_length"), st.get("truncation", "right")
    why = {
        "bad_record": "malformed (not UTF-8, not JSON, missing or ill-typed fields; --on-error skip)",
        "too_long": (f"longer than the context of {ctx} tokens (--truncation skip)" if trunc == "skip"
                     else f"prompt alone fills the context of {ctx} tokens"),
    }
    lines = []
    skipped = ex.get("skipped") or {}
    if skipped:
        parts = "; ".join(f"{n} {why.get(k, k)}" for k, n in sorted(skipped.items()))
        lines.append(f"skipped {sum(skipped.values())} of {_plural(ex['records'], 'record')}: {parts}")
        msgs = ex.get("skip_messages") or []
        lines += [f"  {m}" for m in msgs[:5]]
        if sum(skipped.values()) > 5:
            lines.append("  (the first 20 messages are in summary.json)")
    if ex.get("truncated"):
        lines.append(f"truncated {_plural(ex['truncated'], 'response')} to the context of {ctx} tokens "
                     "(--truncation right; --truncation skip drops them instead)")
    pk = summary.get("packing")
    if pk:
        lines.append(f"packed {pk['tokens']} tokens into {pk['rows']} rows: {pk['positions_saved']:.0%} fewer positions "
                     f"than padded batches (padding {pk['padding_share_padded']:.0%} -> "
                     f"{pk['padding_share_packed']:.0%}); {pk['near_threshold_tokens']} tokens lie within "
                     f"{pk['near_threshold_tol']:g} of a threshold")
    run = summary.get("run") or {}
    if run.get("rules_changed") is not None:
        what = ", ".join(run["rules_changed"]) or "rule settings"
        lines.append(f"only rule parameters changed ({what}): reused pass 1 of the run in this directory, "
                     "applied the rules again")
    n, r1, r2 = run.get("shards", 0), run.get("reused_pass1", 0), run.get("reused_tokens", 0)
    if n and r1 == r2 == n:
        lines.append(f"nothing to do: all {_plural(n, 'shard')} were already scored by an earlier run with "
                     "the same settings (--no-resume --overwrite scores them again)")
    elif (r1 or r2) and run.get("rules_changed") is None:
        lines.append(f"resumed: reused {r1} of {n} pass-1 shards and {r2} of {n} final shards of the "
                     "interrupted run")
    return lines


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


DEMO_HELP = "end-to-end XTF demo on generated math data (CPU, minutes)"


def _add_demo(sub) -> None:
    try:
        mod = importlib.import_module("xtf_kernels.demo.cli")
    except Exception as e:  # a broken or missing demo must not break score / export / report
        why = "not installed" if isinstance(e, ModuleNotFoundError) and e.name and e.name.startswith(
            "xtf_kernels.demo") else f"{type(e).__name__}: {e}"
        p = sub.add_parser("demo", help=f"{DEMO_HELP} [unavailable: {why}]")
        p.set_defaults(func=lambda a: _no_demo(why))
        return
    mod.add_parser(sub)


def _no_demo(why: str) -> int:
    print(f"xtf demo: error: the demo is not available in this installation ({why})", file=sys.stderr)
    return 2


def build_parser(with_demo: bool = True) -> argparse.ArgumentParser:
    """The ``xtf`` argument parser (``score``, ``export``, ``report`` and ``demo``)."""
    ap = argparse.ArgumentParser(prog="xtf", description="XTF token-level noise filtering (arXiv:2602.14536)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="{score,export,report,demo}")
    _add_score(sub)
    _add_export(sub)
    _add_report(sub)
    if with_demo:
        _add_demo(sub)
    return ap


# Python argument names as they open library messages -> the flags of each command
_FLAGS = {
    "score": {"out_dir": "--out", "data": "--data", "model": "--model", "ref_model": "--ref-model",
              "max_length": "--max-length", "batch_size": "--batch-size", "shard_size": "--shard-size",
              "device": "--device", "dtype": "--dtype", "ri_layers": "--ri-layers", "ri_reduce": "--ri-reduce",
              "domain_words": "--domain-words", "tr_metric": "--tr-metric", "truncation": "--truncation",
              "on_error": "--on-error", "add_eos": "--no-eos", "ri_k": "--ri-k", "kn_threshold": "--kn-threshold",
              "tr_classes": "--tr-classes", "tr_masked_class": "--tr-masked-class", "enabled": "--rules",
              "rules": "the rule options", "pack": "--pack", "tr_source": "--tr-source",
              "ri_aggregation": "--ri-aggregation", "protect": "--protect", "preset": "--preset",
              "percentages": "--percentages", "ri_source": "--ri-source", "chat_template": "--chat-template"},
    "export": {"out_dir": "DIR", "dest": "--to", "format": "--format", "policy": "--policy", "ratio": "--ratio"},
    "report": {"out_dir": "DIR", "dest": "--out", "max_examples": "--max-examples"},
}


def _cli_words(command: str, msg: str) -> str:
    """Swap a leading Python argument name (``out_dir: ...``) for the command's flag."""
    head, sep, rest = msg.partition(": ")
    flag = _FLAGS.get(command, {}).get(head)
    return f"{flag}: {rest}" if sep and flag else msg


def _error_message(command: str, e: BaseException) -> str:
    """One line for an error caused by the user's input or environment."""
    from .xtf.data import XTFDataError
    from .xtf.rundir import RunExistsError

    if isinstance(e, RunExistsError):
        return e.describe(cli=True, names=_FLAGS["score"])
    if isinstance(e, OSError) and e.filename is not None:  # raw OS error: name the file and the reason
        return f"{e.filename}: {e.strerror or e}" + (f" -> {e.filename2}" if e.filename2 else "")
    msg = _cli_words(command, str(e) or type(e).__name__)
    if isinstance(e, XTFDataError) and command == "score":
        msg += (" (--truncation right or skip handles long records)" if e.reason == "too_long"
                else " (--on-error skip skips and counts such records)")
    return msg


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xtf`` console script; returns the exit status.

    Errors in the input or the environment (bad data, bad model directory, existing run,
    unwritable output, unavailable device) print one line to stderr and exit with status 2;
    Ctrl-C exits with status 130 (a score run resumes when the same command is run again).
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        a = build_parser().parse_args(args_list)
    except KeyboardInterrupt:
        print("\nxtf: interrupted", file=sys.stderr)
        return 130
    try:  # the command's modules (torch, transformers: seconds) are imported in here
        return int(a.func(a) or 0)
    except KeyboardInterrupt:
        again = "; run the same command again to resume" if a.command == "score" else ""
        print(f"\nxtf {a.command}: interrupted{again}", file=sys.stderr)
        return 130
    except (ValueError, OSError, TypeError, ImportError) as e:
        print(f"xtf {a.command}: error: {_error_message(a.command, e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # another torchrun rank failed: its own message says why
        if type(e).__name__ != "RankFailedError":
            raise
        print(f"xtf {a.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
