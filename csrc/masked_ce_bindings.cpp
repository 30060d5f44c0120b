// Python bindings of the native row kernels (their own translation unit: the pybind11 and
// tensor-conversion headers compile in parallel with the kernels in masked_ce_cpu.cpp).
#include "masked_ce_cpu.h"

#include <torch/csrc/utils/pybind.h>

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "xtf_kernels native CPU row kernels for the fused masked cross-entropy";
  m.def("stats_and_grad", &xtf_native::stats_and_grad, "statistics of every row; gradient in place for the first n_grad rows",
        py::arg("z"), py::arg("y"), py::arg("bias"), py::arg("softcap"), py::arg("label_smoothing"),
        py::arg("z_loss"), py::arg("n_grad"), py::arg("db") = py::none());
  m.def("grad_block_", &xtf_native::grad_block_, "gradient in place for a vocabulary block of logits",
        py::arg("z"), py::arg("y"), py::arg("row_max"), py::arg("lse"), py::arg("row_scale"),
        py::arg("bias"),
        py::arg("v0"), py::arg("vocab"), py::arg("softcap"), py::arg("label_smoothing"),
        py::arg("z_loss"), py::arg("db") = py::none());
  m.def("softcap_values", &xtf_native::softcap_values, "c * tanh(x / c) through the kernels' softcap (test hook)",
        py::arg("x"), py::arg("c"));
  m.def("build_info", &xtf_native::build_info, "compile-time features of this build");
}
