"""The demo's fine-tuning arms: keep masks and selection policies, all from the framework.

Every arm fine-tunes a copy of the same base model with the same budget, seed and batch order;
only the training mask differs. Static arms carry a keep mask over the scored table's rows
(response tokens); SLM carries a ``select=`` policy recomputed at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..xtf import RandomPolicy, RuleConfig, SLMPolicy, TokenCleaningPolicy
from .scoring import reasons_for, rule_subsets

__all__ = ["ARM_LABELS", "Arm", "ablation_key", "static_arms"]

ARM_LABELS: dict[str, str] = {
    "base": "Base model (no FT)",
    "normal": "Normal FT",
    "xtf": "XTF (official preset: released rules)",
    "random": "Random masking (XTF ratio)",
    "slm": "SLM (Rho-1)",
    "token_cleaning": "Token Cleaning",
    "xtf_paper": "XTF, paper preset (uncapped)",
    "xtf_ri_received": "XTF official, RI received",
    "xtf_input_tr": "XTF official, input-embedding TR",
}


def ablation_key(rules: tuple[str, ...]) -> str:
    """Result key of an ablation arm, e.g. ``("kn", "tr") -> "xtf_kn+tr"``."""
    return "xtf_" + "+".join(rules)


for _sub in rule_subsets()[:-1]:
    ARM_LABELS[ablation_key(_sub)] = "XTF rules " + "+".join(s.upper() for s in _sub)


@dataclass
class Arm:
    """One fine-tuning run: a static ``keep`` mask over table rows, or a dynamic ``select``."""

    key: str
    keep: np.ndarray | None = None
    select: object | None = None
    kept_fraction: float = 1.0


def _frac(keep: np.ndarray, resp: np.ndarray) -> float:
    return float(keep.sum() / max(int(resp.sum()), 1))


def static_arms(table: dict, methods: tuple[str, ...], *, seed: int, ratio: float | None = None,
                ablation: bool = False, readings: dict | None = None) -> dict[str, Arm]:
    """The arms of one seed.

    Args:
        table: :func:`~xtf_kernels.demo.scoring.score_examples` output of the base model (with
            ``ref_logprob`` when SLM or Token Cleaning is asked for).
        methods: subset of ``normal``, ``xtf``, ``random``, ``slm``, ``token_cleaning``.
        seed: seed of the random arm.
        ratio: kept fraction of the baselines (None: XTF's).
        ablation: add each rule alone and each pair (under the preset the table was scored with).
        readings: optional ``{key: keep mask}`` of the readings arms (scored separately).

    Returns:
        ``{key: Arm}`` in table order.
    """
    resp = np.asarray(table["is_response"], bool)
    xtf_keep = np.asarray(table["keep"], bool)
    r = _frac(xtf_keep, resp) if ratio is None else float(ratio)
    arms: dict[str, Arm] = {}
    for m in methods:
        if m == "normal":
            arms[m] = Arm(m, resp.copy(), None, 1.0)
        elif m == "xtf":
            arms[m] = Arm(m, xtf_keep, None, _frac(xtf_keep, resp))
        elif m == "random":
            k = RandomPolicy(r, seed=seed + 12345).keep_mask({"token_id": table["token_id"]}, resp)
            arms[m] = Arm(m, k, None, _frac(k, resp))
        elif m == "token_cleaning":
            k = TokenCleaningPolicy(r).keep_mask(table, resp)
            arms[m] = Arm(m, k, None, _frac(k, resp))
        elif m == "slm":
            arms[m] = Arm(m, None, SLMPolicy(r), r)
        else:
            raise ValueError(f"methods: unknown method {m!r}")
    if ablation:
        for sub in rule_subsets()[:-1]:
            preset = table["summary"].get("preset", "official")
            k = resp & (reasons_for(table, RuleConfig(preset=preset, enabled=sub)) == 0)
            arms[ablation_key(sub)] = Arm(ablation_key(sub), k, None, _frac(k, resp))
    for key, k in (readings or {}).items():
        arms[key] = Arm(key, np.asarray(k, bool), None, _frac(np.asarray(k, bool), resp))
    return arms

