// Entry points of the native row kernels (masked_ce_cpu.cpp), bound to Python by
// masked_ce_bindings.cpp. Shapes, dtypes and semantics: the comments at their definitions.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <string>
#include <vector>

namespace xtf_native {

std::vector<at::Tensor> stats_and_grad(at::Tensor z, at::Tensor y, c10::optional<at::Tensor> bias,
                                       c10::optional<double> softcap, double label_smoothing,
                                       double z_loss, int64_t n_grad, c10::optional<at::Tensor> db);

void grad_block_(at::Tensor z, at::Tensor y, at::Tensor row_max, at::Tensor lse,
                 c10::optional<at::Tensor> row_scale, c10::optional<at::Tensor> bias, int64_t v0,
                 int64_t vocab, c10::optional<double> softcap, double label_smoothing,
                 double z_loss, c10::optional<at::Tensor> db);

at::Tensor softcap_values(at::Tensor x, double c);

std::string build_info();

}  // namespace xtf_native
