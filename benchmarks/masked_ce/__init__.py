"""Fused masked cross-entropy, side by side with the tools users would pick instead.

``python -m benchmarks.masked_ce [--quick] [--shapes S1,S2] [--out benchmarks/results]``

For every shape it times forward, backward and forward+backward (medians over repeats after
a warm-up) and the peak memory of:

* ``xtf-<backend>``: :func:`xtf_kernels.masked_ce`, every backend available on the device;
* ``eager``: logits materialised, upcast to fp32, ``F.cross_entropy``;
* ``torch-lce``: ``F.linear_cross_entropy(..., options=torch.nn.LinearCrossEntropyOptions())``;
* ``cce-exact``: cut-cross-entropy without gradient filtering (``filter_eps=None``; its
  ``impl="torch_compile"`` on CPU, ``"cce"`` on GPU);
* ``cce``: cut-cross-entropy with its default gradient filtering (GPU only), which skips
  backward blocks whose softmax is negligible: its speed depends on the logits, so the GPU
  shapes use peaked, trained-model-scale inputs (``make_inputs``);
* ``liger``: Liger-Kernel's fused linear cross-entropy (GPU only);
* ``gemm-floor``: the three bare matmuls (logits, dX, dW) on the kept rows;
* ``xtf-<backend>+gf-auto`` / ``+gf-1e-2`` (peaked shapes, scenarios plain and xtf-step):
  ``masked_ce(grad_filter="auto")`` and ``GradFilter(max_skipped=1e-2)``, each with one extra
  run for its report (:mod:`.gradfilter`: skipped mass, share of the dX / dW work skipped,
  dX / dW error against the unfiltered call) in the CSV's ``grad_filter`` column.

Scenarios: ``plain`` (mean CE over the non-ignored tokens, no statistics), ``stats`` (xtf
with ``return_stats=True``), ``mask0`` / ``mask30`` / ``mask50`` (xtf with that share of the
scored tokens masked by ``keep``), ``xtf-step`` (statistics for every token, loss and
gradient only for the ~50% a rowwise ``select`` rule keeps) against ``compose-<peer>`` (the
peer's forward over every token for its per-token loss, then its loss + gradient on the
kept rows). A missing peer is reported as skipped with the reason, never faked.

Memory: on CPU each case runs in its own subprocess (``--quick``: one subprocess for all
cases) started with ``MALLOC_MMAP_THRESHOLD_`` so freed buffers return to the OS; the peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` after the warm-up) minus the
resident set after the inputs and the warm-up is reported. On GPU:
``torch.cuda.max_memory_allocated`` above the inputs. Results: a printed table,
``<out>/<device>.csv`` (device, versions, load average at start, shape, dtype, method,
times, memory) and ``<out>/<device>_*.png``.

Layout: :mod:`.shapes` (problems, inputs), :mod:`.peers` (the other tools), :mod:`.cases`
(planning, building one case), :mod:`.measure` (timing, memory, subprocesses),
:mod:`.report` (ratios, CSV, table), :mod:`.plots`, :mod:`.cli` (``main``).
"""

from .cases import build, input_summary, plan
from .cli import main
from .measure import measure, run_cases
from .peers import peer_available, peer_loss_fn
from .plots import plot
from .report import add_ratios, device_name, print_table, versions, write_csv
from .shapes import (
    CHUNK_VARIANTS,
    CPU_SHAPES,
    GPU_SHAPES,
    GRAD_FILTERS,
    PLAIN_PEERS,
    QUICK_SHAPES,
    SCENARIOS_GRAD_FILTER,
    SCENARIOS_XTF,
    Case,
    Result,
    Shape,
    chunk_elems_of,
    grad_filter_of,
    make_inputs,
    mask_share,
)

__all__ = [
    "CHUNK_VARIANTS",
    "CPU_SHAPES",
    "Case",
    "GPU_SHAPES",
    "GRAD_FILTERS",
    "PLAIN_PEERS",
    "QUICK_SHAPES",
    "Result",
    "SCENARIOS_GRAD_FILTER",
    "SCENARIOS_XTF",
    "Shape",
    "add_ratios",
    "build",
    "device_name",
    "chunk_elems_of",
    "grad_filter_of",
    "input_summary",
    "main",
    "make_inputs",
    "mask_share",
    "measure",
    "peer_available",
    "peer_loss_fn",
    "plan",
    "plot",
    "print_table",
    "run_cases",
    "versions",
    "write_csv",
]
