"""``python -m xtf_kernels.demo``: see :mod:`xtf_kernels.demo.cli`."""

import sys

from .cli import main

sys.exit(main())
