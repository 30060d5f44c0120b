"""Triton kernels of the masked-CE backend (imported lazily: needs ``triton``).

:mod:`.kernels` holds the ``@triton.jit`` kernels and their launchers; the backend class that
implements the contract of :mod:`xtf_kernels.backends.base` is
:class:`xtf_kernels.backends.triton_backend.TritonBackend`.
"""
