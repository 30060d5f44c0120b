"""``xtf demo``: an end-to-end, controlled reproduction of the XTF comparison on generated data.

Generated grade-school math problems with injected token-level noise of known positions
(:mod:`.data`), a locally trained tokenizer (:mod:`.tokenizer`), a tiny Llama pretrained briefly,
XTF scoring and noise-detection metrics (:mod:`.scoring`), fine-tuning runs with
:func:`xtf_kernels.masked_ce` and greedy exact-match evaluation (:mod:`.train`), and the report
(:mod:`.report`). Entry points: :func:`run_demo` and ``xtf demo`` / ``python -m xtf_kernels.demo``.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {
    "NOISE_KINDS": ".data",
    "MathExample": ".data",
    "NoiseConfig": ".data",
    "NoiseSpan": ".data",
    "generate_split": ".data",
    "make_demo_data": ".data",
    "METHODS": ".run",
    "SCALES": ".run",
    "DemoConfig": ".run",
    "run_demo": ".run",
    "run_seed": ".run",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)  # on first use: a fast `xtf --help`

if TYPE_CHECKING:
    from .data import (
        NOISE_KINDS,
        MathExample,
        NoiseConfig,
        NoiseSpan,
        generate_split,
        make_demo_data,
    )
    from .run import METHODS, SCALES, DemoConfig, run_demo, run_seed

__all__ = [
    "METHODS",
    "NOISE_KINDS",
    "SCALES",
    "DemoConfig",
    "MathExample",
    "NoiseConfig",
    "NoiseSpan",
    "generate_split",
    "make_demo_data",
    "run_demo",
    "run_seed",
]
