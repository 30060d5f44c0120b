"""The three XTF noise rules, their union and the per-token reason bitmask.

A response token is masked (label -> ignore index) when ANY enabled rule fires. Two presets
(:class:`RuleConfig` ``preset``) say how the rules read:

* ``"official"`` (default): the rules of the authors' released implementation, each capped per
  sequence by a percentage (:mod:`.released`): KN ``p > 0.95`` among the top 10 % of the
  sequence's p; TR ``rel < t_TR`` among the bottom 5 % of its task relevance (cosine
  similarity of the token run alone to the domain vector; ``t_TR`` from a 5-class Multi-Otsu
  and the released cumulative-proportion pick); RI as released is constant (flags nothing),
  ``ri_source="received"`` applies the released fence ``Q1 - 1.5 IQR`` with its 5 % cap to
  attention received.
* ``"paper"``: the literal reading of the paper's text, uncapped:

  - RI (Eq. 5): per sequence, ``S_RI < Q1 - k * (Q3 - Q1)`` (linear quartiles, ``k = 1.0``);
  - KN (Eq. 6): ``S_KN < kn_threshold`` (0.05: the base model gives the gold token P > 0.95);
  - TR (Eq. 7): Multi-Otsu on the dataset's S_TR values (3 classes); the class with the
    second-smallest mean (class index 1 of the ordered classes) is masked.

Prompt tokens are never trained on: their ``keep`` is False and their reason bitmask is 0.
NaN scores never fire a rule. Token ids in ``RuleConfig.protect`` are never masked.

The readings of the paper's ambiguous parts are options too (docs/xtf.md): ``tr_source``
(``"isolated"``: the token run alone through the model, the official default; ``"input"``: the
token's input-embedding row, the paper default; ``"contextual"``: the final hidden state at
that position), ``ri_source`` (``"released"`` or ``"received"``) and ``ri_aggregation``
(``"mean"``: attention received averaged over the visible queries; ``"debiased"``: the received
mass divided by what uniform causal attention would give the key).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field

import numpy as np

from .multiotsu import digitize
from .released import capped_kn_mask, capped_ri_mask, capped_tr_mask

__all__ = ["Reason", "RuleConfig", "PRESETS", "RI_SOURCES", "parse_rules", "ri_fence_mask", "kn_mask", "tr_mask", "apply_rules", "overlap_counts", "reason_names",
           "reason_label", "REASONS", "N_REASON_MASKS", "REASON_COMBINATIONS", "TR_SOURCES", "RI_AGGREGATIONS",
           "type_diagnostics"]


class Reason(enum.IntFlag):
    """Bits of the per-token reason mask (``reasons`` column): why a token was masked."""

    RI = 1
    KN = 2
    TR = 4


#: the rules' bits in their order of record (the single source of the names "RI", "KN", "TR")
REASONS: tuple[Reason, ...] = (Reason.RI, Reason.KN, Reason.TR)
#: number of distinct reason bitmasks (0 = kept .. 7 = all three rules)
N_REASON_MASKS = 1 << len(REASONS)
#: the non-zero bitmasks, single rules first, then pairs, then all three: 1, 2, 4, 3, 5, 6, 7
REASON_COMBINATIONS: tuple[int, ...] = tuple(
    sorted(range(1, N_REASON_MASKS), key=lambda b: (bin(b).count("1"), b))
)


def reason_names(bits: int) -> list[str]:
    """Names of the set bits, e.g. ``reason_names(5) == ["RI", "TR"]``."""
    return [r.name for r in REASONS if int(bits) & int(r)]


def reason_label(bits: int, *, sep: str = "+", none: str = "none") -> str:
    """One label for a bitmask: ``reason_label(5) == "RI+TR"``; ``none`` for 0."""
    return sep.join(reason_names(bits)) or none


_RULES = ("ri", "kn", "tr")
PRESETS: tuple[str, ...] = ("official", "paper")
TR_SOURCES: tuple[str, ...] = ("isolated", "input", "contextual")
RI_SOURCES: tuple[str, ...] = ("released", "received")
RI_AGGREGATIONS: tuple[str, ...] = ("mean", "debiased")
#: the released implementation's per-sequence caps (RI, KN, TR), its main.py defaults
OFFICIAL_PERCENTAGES: tuple[float, float, float] = (0.05, 0.10, 0.05)
# what a field left as None means under each preset
_PRESET_DEFAULTS = {
    "official": {"ri_k": 1.5, "tr_classes": 5, "tr_source": "isolated", "ri_source": "released",
                 "percentages": OFFICIAL_PERCENTAGES},
    "paper": {"ri_k": 1.0, "tr_classes": 3, "tr_source": "input", "ri_source": "received", "percentages": None},
}


def parse_rules(spec: str) -> tuple[str, ...]:
    """``"KN,tr"`` -> ``("kn", "tr")``: comma-separated rule names in any case.

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    if not isinstance(spec, str):
        raise TypeError(f"rules: expected a comma-separated string, got {type(spec).__name__}")
    names = tuple(r.strip().lower() for r in spec.split(",") if r.strip())
    bad = [r for r in names if r not in _RULES]
    if bad or not names:
        raise ValueError(f"enabled: expected comma-separated rule names among RI, KN, TR (any case), got {spec!r}")
    return names


@dataclass(frozen=True)
class RuleConfig:
    """Preset and thresholds of the three rules.

    Fields left as None take the preset's value (``official`` / ``paper``).

    Attributes:
        preset: ``"official"`` (default: the released implementation's capped rules) or
            ``"paper"`` (the uncapped literal reading of the paper's text).
        ri_k: fence multiplier k in ``Q1 - k * IQR`` (official 1.5, paper 1.0).
        kn_threshold: mask when ``S_KN < kn_threshold``, i.e. ``p > 1 - kn_threshold`` (0.05).
        tr_classes: Multi-Otsu classes (official 5, paper 3).
        tr_masked_class: paper: which class (0 = lowest mean) is masked; 1 = second-smallest.
            Not used by ``official`` (its cut comes from the cumulative-proportion pick).
        tr_nbins: histogram bins of the Multi-Otsu (256).
        enabled: rules in force, a subset of ("ri", "kn", "tr") (ablations).
        tr_source: ``"isolated"`` (official: the token run alone through the model, final
            hidden state), ``"input"`` (paper: the token's input-embedding row) or
            ``"contextual"`` (paper only: the final hidden state at that position).
        ri_source: ``"released"`` (official: the released computation, constant 1/L, flags
            nothing, no attention pass) or ``"received"`` (attention received, Eq. 2; the only
            one under ``paper``).
        ri_aggregation: ``"mean"`` (received attention averaged over the queries that see the
            key) or ``"debiased"`` (received mass divided by uniform causal attention's
            ``sum_{i >= j} 1 / n_keys(i)``: removes the decay along the sequence).
        percentages: official per-sequence caps (RI, KN, TR) as fractions in [0, 1]
            (default 0.05, 0.10, 0.05); must be None under ``paper``.
        protect: token ids never masked (e.g. EOS); default none.
    """

    preset: str = "official"
    ri_k: float | None = None
    kn_threshold: float = 0.05
    tr_classes: int | None = None
    tr_masked_class: int = 1
    tr_nbins: int = 256
    enabled: tuple[str, ...] = field(default=_RULES)
    tr_source: str | None = None
    ri_aggregation: str = "mean"
    ri_source: str | None = None
    percentages: tuple[float, float, float] | None = None
    protect: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset: expected one of {PRESETS}, got {self.preset!r}")
        defaults = _PRESET_DEFAULTS[self.preset]
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        self._check_numbers()
        en = tuple(self.enabled)
        if not set(en) <= set(_RULES):
            raise ValueError(f"enabled: expected a subset of {_RULES}, got {en!r}")
        object.__setattr__(self, "enabled", tuple(r for r in _RULES if r in en))
        if self.tr_source not in TR_SOURCES:
            raise ValueError(f"tr_source: expected one of {TR_SOURCES}, got {self.tr_source!r}")
        if self.ri_source not in RI_SOURCES:
            raise ValueError(f"ri_source: expected one of {RI_SOURCES}, got {self.ri_source!r}")
        if self.ri_aggregation not in RI_AGGREGATIONS:
            raise ValueError(f"ri_aggregation: expected one of {RI_AGGREGATIONS}, got {self.ri_aggregation!r}")
        if self.preset == "paper":
            if self.ri_source != "received":
                raise ValueError("ri_source: the paper preset reads RI as attention received ('received')")
            if self.percentages is not None:
                raise ValueError("percentages: the per-sequence caps belong to the official preset (paper is uncapped)")
        elif self.tr_source == "contextual":
            raise ValueError("tr_source: 'contextual' is a reading of the paper preset (official scores TR "
                             "from the token run alone, 'isolated', or its input-embedding row, 'input')")
        if self.percentages is not None:
            pc = tuple(self.percentages)
            if len(pc) != 3 or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 <= x <= 1.0 for x in pc
            ):
                raise ValueError(f"percentages: expected three numbers in [0, 1] (RI, KN, TR), got {self.percentages!r}")
            object.__setattr__(self, "percentages", tuple(float(x) for x in pc))
        if isinstance(self.protect, (str, bytes)) or not all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t >= 0 for t in self.protect
        ):
            raise ValueError(f"protect: expected a sequence of token ids (ints >= 0), got {self.protect!r}")
        object.__setattr__(self, "protect", tuple(sorted({int(t) for t in self.protect})))

    def _check_numbers(self) -> None:
        if not isinstance(self.ri_k, (int, float)) or not np.isfinite(self.ri_k) or self.ri_k < 0:
            raise ValueError(f"ri_k: expected a finite number >= 0, got {self.ri_k!r}")
        if not isinstance(self.kn_threshold, (int, float)) or not 0.0 <= self.kn_threshold <= 1.0:
            raise ValueError(f"kn_threshold: expected a number in [0, 1], got {self.kn_threshold!r}")
        if not isinstance(self.tr_classes, int) or self.tr_classes < 2:
            raise ValueError(f"tr_classes: expected an int >= 2, got {self.tr_classes!r}")
        if not isinstance(self.tr_masked_class, int) or not 0 <= self.tr_masked_class < self.tr_classes:
            raise ValueError(
                f"tr_masked_class: expected an int in [0, {self.tr_classes}), got {self.tr_masked_class!r}"
            )
        if not isinstance(self.tr_nbins, int) or self.tr_nbins < self.tr_classes:
            raise ValueError(f"tr_nbins: expected an int >= tr_classes, got {self.tr_nbins!r}")

    @property
    def official(self) -> bool:
        """True under the ``official`` preset."""
        return self.preset == "official"

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        d = asdict(self)
        d["enabled"] = list(self.enabled)
        d["protect"] = list(self.protect)
        d["percentages"] = None if self.percentages is None else list(self.percentages)
        return d


def _as1d(name: str, a, dtype=None) -> np.ndarray:
    arr = np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {arr.shape}")
    return arr


def ri_fence_mask(
    ri: np.ndarray, example_id: np.ndarray, is_response: np.ndarray, k: float = 1.0
) -> tuple[np.ndarray, dict[int, float]]:
    """RI rule: per sequence, response tokens below ``Q1 - k * (Q3 - Q1)``.

    The released fence without its cap (:func:`~xtf_kernels.xtf.released.capped_ri_mask` with
    ``cap=1``: the fence is never replaced).

    Args:
        ri: float ``[N]`` attention-received scores (one row per token of the table).
        example_id: int ``[N]`` sequence of each row (rows need not be sorted).
        is_response: bool ``[N]``; only response tokens enter the quartiles and can fire.
        k: fence multiplier.

    Returns:
        (bool ``[N]`` fired, ``{example_id: fence}`` for sequences with response tokens).
    """
    return capped_ri_mask(ri, example_id, is_response, k=k, cap=1.0)


def kn_mask(kn: np.ndarray, is_response: np.ndarray, threshold: float = 0.05) -> np.ndarray:
    """KN rule: response tokens with ``S_KN < threshold`` (bool ``[N]``; NaN never fires)."""
    kn = _as1d("kn", kn, np.float64)
    resp = _as1d("is_response", is_response, bool)
    if kn.shape != resp.shape:
        raise ValueError(f"kn, is_response: expected equal lengths, got {kn.shape}, {resp.shape}")
    with np.errstate(invalid="ignore"):
        return resp & (kn < float(threshold))


def tr_mask(
    tr: np.ndarray, is_response: np.ndarray, thresholds: np.ndarray | None, masked_class: int = 1
) -> np.ndarray:
    """TR rule: response tokens whose Multi-Otsu class (``np.digitize(tr, thresholds)``) is ``masked_class``.

    ``thresholds=None`` (S_TR could not be thresholded, e.g. constant) never fires.
    """
    tr = _as1d("tr", tr, np.float64)
    resp = _as1d("is_response", is_response, bool)
    if tr.shape != resp.shape:
        raise ValueError(f"tr, is_response: expected equal lengths, got {tr.shape}, {resp.shape}")
    if thresholds is None:
        return np.zeros(tr.shape, dtype=bool)
    cls = digitize(tr, np.asarray(thresholds, dtype=np.float64))
    return resp & (cls == int(masked_class))


def apply_rules(
    table: dict[str, np.ndarray],
    config: RuleConfig | None = None,
    tr_thresholds: np.ndarray | None = None,
    tr_cut: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the enabled rules to a score table.

    Args:
        table: mapping with 1-D columns ``example_id`` (int), ``is_response`` (bool), ``ri``,
            ``kn``, ``tr`` (float; NaN = not scored), and ``token_id`` when ``config.protect``
            is set (protected ids are never masked). A pyarrow Table converted with
            ``{c: t[c].to_numpy() for c in t.column_names}`` works. Under ``official``, ``tr``
            is the task relevance (cosine similarity, higher = more relevant) and ``kn`` is
            ``1 - p``.
        config: preset and thresholds (default :class:`RuleConfig`, the official preset).
        tr_thresholds: paper: the Multi-Otsu thresholds of S_TR (from the whole dataset).
        tr_cut: official: ``t_TR`` (:func:`~xtf_kernels.xtf.released.official_tr_cut`); None
            leaves TR off.

    Returns:
        (``reasons`` uint8 ``[N]`` bitmask of :class:`Reason`, ``keep`` bool ``[N]``: response
        token and no rule fired).
    """
    cfg = config or RuleConfig()
    if not isinstance(cfg, RuleConfig):
        raise TypeError(f"config: expected a RuleConfig, got {type(cfg).__name__}")
    for c in ("example_id", "is_response", "ri", "kn", "tr"):
        if c not in table:
            raise ValueError(f"table: missing column {c!r}")
    resp = np.asarray(table["is_response"], dtype=bool)
    fired = _official_fired(table, cfg, resp, tr_cut) if cfg.official else _paper_fired(table, cfg, resp, tr_thresholds)
    reasons = np.zeros(resp.shape, dtype=np.uint8)
    for name, hit in fired.items():
        reasons |= np.where(hit, np.uint8(Reason[name.upper()]), np.uint8(0))
    if cfg.protect:
        if "token_id" not in table:
            raise ValueError("table: missing column 'token_id' (needed by RuleConfig.protect)")
        prot = np.isin(np.asarray(table["token_id"], dtype=np.int64), np.asarray(cfg.protect, dtype=np.int64))
        reasons[prot] = 0
    keep = resp & (reasons == 0)
    return reasons, keep


def _paper_fired(table, cfg: RuleConfig, resp: np.ndarray, tr_thresholds) -> dict[str, np.ndarray]:
    out = {}
    if "ri" in cfg.enabled:
        out["ri"], _ = ri_fence_mask(table["ri"], table["example_id"], resp, cfg.ri_k)
    if "kn" in cfg.enabled:
        out["kn"] = kn_mask(table["kn"], resp, cfg.kn_threshold)
    if "tr" in cfg.enabled:
        out["tr"] = tr_mask(table["tr"], resp, tr_thresholds, cfg.tr_masked_class)
    return out


def _official_fired(table, cfg: RuleConfig, resp: np.ndarray, tr_cut) -> dict[str, np.ndarray]:

    cap_ri, cap_kn, cap_tr = cfg.percentages
    ex = table["example_id"]
    out = {}
    if "ri" in cfg.enabled and cfg.ri_source == "received":  # released RI is constant: flags nothing
        out["ri"], _ = capped_ri_mask(table["ri"], ex, resp, cfg.ri_k, cap_ri)
    if "kn" in cfg.enabled:
        p = 1.0 - np.asarray(table["kn"], dtype=np.float64)
        out["kn"] = capped_kn_mask(p, ex, resp, 1.0 - cfg.kn_threshold, cap_kn)
    if "tr" in cfg.enabled:
        out["tr"] = capped_tr_mask(table["tr"], ex, resp, tr_cut, cap_tr)
    return out


def overlap_counts(reasons: np.ndarray, is_response: np.ndarray) -> dict[str, int]:
    """Counts of response tokens per rule, per pair and per exact reason combination.

    Keys: ``"RI"``, ``"KN"``, ``"TR"`` (fired, possibly with others), ``"RI&KN"``, ``"RI&TR"``,
    ``"KN&TR"``, ``"RI&KN&TR"``, ``"masked"``, ``"kept"``, ``"response"`` and ``"only:<bits>"``
    for each of the 8 exact bitmasks 0..7.
    """
    r = np.asarray(reasons, dtype=np.int64)[np.asarray(is_response, dtype=bool)]
    counts = np.bincount(r, minlength=N_REASON_MASKS)[:N_REASON_MASKS]
    out: dict[str, int] = {f"only:{b}": int(counts[b]) for b in range(N_REASON_MASKS)}
    bits = np.arange(N_REASON_MASKS)
    for mask in REASON_COMBINATIONS:  # fired, possibly with others
        out[reason_label(mask, sep="&")] = int(counts[(bits & mask) == mask].sum())
    out["response"] = int(counts.sum())
    out["kept"] = int(counts[0])
    out["masked"] = out["response"] - out["kept"]
    return out


def type_diagnostics(
    counts: np.ndarray,
    masked: np.ndarray,
    per_rule: dict[str, np.ndarray],
    decode=None,
    *,
    min_count: int = 20,
    share: float = 0.95,
    top: int = 20,
) -> dict:
    """Ground-truth-free warnings per token type, from per-type occurrence counts.

    A token type masked at nearly every occurrence is masked for what it IS, not where it
    stands; a long list of common types (glue words, EOS, digits) is a warning sign before any
    training is spent.

    Args:
        counts: int ``[V]`` response occurrences per token id.
        masked: int ``[V]`` masked response occurrences per token id (any rule).
        per_rule: ``{"RI"|"KN"|"TR": int [V]}`` occurrences where that rule fired.
        decode: optional ``token_id -> str`` for readable names.
        min_count: types with fewer occurrences are left out.
        share: the "always masked" cut.
        top: rows listed in ``always_masked.top``.

    Returns:
        ``{"always_masked": {"count", "min_count", "share", "occurrences", "top": [...]},
        "per_type": [...]}``: each row has ``token_id``, ``token``, ``count``,
        ``masked_share`` and the share per rule; ``always_masked.top`` are the ``top`` most
        frequent always-masked types, ``per_type`` every type with ``>= min_count``
        occurrences, most frequent first.
    """
    n = np.asarray(counts, dtype=np.int64)
    m = np.asarray(masked, dtype=np.int64)
    if n.ndim != 1 or m.shape != n.shape or any(np.shape(v) != n.shape for v in per_rule.values()):
        raise ValueError("counts, masked, per_rule: expected 1-D arrays of one length (the vocabulary)")
    if not 0.0 < float(share) <= 1.0:
        raise ValueError(f"share: expected a number in (0, 1], got {share!r}")

    def row(t: int) -> dict:
        r = {"token_id": int(t), "token": decode(int(t)) if decode else str(int(t)), "count": int(n[t]),
             "masked_share": float(m[t] / n[t])}
        r.update({k: float(np.asarray(v)[t] / n[t]) for k, v in per_rule.items()})
        return r

    frequent = np.flatnonzero(n >= int(min_count))
    always = frequent[m[frequent] >= float(share) * n[frequent]]
    always = always[np.argsort(-n[always], kind="stable")]
    by_count = frequent[np.argsort(-n[frequent], kind="stable")]
    return {
        "always_masked": {"count": int(always.size), "min_count": int(min_count), "share": float(share),
                          "occurrences": int(n[always].sum()), "top": [row(t) for t in always[:top]]},
        "per_type": [row(t) for t in by_count],
    }
