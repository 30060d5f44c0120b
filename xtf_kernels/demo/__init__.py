"""``xtf demo``: an end-to-end, controlled reproduction of the XTF comparison on generated data.

Generated grade-school math problems with injected token-level noise of known positions
(:mod:`.data`), a locally trained tokenizer (:mod:`.tokenizer`), a tiny Llama pretrained briefly,
XTF scoring and noise-detection metrics (:mod:`.scoring`), fine-tuning runs with
:func:`xtf_kernels.masked_ce` and greedy exact-match evaluation (:mod:`.train`), and the report
(:mod:`.report`). Entry points: :func:`run_demo` and ``xtf demo`` / ``python -m xtf_kernels.demo``.
"""

from .data import NOISE_KINDS, MathExample, NoiseConfig, NoiseSpan, generate_split, make_demo_data
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
