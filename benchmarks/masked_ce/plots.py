"""PNG plots of the results (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from .shapes import Result


def plot(results: list[Result], out: Path, dev: str) -> list[Path]:
    """PNG plots: fwd+bwd time and peak memory per method and shape (plain scenario), and the
    scenario comparison. Returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    plain = [r for r in results if r.scenario == "plain" and r.total_s]
    shapes = list(dict.fromkeys(r.shape for r in plain))
    methods = list(dict.fromkeys(r.method for r in plain))
    if plain:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        width = 0.8 / max(1, len(methods))
        for k, (key, label) in enumerate((("total_s", "forward+backward time (s)"),
                                         ("peak_mb", "peak memory above inputs (MB)"))):
            ax = axes[k]
            for j, m in enumerate(methods):
                xs, vs = [], []
                for i, s in enumerate(shapes):
                    r = next((r for r in plain if r.shape == s and r.method == m), None)
                    if r is not None and getattr(r, key) is not None:
                        xs.append(i + j * width)
                        vs.append(getattr(r, key))
                ax.bar(xs, vs, width=width, label=m)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))])
            ax.set_xticklabels([f"{s}\n" + next(f"N={r.N} D={r.D} V={r.V} {r.dtype}" for r in plain if r.shape == s)
                                for s in shapes], fontsize=8)
            ax.set_ylabel(label)
            ax.grid(axis="y", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"masked CE, 20% of labels ignored: {dev}")
        fig.tight_layout()
        p = out / f"{dev}_plain.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
        # time and memory vs tokens, per method (shapes that share D, V, dtype)
        fams: dict[tuple, list[Result]] = {}
        for r in plain:
            fams.setdefault((r.D, r.V, r.dtype), []).append(r)
        fams = {k: v for k, v in fams.items() if len({r.N for r in v}) > 1}
        if fams:
            fig, axes = plt.subplots(len(fams), 2, figsize=(12, 4 * len(fams)), squeeze=False)
            for row, ((D, V, dt), rs) in enumerate(fams.items()):
                for k, key in enumerate(("total_s", "peak_mb")):
                    ax = axes[row][k]
                    for m in methods:
                        pts = sorted((r.N, getattr(r, key)) for r in rs if r.method == m and getattr(r, key))
                        if pts:
                            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
                    ax.set_xlabel("tokens N")
                    ax.set_ylabel(key)
                    ax.set_title(f"D={D} V={V} {dt}")
                    ax.grid(alpha=0.3)
            axes[0][0].legend(fontsize=8)
            fig.tight_layout()
            p = out / f"{dev}_vs_tokens.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            paths.append(p)
    scen = [r for r in results if r.scenario != "plain" and r.total_s]
    if scen:
        fig, ax = plt.subplots(figsize=(12, 4.5))
        labels = [f"{r.shape}\n{r.scenario}\n{r.method}" for r in scen]
        ax.bar(range(len(scen)), [r.total_s for r in scen],
               color=["C0" if r.method.startswith("xtf") else "C1" for r in scen])
        ax.set_xticks(range(len(scen)))
        ax.set_xticklabels(labels, fontsize=6)
        ax.set_ylabel("forward+backward time (s)")
        ax.set_title("statistics, masking and the XTF step (blue: xtf, orange: peer compositions)")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        p = out / f"{dev}_scenarios.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    if any("+gf" in r.method and r.total_s for r in results):
        paths.append(_filter_plot(plt, results, out, dev))
    return paths


def _filter_plot(plt, results: list[Result], out: Path, dev: str) -> Path:
    """Gradient filtering (issue 20): time / GEMM floor of the plain and XTF-step cases on the
    shapes with a filtered method, each bar labelled with its relative dX error."""
    shapes = list(dict.fromkeys(r.shape for r in results if "+gf" in r.method))
    fig, axes = plt.subplots(1, len(shapes), figsize=(7 * len(shapes), 4.8), squeeze=False)
    for ax, s in zip(axes[0], shapes):
        rs = [r for r in results if r.shape == s and r.scenario in ("plain", "xtf-step")
              and r.extra.get("ratio_floor") is not None]
        ax.bar(range(len(rs)), [r.extra["ratio_floor"] for r in rs],
               color=["C2" if "+gf" in r.method else ("C0" if r.method.startswith("xtf") else "C1") for r in rs])
        for i, r in enumerate(rs):
            rep = r.extra.get("grad_filter_report")
            if rep:
                ax.annotate(f"dX err\n{rep['dx_rel_err']:.0e}", (i, r.extra["ratio_floor"]), ha="center",
                            va="bottom", fontsize=7)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(0.6, color="r", lw=0.8, ls="--", label="target 0.6x floor")
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels([f"{r.scenario}\n{r.method}" for r in rs], fontsize=6, rotation=30, ha="right")
        ax.set_ylabel("time / GEMM floor (kept rows)")
        ax.set_title(f"{s}: gradient filtering (green)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"forward+backward with grad_filter: {dev}")
    fig.tight_layout()
    p = out / f"{dev}_gradfilter.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p

