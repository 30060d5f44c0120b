"""The fused linear + masked cross-entropy, as a small package (map: ``docs/architecture.md``).

* :mod:`.api` - :func:`masked_ce`, the validated entry point;
* :mod:`.validate` - every argument check, done once, before any kernel;
* :mod:`.spec` - :class:`MaskedCESpec` (the call's arguments and resolved options) and
  :class:`MaskedCEOutputs`;
* :mod:`.core` - pure functions: positions and compaction, the loss formula, reductions,
  statistics scattered back, gradients; :mod:`.forward` strings them into one forward;
* :mod:`.select` - ``select`` rules (:func:`rowwise`);
* :mod:`.autograd` - :class:`MaskedCE`, the ``torch.autograd.Function``;
* :mod:`.custom_op` - the ``torch.library`` ops used under ``torch.compile``;
* :mod:`.context` - autocast and the refusal of second-order gradients.

:mod:`.autograd` and :mod:`.custom_op` do not import each other; both sit on :mod:`.forward`.
``xtf_kernels.masked_ce`` is the function once the package is imported (``from
xtf_kernels.masked_ce import core`` reaches the modules); ``xtf_kernels.ops`` re-exports the API.
"""

from .api import masked_ce
from .autograd import MaskedCE
from .select import rowwise
from .spec import MaskedCEOutputs, MaskedCESpec, SelectFn

__all__ = ["MaskedCE", "MaskedCEOutputs", "MaskedCESpec", "SelectFn", "masked_ce", "rowwise"]
