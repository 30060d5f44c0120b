"""``xtf_kernels.loss``: the fused linear + masked cross-entropy front end (map: ``docs/architecture.md``).

* :mod:`.api` - :func:`masked_ce`, the validated entry point;
* :mod:`.validate` - every argument check, done once, before any kernel;
* :mod:`.spec` - :class:`MaskedCESpec` (the call's arguments and resolved options) and
  :class:`MaskedCEOutputs`;
* :mod:`.core` - pure functions: positions and compaction, the loss formula, reductions,
  statistics scattered back, gradients; :mod:`.forward` strings them into one forward;
* :mod:`.select` - ``select`` rules (:func:`rowwise`);
* :mod:`.autograd` - :class:`MaskedCE`, the ``torch.autograd.Function``;
* :mod:`.custom_op` - the ``torch.library`` ops used under ``torch.compile``;
* :mod:`.context` - autocast and the refusal of second-order gradients;
* :mod:`.vocab_parallel` - :class:`VocabParallel`: the LM head split over the vocabulary
  across ranks (statistics all-reduced, ``dX`` all-reduced, ``dW`` local).

:mod:`.autograd` and :mod:`.custom_op` do not import each other; both sit on :mod:`.forward`.
The public function is :func:`xtf_kernels.masked_ce` (always the function: this package has a
different name, so importing it never shadows the function); ``from xtf_kernels.loss import
core`` reaches the modules, and ``xtf_kernels.ops`` re-exports the API.
"""

from .api import masked_ce
from .autograd import MaskedCE
from .select import rowwise
from .spec import MaskedCEOutputs, MaskedCESpec, SelectFn
from .vocab_parallel import VocabParallel

__all__ = ["MaskedCE", "MaskedCEOutputs", "MaskedCESpec", "SelectFn", "VocabParallel", "masked_ce",
           "rowwise"]
