"""XTF scores of the demo's fine-tuning split, and how well the masks find the injected noise.

:func:`score_examples` uses the framework's ``xtf_kernels.xtf.score_dataset`` when it can be
imported (the ``xtf score`` machinery, Parquet shards in ``out_dir``) and otherwise a built-in
in-memory implementation of the same readings (method note defaults): RI = attention received
averaged over the queries that see the key, then heads and layers; KN = 1 - p(gold) from
``masked_ce``; TR = 1 - min-max(cosine distance of the input-embedding row to the mean
response-token embedding); rules RI fence k=1, KN < 0.05, TR Multi-Otsu (3 classes, class 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..ops import masked_ce
from .data import NOISE_KINDS, MathExample
from .tokenizer import encode_example, noise_token_labels

__all__ = ["RULE_BITS", "rule_subsets", "apply_rules", "score_examples", "token_logprobs", "detection_metrics"]

RULE_BITS: dict[str, int] = {"ri": 1, "kn": 2, "tr": 4}


def rule_subsets() -> list[tuple[str, ...]]:
    """The 7 non-empty subsets of ("ri", "kn", "tr"): each alone, each pair, all three."""
    r = ("ri", "kn", "tr")
    return [(a,) for a in r] + [(r[i], r[j]) for i in range(3) for j in range(i + 1, 3)] + [r]


def _pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


@torch.no_grad()
def token_logprobs(model, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 64) -> list[np.ndarray]:
    """Gold-token log-probs under teacher forcing, per sequence (float32 ``[len]``, NaN at 0).

    Computed with ``masked_ce(..., shift=True, return_stats=True)`` on the decoder's final hidden
    states and the LM head (no logits materialised).
    """
    if not seqs:
        raise ValueError("seqs: expected at least one sequence")
    model.eval()
    out: list[np.ndarray] = []
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s : s + batch_size]
        ids, mask = _pad(chunk, pad_id)
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        labels = ids.masked_fill(mask == 0, -100)
        _, st = masked_ce(hidden, model.lm_head.weight, labels, shift=True, reduction="sum", return_stats=True)
        lp = st.logprob.float().numpy()
        out.extend(lp[i, : len(c)].copy() for i, c in enumerate(chunk))
    return out


@torch.no_grad()
def _received_attention(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    try:
        from ..attention import collect_received_attention

        return collect_received_attention(model, ids, mask).float()
    except Exception:  # the framework's collector is not importable: eager oracle
        pass
    prev = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        att = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(prev)
    m = mask.float()
    L = ids.shape[1]
    causal = torch.tril(torch.ones(L, L))
    # queries that can see key j: valid i >= j
    vis = causal[None] * m[:, :, None] * m[:, None, :]  # [B, i, j]
    n_q = vis.sum(1).clamp_min(1.0)  # [B, L]
    tot = torch.zeros_like(m)
    for a in att:
        tot += (a.float() * vis[:, None]).sum(2).mean(1) / n_q
    return tot / len(att) * m


def _multiotsu3(values: np.ndarray, weights: np.ndarray, nbins: int = 256) -> np.ndarray | None:
    hist, _ = np.histogram(values, bins=nbins, range=(0.0, 1.0), weights=weights)
    c = (np.arange(nbins) + 0.5) / nbins
    if np.count_nonzero(hist) < 3:
        return None
    w = np.cumsum(hist)
    mu = np.cumsum(hist * c)
    tot_w, tot_mu = w[-1], mu[-1]
    best, arg = -1.0, None
    for a in range(nbins - 2):
        b = np.arange(a + 1, nbins - 1)
        w0, m0 = w[a], mu[a]
        w1, m1 = w[b] - w0, mu[b] - m0
        w2, m2 = tot_w - w[b], tot_mu - mu[b]
        ok = (w0 > 0) & (w1 > 0) & (w2 > 0)
        if not ok.any():
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            var = np.where(ok, m0**2 / max(w0, 1e-300) + m1**2 / np.where(w1 > 0, w1, 1) + m2**2 / np.where(w2 > 0, w2, 1), -1)
        k = int(np.argmax(var))
        if var[k] > best:
            best, arg = float(var[k]), (a, int(b[k]))
    if arg is None:
        return None
    return np.array([c[arg[0]], c[arg[1]]])  # bin centres, as scikit-image's threshold_multiotsu


def apply_rules(table: dict[str, np.ndarray], enabled: Sequence[str] = ("ri", "kn", "tr"), *,
                ri_k: float = 1.0, kn_threshold: float = 0.05) -> np.ndarray:
    """Reason bitmask (uint8 ``[N]``: RI=1, KN=2, TR=4) of the enabled rules on a score table.

    ``table`` needs ``example_id``, ``is_response``, ``ri``, ``kn``, ``tr`` and
    ``tr_thresholds`` (2 Multi-Otsu thresholds or None). Uses ``xtf_kernels.xtf.rules`` when
    importable, else the same rules implemented here.
    """
    en = tuple(enabled)
    if not en or not set(en) <= set(RULE_BITS):
        raise ValueError(f"enabled: expected a non-empty subset of {tuple(RULE_BITS)}, got {en!r}")
    for c in ("example_id", "is_response", "ri", "kn", "tr", "tr_thresholds"):
        if c not in table:
            raise ValueError(f"table: missing column {c!r}")
    thr = table["tr_thresholds"]
    try:
        from ..xtf.rules import RuleConfig
        from ..xtf.rules import apply_rules as fw_apply

        reasons, _ = fw_apply(table, RuleConfig(ri_k=ri_k, kn_threshold=kn_threshold, enabled=en),
                              None if thr is None else np.asarray(thr, dtype=np.float64))
        return reasons.astype(np.uint8)
    except ImportError:
        pass
    resp = np.asarray(table["is_response"], bool)
    reasons = np.zeros(resp.shape, np.uint8)
    if "ri" in en:
        ri, ex = np.asarray(table["ri"], np.float64), np.asarray(table["example_id"])
        for e in np.unique(ex[resp]):
            rows = np.flatnonzero((ex == e) & resp & ~np.isnan(ri))
            if rows.size:
                q1, q3 = np.percentile(ri[rows], [25.0, 75.0])
                reasons[rows[ri[rows] < q1 - ri_k * (q3 - q1)]] |= 1
    with np.errstate(invalid="ignore"):
        if "kn" in en:
            reasons[resp & (np.asarray(table["kn"], np.float64) < kn_threshold)] |= 2
        if "tr" in en and thr is not None:
            tr = np.asarray(table["tr"], np.float64)
            cls = np.digitize(tr, np.asarray(thr, np.float64))
            reasons[resp & ~np.isnan(tr) & (cls == 1)] |= 4
    return reasons


@torch.no_grad()
def _builtin_scores(model, tokenizer, examples: Sequence[MathExample], batch_size: int) -> dict:
    enc = [encode_example(tokenizer, e)[:2] for e in examples]
    cols: dict[str, list] = {k: [] for k in ("example_id", "position", "token_id", "is_response", "ri", "kn", "logprob")}
    for s in range(0, len(enc), batch_size):
        chunk = enc[s : s + batch_size]
        ids, mask = _pad([c[0] for c in chunk], tokenizer.pad_token_id)
        ri = _received_attention(model, ids, mask).numpy()
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        labels = ids.masked_fill(mask == 0, -100)
        _, st = masked_ce(hidden, model.lm_head.weight, labels, shift=True, reduction="sum", return_stats=True)
        prob, lp = st.prob.float().numpy(), st.logprob.float().numpy()
        for b, (seq, n_p) in enumerate(chunk):
            n = len(seq)
            cols["example_id"].append(np.full(n, s + b))
            cols["position"].append(np.arange(n))
            cols["token_id"].append(np.asarray(seq))
            cols["is_response"].append(np.arange(n) >= n_p)
            cols["ri"].append(ri[b, :n])
            cols["kn"].append(1.0 - prob[b, :n])
            cols["logprob"].append(lp[b, :n])
    t = {k: np.concatenate(v) for k, v in cols.items()}
    E = model.get_input_embeddings().weight.detach().double()
    resp_ids = t["token_id"][t["is_response"]]
    counts = np.bincount(resp_ids, minlength=E.shape[0])
    present = counts > 0
    dom = (E * torch.from_numpy(counts).double()[:, None]).sum(0) / counts.sum()
    dist = (1.0 - torch.nn.functional.cosine_similarity(E, dom[None], dim=1)).numpy()
    lo, hi = dist[present].min(), dist[present].max()
    tr_vocab = np.where(present, 1.0 - (dist - lo) / max(hi - lo, 1e-12), np.nan)
    t["tr"] = np.where(t["is_response"], tr_vocab[t["token_id"]], np.nan)
    t["tr_thresholds"] = _multiotsu3(tr_vocab[present], counts[present].astype(np.float64))
    t["scorer"] = "builtin"
    return t


def _framework_scores(model, tokenizer, examples: Sequence[MathExample], out_dir: Path, batch_size: int) -> dict:
    import pyarrow.parquet as pq

    from ..xtf import score_dataset

    records = [{"prompt": e.prompt, "response": e.response} for e in examples]
    summary = score_dataset(model, records, out_dir, tokenizer=tokenizer, batch_size=batch_size, dtype="fp32",
                            device="cpu", overwrite=True, progress=False, max_length=model.config.max_position_embeddings)
    files = sorted((out_dir / "tokens").glob("shard-*.parquet"))
    tbl = pq.read_table(files[0]) if len(files) == 1 else __import__("pyarrow").concat_tables([pq.read_table(f) for f in files])
    t = {c: tbl[c].to_numpy() for c in ("example_id", "position", "token_id", "is_response", "ri", "kn", "tr", "logprob")}
    thr = summary["thresholds"]["tr"]["thresholds"]
    t["tr_thresholds"] = None if thr is None else np.asarray(thr, np.float64)
    t["scorer"] = "framework"
    return t


def score_examples(model, tokenizer, examples: Sequence[MathExample], out_dir: str | Path, *,
                   scorer: str = "auto", batch_size: int = 32) -> dict:
    """Score every token of ``examples`` with XTF using the frozen ``model``.

    Args:
        model: the base ``LlamaForCausalLM`` (fp32, CPU).
        tokenizer: the demo tokenizer.
        examples: fine-tuning examples.
        out_dir: where the framework scorer writes its shards.
        scorer: ``"auto"`` (framework if importable, else built-in), ``"framework"`` or ``"builtin"``.
        batch_size: sequences per forward.

    Returns:
        dict of NumPy columns over all tokens (``example_id``, ``position``, ``token_id``,
        ``is_response``, ``ri``, ``kn``, ``tr``, ``logprob``, ``noise`` = kind index + 1 or 0),
        plus ``tr_thresholds`` and ``scorer`` (which implementation ran).
    """
    if scorer not in ("auto", "framework", "builtin"):
        raise ValueError(f"scorer: expected 'auto', 'framework' or 'builtin', got {scorer!r}")
    if not examples:
        raise ValueError("examples: expected at least one example")
    model.eval()
    t = None
    if scorer in ("auto", "framework"):
        try:
            t = _framework_scores(model, tokenizer, examples, Path(out_dir), batch_size)
        except ImportError:
            if scorer == "framework":
                raise
    if t is None:
        t = _builtin_scores(model, tokenizer, examples, batch_size)
    order = np.lexsort((t["position"], t["example_id"]))
    for k in ("example_id", "position", "token_id", "is_response", "ri", "kn", "tr", "logprob"):
        t[k] = np.asarray(t[k])[order]
    labels = [noise_token_labels(tokenizer, e)[0] for e in examples]
    expect = np.concatenate([encode_example(tokenizer, e)[0] for e in examples])
    if t["token_id"].shape != expect.shape or not np.array_equal(t["token_id"].astype(np.int64), expect):
        raise RuntimeError("the scorer tokenised the examples differently from the demo; noise labels cannot be aligned")
    t["noise"] = np.concatenate(labels)
    return t


def detection_metrics(table: dict, reasons: np.ndarray, keep_random: np.ndarray | None = None) -> dict:
    """Precision / recall of masks against the injected noise, per rule and per noise kind.

    Args:
        table: output of :func:`score_examples` (``is_response``, ``noise``).
        reasons: uint8 ``[N]`` reason bitmask of all three rules.
        keep_random: optional bool ``[N]`` keep mask of random masking (a chance baseline).

    Returns:
        ``{mask name: {"masked_frac", "precision", "recall", "recall_<kind>"...}}`` for RI, KN, TR,
        XTF (union) and random; precision = noisy share of masked response tokens.
    """
    resp = np.asarray(table["is_response"], bool)
    noise = np.asarray(table["noise"])[resp]
    r = np.asarray(reasons)[resp]
    masks = {"RI": (r & 1) > 0, "KN": (r & 2) > 0, "TR": (r & 4) > 0, "XTF (union)": r > 0}
    if keep_random is not None:
        masks["random (matched)"] = ~np.asarray(keep_random, bool)[resp]
    out: dict[str, dict] = {}
    noisy = noise > 0
    for name, m in masks.items():
        d = {"masked_frac": float(m.mean()) if m.size else 0.0,
             "precision": float((m & noisy).sum() / max(m.sum(), 1)),
             "recall": float((m & noisy).sum() / max(noisy.sum(), 1))}
        for k, kind in enumerate(NOISE_KINDS, start=1):
            sel = noise == k
            d[f"recall_{kind}"] = float((m & sel).sum() / max(sel.sum(), 1))
        out[name] = d
    out["_noise_tokens"] = {kind: int((noise == k).sum()) for k, kind in enumerate(NOISE_KINDS, start=1)}
    out["_noise_tokens"]["response"] = int(resp.sum())
    return out
