"""Training integrations: Hugging Face models and Trainer, TRL, data collation, distributed helpers.

* :mod:`.transformers`: :func:`apply_xtf` / :func:`revert` (loss of any ``*ForCausalLM`` with a
  linear head through :func:`xtf_kernels.masked_ce`), :class:`XTFTrainerMixin`, ``XTFTrainer``.
* :mod:`.trl`: ``XTFSFTTrainer`` (TRL's ``SFTTrainer`` with the keep mask).
* :mod:`.collator`: :class:`XTFCollator` (``xtf export`` records -> padded batches).
* :mod:`.distributed`: :func:`global_num_items` (kept-token count of a step, all ranks).

Importing this package does not import ``transformers`` or ``trl``: ``XTFTrainer`` is built on
first access and :mod:`.trl` is imported only when named, so both stay optional.
"""

from .collator import XTFCollator
from .distributed import count_kept_tokens, global_num_items
from .transformers import apply_xtf, is_patched, revert

__all__ = ["XTFCollator", "apply_xtf", "count_kept_tokens", "global_num_items", "is_patched", "revert"]
