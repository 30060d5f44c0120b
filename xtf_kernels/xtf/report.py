"""``build_report``: a self-contained HTML page (and PNG plots) for a scored XTF run.

The page embeds everything (CSS, JS, plots as base64 PNG): per-example responses with masked
tokens coloured by reason and their scores on hover, histograms of the three scores with the
thresholds used, the overlap of the rules, and a search / filter box.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path

import numpy as np

from .export import load_token_table
from .rules import N_REASON_MASKS, REASON_COMBINATIONS, REASONS, reason_label, reason_names
from .rundir import REPORT, check_writable_dir, named_os_error
from .shards import atomic_path

__all__ = ["build_report", "make_plots"]

_COLORS = {0: "transparent", 1: "#f4a3a3", 2: "#9cc3f5", 3: "#c9a3f4", 4: "#f7e08a", 5: "#f7b77a", 6: "#a8e6a1", 7: "#bdbdbd"}
_NAMES = {b: reason_label(b, none="kept") for b in range(N_REASON_MASKS)}


def make_plots(cols: dict[str, np.ndarray], summary: dict, plot_dir: Path) -> dict[str, bytes]:
    """Histograms of S_RI, S_KN, S_TR with their thresholds, and the rule-overlap bars; saved as PNG.

    Returns ``{name: png bytes}`` (also written to ``plot_dir/<name>.png``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    resp = cols["is_response"].astype(bool)
    thr = summary["thresholds"]
    out: dict[str, bytes] = {}

    def save(fig, name: str) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        out[name] = buf.getvalue()
        with atomic_path(plot_dir / f"{name}.png") as tmp:
            tmp.write_bytes(out[name])

    def clean(a):
        a = np.asarray(a, dtype=np.float64)[resp]
        return a[~np.isnan(a)]

    official = summary.get("preset") == "official"
    ri = clean(cols["ri"])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(ri, bins=60, color="#d9534f", alpha=0.8)
    if not ri.size:  # ri_source="released": constant, not computed
        ax.text(0.5, 0.5, "RI as released is constant (1/L):\nnot computed, flags nothing", ha="center",
                va="center", transform=ax.transAxes, fontsize=9)
    fences = np.unique(np.asarray(cols["ri_fence"], dtype=np.float64)[resp])
    fences = fences[~np.isnan(fences)]
    if fences.size:
        ax.axvline(float(np.median(fences)), color="k", ls="--", label=f"median per-sequence fence (k={thr['ri']['k']})")
        ax.legend(fontsize=7)
    ax.set_title("S_RI: attention received (response tokens)")
    ax.set_xlabel("S_RI")
    ax.set_ylabel("tokens")
    save(fig, "hist_ri")

    kn = clean(cols["kn"])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(kn, bins=np.linspace(0, 1, 51), color="#337ab7", alpha=0.8)
    cap = f", at most {thr['kn']['cap']:.0%} per sequence" if official else ""
    ax.axvline(thr["kn"]["threshold"], color="k", ls="--", label=f"mask S_KN < {thr['kn']['threshold']}{cap}")
    ax.set_title("S_KN = 1 - p(gold)")
    ax.set_xlabel("S_KN")
    ax.set_ylabel("tokens")
    ax.legend(fontsize=7)
    save(fig, "hist_kn")

    tr = clean(cols["tr"])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    if official:
        _official_tr_plot(ax, tr, thr)
    else:
        _paper_tr_plot(ax, tr, thr)
    save(fig, "hist_tr")

    comb = summary["overlap"]["combinations"]
    names = [reason_label(b) for b in REASON_COMBINATIONS]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(names, [comb.get(n, 0) for n in names], color=[_COLORS[b] for b in REASON_COMBINATIONS], edgecolor="k")
    ax.set_title("Masked tokens by exact combination of rules")
    ax.set_ylabel("tokens")
    ax.tick_params(axis="x", labelrotation=30)
    save(fig, "overlap")
    return out


def _official_tr_plot(ax, tr: np.ndarray, thr: dict) -> None:
    """Relevance = cosine similarity in [-1, 1], and the cut t_TR."""
    ax.hist(tr, bins=64, color="#f0ad4e", alpha=0.85)
    if thr["tr"].get("t_TR") is not None:
        ax.axvline(thr["tr"]["t_TR"], color="k", ls="--",
                   label=f"t_TR (masked below it, at most {thr['tr']['cap']:.0%} per sequence)")
        ax.legend(fontsize=7)
    ax.set_title("TR: relevance to the domain words (cosine)")
    ax.set_xlabel("relevance")
    ax.set_ylabel("tokens")


def _paper_tr_plot(ax, tr: np.ndarray, thr: dict) -> None:
    ax.hist(tr, bins=np.linspace(0, 1, 65), color="#f0ad4e", alpha=0.85)
    for t in thr["tr"].get("thresholds") or []:
        ax.axvline(t, color="k", ls="--")
    rng = thr["tr"].get("masked_range")
    if rng:
        lo = 0.0 if rng[0] is None else rng[0]
        hi = 1.0 if rng[1] is None else rng[1]
        ax.axvspan(lo, hi, color="#999", alpha=0.25, label="masked Multi-Otsu class")
        ax.legend(fontsize=7)
    ax.set_title("S_TR: task relevance (Multi-Otsu thresholds)")
    ax.set_xlabel("S_TR")
    ax.set_ylabel("tokens")


def _thresholds_html(summary: dict) -> str:
    """The preset and each rule's threshold (and cap) in words."""
    thr = summary["thresholds"]
    if summary.get("preset") != "official":
        return (f'<p>Preset: paper (uncapped). RI: per sequence S_RI &lt; Q1 - {thr["ri"]["k"]}&middot;IQR &middot; '
                f'KN: S_KN &lt; {thr["kn"]["threshold"]} &middot; TR: Multi-Otsu thresholds '
                f'{html.escape(json.dumps(thr["tr"].get("thresholds")))}, masked class range '
                f'{html.escape(json.dumps(thr["tr"].get("masked_range")))} '
                f'({html.escape(str(thr["tr"].get("metric")))} distance)</p>')
    tr = thr["tr"]
    rows = [("RI", thr["ri"]["rule"], f'{thr["ri"]["cap"]:.0%}', thr["ri"].get("note") or f'source: {thr["ri"]["source"]}'),
            ("KN", thr["kn"]["rule"], f'{thr["kn"]["cap"]:.0%}', f'p &gt; {thr["kn"]["p_threshold"]:g}'),
            ("TR", tr["rule"], f'{tr["cap"]:.0%}',
             f't_TR = {tr.get("t_TR")}; Multi-Otsu thresholds {json.dumps(tr.get("thresholds"))}; '
             f'source: {tr.get("source")}; domain words ({tr.get("domain")}): {", ".join(tr.get("domain_words") or [])}')]
    body = "".join(f"<tr><td>{n}</td><td style='text-align:left'>{html.escape(r)}</td><td>{c}</td>"
                   f"<td style='text-align:left'>{d if n == 'KN' else html.escape(d)}</td></tr>" for n, r, c, d in rows)
    return ("<p>Preset: official (the authors' released rules, each capped per sequence; rules enabled: "
            f"{html.escape(', '.join(thr['enabled']))}).</p><table><tr><th>rule</th><th>fires when</th>"
            f"<th>cap</th><th>threshold / note</th></tr>{body}</table>")


#: per-type rows shown in the report (summary.json lists every type with enough occurrences)
_TYPE_ROWS = 20


def _diagnostics_html(diag: dict | None) -> str:
    """The ground-truth-free warnings of ``summary.json``: always-masked types, per-type shares."""
    if not diag:
        return ""
    am = diag["always_masked"]

    def rows(items: list[dict]) -> str:
        return "".join(
            f"<tr><td>{html.escape(repr(r['token']))}</td><td>{r['count']}</td><td>{r['masked_share']:.1%}</td>"
            + "".join(f"<td>{r.get(rule.name, 0):.1%}</td>" for rule in REASONS) + "</tr>"
            for r in items
        )

    head = ("<tr><th>token</th><th>occurrences</th><th>masked</th>"
            + "".join(f"<th>{rule.name}</th>" for rule in REASONS) + "</tr>")
    warn = "a long list of common types is a warning sign" if am["count"] else "none"
    return (
        f"<h2>Diagnostics (no ground truth needed)</h2><p><b>{am['count']}</b> token types with at least "
        f"{am['min_count']} occurrences are masked at &ge; {am['share']:.0%} of their occurrences "
        f"({am['occurrences']} tokens; {warn}). Such a type is masked for what it is, not where it stands.</p>"
        f"<div class=\"cards\"><table><caption>always masked (most frequent)</caption>{head}{rows(am['top'])}</table>"
        f"<table><caption>the {min(len(diag['per_type']), _TYPE_ROWS)} most frequent of {len(diag['per_type'])} types: "
        f"masked share per rule (all of them in summary.json)</caption>{head}{rows(diag['per_type'][:_TYPE_ROWS])}"
        "</table></div>"
    )


def _fmt(x) -> str:
    return "nan" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{float(x):.4g}"


def _example_blocks(cols: dict[str, np.ndarray], max_examples: int, show_prompt: bool) -> tuple[list[str], int]:
    """(one HTML block per example, first ``max_examples`` by id; the number of examples)."""
    ex = cols["example_id"]
    order = np.lexsort((cols["position"], ex))
    uniq, starts = np.unique(ex[order], return_index=True)
    bounds = np.append(starts, order.size)
    blocks = []
    for i, e in enumerate(uniq[:max_examples]):
        rows = order[bounds[i] : bounds[i + 1]]
        spans = []
        bits_seen = 0
        text = []
        for r in rows:
            tok = str(cols["token_text"][r])
            text.append(tok)
            if not cols["is_response"][r]:
                if show_prompt:
                    spans.append(f'<span class="p">{html.escape(tok)}</span>')
                continue
            b = int(cols["reasons"][r])
            bits_seen |= b
            why = ",".join(reason_names(b)) or "kept"
            tip = (f"{why} | RI={_fmt(cols['ri'][r])} (fence {_fmt(cols['ri_fence'][r])}) "
                   f"KN={_fmt(cols['kn'][r])} TR={_fmt(cols['tr'][r])} id={int(cols['token_id'][r])}")
            spans.append(f'<span class="t r{b}" title="{html.escape(tip)}">{html.escape(tok)}</span>')
        n_resp = int(cols["is_response"][rows].sum())
        n_mask = int((cols["reasons"][rows] > 0).sum())
        blocks.append(
            f'<div class="ex" data-bits="{bits_seen}" data-text="{html.escape("".join(text).lower())}">'
            f'<div class="hd">example {int(e)} &middot; {n_resp} response tokens, {n_mask} masked</div>'
            f'<div class="body">{"".join(spans)}</div></div>'
        )
    return blocks, len(uniq)


def _page(summary: dict, pngs: dict[str, bytes], blocks: list[str], more: str) -> str:
    """The self-contained HTML page: summary cards, thresholds, diagnostics, plots, examples."""
    tok = summary["tokens"]
    frac = summary["masked_fraction"]
    pairs = summary["overlap"]["pairs"]
    comb = summary["overlap"]["combinations"]
    img = {k: "data:image/png;base64," + base64.b64encode(v).decode() for k, v in pngs.items()}
    legend = "".join(
        f'<span class="t r{b}" style="margin-right:6px">{_NAMES[b]}</span>' for b in range(1, N_REASON_MASKS)
    )
    pair_rows = "".join(
        f"<tr><td>{k}</td><td>{v['both']}</td><td>{v['jaccard']:.3f}</td><td>{v['overlap_of_smaller']:.3f}</td></tr>"
        for k, v in pairs.items()
    )
    comb_rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in comb.items())
    rule_cards = "\n".join(
        f'<div class="card">{r.name}<b>{summary["masked"][r.name]} ({frac[r.name]:.1%})</b></div>' for r in REASONS
    )
    filters = "\n".join(
        f'<label><input type="checkbox" class="f" value="{int(r)}">{r.name}</label>' for r in REASONS
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>XTF report</title>
<style>
body{{font-family:system-ui,Segoe UI,Helvetica,Arial,sans-serif;margin:20px;color:#222;max-width:1200px}}
h1{{font-size:22px}} h2{{font-size:17px;margin-top:22px}}
table{{border-collapse:collapse;font-size:13px}} td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
.cards{{display:flex;gap:12px;flex-wrap:wrap}} .card{{background:#f5f5f5;border-radius:6px;padding:8px 14px}}
.card b{{display:block;font-size:20px}}
.plots img{{width:380px;margin:4px;border:1px solid #ddd}}
.ex{{border:1px solid #ddd;border-radius:6px;margin:8px 0;padding:6px 10px}}
.hd{{font-size:12px;color:#666;margin-bottom:4px}}
.body{{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;white-space:pre-wrap;line-height:1.6}}
.p{{color:#999}} .t{{border-radius:3px;padding:0 1px}}
{"".join(f".r{b}{{background:{c}}}" for b, c in _COLORS.items())}
.t.r0:hover,.t:hover{{outline:1px solid #333}}
#controls{{position:sticky;top:0;background:#fff;padding:8px 0;border-bottom:1px solid #ddd}}
</style></head><body>
<h1>XTF token filtering report</h1>
<p>Method: {html.escape(summary.get("paper", ""))}. Masked = any rule fires (union); prompt tokens are never trained on.</p>
<div class="cards">
<div class="card">examples<b>{summary["examples"]["scored"]}</b></div>
<div class="card">response tokens<b>{tok["response"]}</b></div>
<div class="card">masked (any)<b>{tok["masked"]} ({frac["any"]:.1%})</b></div>
{rule_cards}
</div>
<h2>Thresholds</h2>
{_thresholds_html(summary)}
{_diagnostics_html(summary.get("diagnostics"))}
<h2>Score distributions</h2>
<div class="plots"><img alt="RI histogram" src="{img["hist_ri"]}"><img alt="KN histogram" src="{img["hist_kn"]}"><img alt="TR histogram" src="{img["hist_tr"]}"><img alt="rule overlap" src="{img["overlap"]}"></div>
<h2>Overlap of the rules</h2>
<div class="cards"><table><tr><th>pair</th><th>both</th><th>Jaccard</th><th>of smaller</th></tr>{pair_rows}</table>
<table><tr><th>exact reasons</th><th>tokens</th></tr>{comb_rows}</table></div>
<h2>Examples</h2>
<div id="controls"><input id="q" type="search" placeholder="search text..." size="40">
{filters}
<span style="font-size:12px;color:#666">(only examples with a token masked by a checked rule)</span>
<span id="count"></span><div style="margin-top:4px">{legend}</div></div>
{more}
<div id="examples">{"".join(blocks)}</div>
<script>
(function(){{
  var q=document.getElementById('q'), boxes=document.querySelectorAll('.f'), exs=document.querySelectorAll('.ex');
  function update(){{
    var s=q.value.toLowerCase(), m=0, n=0;
    boxes.forEach(function(b){{ if(b.checked) m|=parseInt(b.value); }});
    exs.forEach(function(e){{
      var ok=(!s || e.dataset.text.indexOf(s)>=0) && (!m || (parseInt(e.dataset.bits)&m));
      e.style.display=ok?'':'none'; if(ok) n++;
    }});
    document.getElementById('count').textContent=' '+n+' shown';
  }}
  q.addEventListener('input',update); boxes.forEach(function(b){{b.addEventListener('change',update);}}); update();
}})();
</script>
</body></html>
"""


def build_report(
    out_dir: str | os.PathLike,
    dest: str | os.PathLike | None = None,
    *,
    max_examples: int = 200,
    show_prompt: bool = True,
) -> Path:
    """Write the HTML report of a scored run.

    Args:
        out_dir: a scored run directory (``tokens/`` shards and ``summary.json``).
        dest: HTML path (default ``out_dir/report/index.html``); PNGs go next to it.
        max_examples: examples rendered (the first ones by id); the statistics use all tokens.
        show_prompt: render prompt tokens (greyed) before each response.

    Returns:
        Path of the HTML file.
    """
    out = Path(out_dir)
    if not isinstance(max_examples, int) or max_examples < 1:
        raise ValueError(f"max_examples: expected a positive int, got {max_examples!r}")
    summ_path = out / "summary.json"
    if not summ_path.is_file():
        raise FileNotFoundError(f"out_dir: {summ_path} not found; run `xtf score` first")
    summary = json.loads(summ_path.read_text())
    dest = Path(dest) if dest is not None else out / REPORT / "index.html"
    if dest.is_dir():
        raise IsADirectoryError(f"dest: {dest} is a directory; expected the path of an .html file")
    check_writable_dir(dest.parent, "dest")
    t = load_token_table(out)
    cols = {c: t[c].to_numpy(zero_copy_only=False) for c in t.column_names}
    try:
        pngs = make_plots(cols, summary, dest.parent)
    except OSError as e:
        raise named_os_error(e, f"dest: cannot write the plots next to {dest}") from e

    blocks, n_examples = _example_blocks(cols, max_examples, show_prompt)
    more = "" if n_examples <= max_examples else f"<p>Showing {max_examples} of {n_examples} examples.</p>"
    page = _page(summary, pngs, blocks, more)
    try:
        with atomic_path(dest) as tmp:
            tmp.write_text(page, encoding="utf-8")
    except OSError as e:
        raise named_os_error(e, f"dest: cannot write {dest}") from e
    return dest
