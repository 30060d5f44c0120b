"""The demo's outputs: a Table-1-style comparison, noise-detection table, plots and an HTML page.

Files written to the output directory: ``table.md`` (the comparison and the detection table),
``loss_curves.png``, ``accuracy.png``, ``report.html`` (self-contained: plots embedded) and,
by :func:`~xtf_kernels.demo.run.run_demo`, ``results.json``.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["comparison_table", "detection_table", "noise_note", "write_report"]


def _p(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _noise_cells(r: dict) -> list[str]:
    kinds = r.get("kept_noise_by_kind") or {}
    flag = r.get("noise_vs_full") or "-"
    return [_p(r.get("kept_noise_share")), _p(kinds.get("targeted")), _p(kinds.get("corrupt")), flag]


def noise_note(results: dict) -> str:
    """One sentence: the injected-noise share of the full data, by kind (what "vs full data" compares to)."""
    full, fk = results.get("full_noise_share"), results.get("full_noise_by_kind") or {}
    if full is None:
        return ""
    kinds = (f" (targeted, i.e. filler + boilerplate: {_p(fk['targeted'])} %; corrupted results, outside what XTF "
             f"targets: {_p(fk['corrupt'])} %)") if fk else ""
    return (f"Full data: {_p(full)} % of the response tokens are injected noise{kinds}. \"vs full data\" says HIGHER "
            "where a kept set holds more than 1.1x that share, lower where it holds less than that share / 1.1.")


def comparison_table(results: dict) -> str:
    """Markdown table: per method, exact match all / seen / new (mean +/- std over seeds, %),
    delta vs normal FT, kept %, noise share of the kept set % (all; targeted = filler +
    boilerplate; corrupt) and whether it is higher than the full data's, filler and
    answer-phrase shares of the generations, retention of the KN-masked types."""
    if not isinstance(results, dict) or "methods" not in results:
        raise ValueError("results: expected the dict returned by run_demo (with 'methods')")
    m = results["methods"]
    n = len(results.get("seeds", [])) or 1
    ref = m.get("normal", {}).get("exact_match", {}).get("all")
    lines = [f"| method | exact match % ({n} seed{'s' if n > 1 else ''}) | seen | new | vs normal | kept % "
             "| kept noise % | targeted % | corrupt % | vs full data | filler % | \"The answer is\" % | retention % |",
             "|---" * 13 + "|"]
    for name, r in m.items():
        em, sd = r["exact_match"], r["std"]
        delta = "" if ref is None or name in ("normal", "base") else f"{100 * (em['all'] - ref):+.1f}"
        spread = f" +/- {100 * sd['all']:.1f}" if n > 1 else ""  # one seed has no spread
        cells = [r["label"], f"{100 * em['all']:.1f}{spread}", f"{100 * em['seen']:.1f}",
                 f"{100 * em['new']:.1f}", delta, _p(r.get("kept_fraction")), *_noise_cells(r),
                 _p(r.get("filler_share")), _p(r.get("answer_phrase_share")), _p(r.get("retention"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detection_table(results: dict) -> str:
    """Markdown table: per mask (each rule, union, random), masked %, precision, recall per kind."""
    det = results.get("detection")
    if not isinstance(det, dict):
        raise ValueError("results: expected a 'detection' dict")
    kinds = [k[len("recall_"):] for k in next(iter(det.values())) if k.startswith("recall_")]
    head = "| mask | masked % | precision | recall (all noise) | " + " | ".join(f"recall {k}" for k in kinds) + " |"
    lines = [head, "|" + "---|" * (4 + len(kinds))]
    for name, d in det.items():
        cells = [f"{100 * d['masked_frac']:.1f}", f"{100 * d['precision']:.1f}", f"{100 * d['recall']:.1f}"]
        cells += [f"{100 * d['recall_' + k]:.1f}" for k in kinds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _smooth(x: np.ndarray, w: int) -> np.ndarray:
    if x.size < w or w <= 1:
        return x
    return np.convolve(x, np.ones(w) / w, mode="valid")


def _plots(results: dict, losses: Sequence[dict[str, list[float]]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    pre = np.array(losses[0].get("pretrain", []) if losses else [])
    axes[0].plot(pre, color="gray")
    axes[0].set_title(f"pretraining loss (seed {results['seeds'][0]})")
    axes[0].set_xlabel("step")
    axes[0].set_yscale("log")
    cmap = plt.get_cmap("tab20")
    for i, name in enumerate(n for n in results["methods"] if n != "base" and losses[0].get(n)):
        curve = np.mean([np.asarray(ls[name]) for ls in losses], axis=0)
        axes[1].plot(_smooth(curve, max(1, curve.size // 20)), label=results["methods"][name]["label"],
                     color=cmap(i % 20), lw=2.2 if name in ("xtf", "normal") else 1.2)
    axes[1].set_title("fine-tuning loss on kept tokens (mean over seeds, smoothed)")
    axes[1].set_xlabel("step")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    p = out / "loss_curves.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(results["methods"])), 4))
    names = list(results["methods"])
    means = [100 * results["methods"][n]["exact_match"]["all"] for n in names]
    stds = [100 * results["methods"][n]["std"]["all"] for n in names]
    colors = ["#888" if n == "base" else "#d62728" if n == "xtf" else "#1f77b4" for n in names]
    one_seed = len(results.get("seeds", [])) <= 1  # no error bars of zero height
    ax.bar(range(len(names)), means, yerr=None if one_seed else stds, color=colors, capsize=3)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([results["methods"][n]["label"] for n in names], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("exact match % (held-out, greedy)")
    ax.set_title(f"final-answer accuracy, {len(results['seeds'])} seed(s)")
    fig.tight_layout()
    p = out / "accuracy.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def _md_to_html_table(md: str) -> str:
    rows = [r.strip().strip("|").split("|") for r in md.splitlines() if r.strip() and not r.startswith("|---")]
    head, body = rows[0], rows[1:]
    h = "".join(f"<th>{html.escape(c.strip())}</th>" for c in head)
    b = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>"


def write_report(results: dict, losses: Sequence[dict[str, list[float]]], out_dir: str | Path) -> Path:
    """Write ``table.md``, the plots and ``report.html``; returns the HTML path.

    Args:
        results: aggregate dict from :func:`~xtf_kernels.demo.run.run_demo`.
        losses: per seed, method -> per-step training loss.
        out_dir: output directory.
    """
    if not losses:
        losses = [{}]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    comp, det = comparison_table(results), detection_table(results)
    (out / "table.md").write_text("## Comparison\n\n" + comp + "\n\n" + noise_note(results) + "\n\n## Noise detection (response tokens)\n\n" + det + "\n",
                                  encoding="utf-8")
    imgs = _plots(results, losses, out)
    emb = "".join(
        f'<img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">' for p in imgs
    )
    cfg = results.get("config", {})
    noise = results.get("noise_tokens", {})
    first = (results.get("per_seed") or [{}])[0].get("methods", {})
    samp = "".join(f"<h4>{html.escape(results['methods'].get(k, {}).get('label', k))}</h4>"
                   f"<pre>{html.escape(chr(10).join(r['samples'][:3]))}</pre>" for k, r in first.items() if r.get("samples"))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>xtf demo report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}
img{{max-width:100%;display:block;margin:1em 0}}pre{{background:#f6f6f6;padding:6px;white-space:pre-wrap}}</style></head><body>
<h1>xtf demo: token-level noise filtering on synthetic math</h1>
<h2>What the numbers show</h2><p><b>{html.escape(results.get('interpretation', ''))}</b></p>
<p>Seeds {html.escape(str(results.get('seeds')))};
{cfg.get('n_finetune')} noisy fine-tuning examples, {cfg.get('n_test')} clean {html.escape(str(results.get('eval_split', 'test')))} problems,
{html.escape(str(results.get('params')))} parameters, vocabulary {html.escape(str(results.get('vocab')))}, regime {html.escape(str(cfg.get('regime')))}, {cfg.get('finetune_steps')}
fine-tuning steps per method (same base, seed and batch order). Exact match of the final answer, greedy decoding.
Method: Yang et al., <i>Explainable Token-level Noise Filtering for LLM Fine-tuning Datasets</i>, ICLR 2026 (arXiv:2602.14536).</p>
<h2>Comparison</h2>{_md_to_html_table(comp)}<p>{html.escape(noise_note(results))}</p>
<h2>How well the XTF masks find the injected noise</h2>
<p>Injected noise tokens (seed {results['seeds'][0]}): {html.escape(str(noise))}</p>{_md_to_html_table(det)}
<h2>Plots</h2>{emb}
<h2>Sample generations (seed {results['seeds'][0]})</h2>{samp}
</body></html>"""
    p = out / "report.html"
    p.write_text(page, encoding="utf-8")
    return p
