"""XTF: explainable token-level noise filtering for LLM fine-tuning data.

Implements Yang et al., "Explainable Token-level Noise Filtering for LLM Fine-tuning
Datasets" (ICLR 2026, arXiv:2602.14536), docs/xtf.md: three attribute scores per response
token (reasoning importance, knowledge novelty, task relevance) from the frozen base model,
three rules with a reason bitmask, their union as the training mask. The default preset,
``official``, applies the rules of the authors' released implementation (capped per sequence);
``RuleConfig(preset="paper")`` the uncapped literal reading of the paper's text.

Python API (mirrors the ``xtf`` command line)::

    from xtf_kernels.xtf import score_dataset, export_dataset, build_report
    summary = score_dataset("path/to/model", "data.jsonl", "out/")
    export_dataset("out/", "train.jsonl")
    build_report("out/")

The names are imported on first use (``xtf --help`` does not import torch or transformers).
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {
    "XTFDataError": ".data",
    "DynamicXTF": ".dynamic",
    "export_dataset": ".export",
    "load_token_table": ".export",
    "fixed_histogram": ".multiotsu",
    "multiotsu_from_histogram": ".multiotsu",
    "threshold_multiotsu": ".multiotsu",
    "PAPER": ".pipeline",
    "load_model_and_tokenizer": ".pipeline",
    "score_dataset": ".pipeline",
    "POLICIES": ".policies",
    "EntropyPolicy": ".policies",
    "RandomPolicy": ".policies",
    "SelectionPolicy": ".policies",
    "SLMPolicy": ".policies",
    "TokenCleaningPolicy": ".policies",
    "keep_top_fraction": ".policies",
    "make_policy": ".policies",
    "matched_ratio": ".policies",
    "build_report": ".report",
    "Reason": ".rules",
    "RuleConfig": ".rules",
    "apply_rules": ".rules",
    "kn_mask": ".rules",
    "overlap_counts": ".rules",
    "reason_names": ".rules",
    "ri_fence_mask": ".rules",
    "tr_mask": ".rules",
    "TaskRelevance": ".scorers",
    "knowledge_novelty": ".scorers",
    "reasoning_importance": ".scorers",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from .data import XTFDataError
    from .dynamic import DynamicXTF
    from .export import export_dataset, load_token_table
    from .multiotsu import fixed_histogram, multiotsu_from_histogram, threshold_multiotsu
    from .pipeline import PAPER, load_model_and_tokenizer, score_dataset
    from .policies import (
        POLICIES,
        EntropyPolicy,
        RandomPolicy,
        SelectionPolicy,
        SLMPolicy,
        TokenCleaningPolicy,
        keep_top_fraction,
        make_policy,
        matched_ratio,
    )
    from .report import build_report
    from .rules import (
        Reason,
        RuleConfig,
        apply_rules,
        kn_mask,
        overlap_counts,
        reason_names,
        ri_fence_mask,
        tr_mask,
    )
    from .scorers import TaskRelevance, knowledge_novelty, reasoning_importance

__all__ = [
    "DynamicXTF",
    "PAPER",
    "POLICIES",
    "EntropyPolicy",
    "RandomPolicy",
    "Reason",
    "RuleConfig",
    "SLMPolicy",
    "SelectionPolicy",
    "TaskRelevance",
    "TokenCleaningPolicy",
    "XTFDataError",
    "apply_rules",
    "build_report",
    "export_dataset",
    "fixed_histogram",
    "keep_top_fraction",
    "kn_mask",
    "knowledge_novelty",
    "load_model_and_tokenizer",
    "load_token_table",
    "make_policy",
    "matched_ratio",
    "multiotsu_from_histogram",
    "overlap_counts",
    "reason_names",
    "reasoning_importance",
    "ri_fence_mask",
    "score_dataset",
    "threshold_multiotsu",
    "tr_mask",
]
