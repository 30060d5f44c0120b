// Native CPU row kernels of xtf_kernels' masked cross-entropy (backend="native").
//
// The GEMMs stay in ATen (oneDNN / MKL through torch.mm); this file owns everything around
// them: one pass over each row of a logits chunk that produces the fp32 statistics (row
// maximum, log-sum-exp, gold logit, entropy, sum of logits) and, for rows that need a gradient,
// overwrites the logits in place with d loss / d raw-logits (softmax - smoothed one-hot,
// z-loss and softcap chain rule, optional per-row scale; optionally its fp32 column sums,
// i.e. the bias gradient, taken before the rounding to bf16 / fp16). Rows are spread over ATen's
// OpenMP pool (at::parallel_for); the inner loops are written so that the compiler
// vectorises them (#pragma omp simd, -fopenmp-simd, -O3, the host's ISA): a Cephes-style
// exp whose lanes are plain fp32 arithmetic, bf16 <-> fp32 by bit manipulation
// (round-to-nearest-even), fp32 lane sums folded into double per block.
//
// Math (z = softcap(raw + bias), c = softcap, ls = label smoothing, zl = z-loss, V = vocab):
//   m = max_v z_v; every statistic is kept relative to it, so a large common offset of the
//   logits costs no precision (loss = lse_rel - gold_rel never subtracts two big numbers):
//   lse_rel = log sum_v exp(z_v - m), gold_rel = z_y - m, zsum_rel = sum_v (z_v - m),
//   entropy = lse_rel - sum_v softmax_v (z_v - m)   (0 log 0 = 0: -inf logits are fine)
//   d loss / d z_v = softmax_v (1 + 2 zl lse) - ls / V - (1 - ls) [v == y], lse = m + lse_rel,
//     softmax_v = exp(z_v - m) exp(-lse_rel)
//   d loss / d raw_v = d loss / d z_v * (1 - (z_v / c)^2)        (softcap only)
// Offsets are int64 everywhere (rows x vocab may exceed 2^31 elements).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kBlock = 2048;  // fp32 lane sums are folded into double every kBlock columns

// the inner loops only vectorise when every helper is inlined into them
#define XTF_INLINE inline __attribute__((always_inline))

// ---------------------------------------------------------------------------------------
// element conversion (vectorisable: plain integer / float arithmetic, no calls)
// ---------------------------------------------------------------------------------------
XTF_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
XTF_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

template <typename T>
XTF_INLINE float load(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, float>) {
    return p[i];
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return bits_to_float(static_cast<uint32_t>(p[i].x) << 16);
  } else {
    return static_cast<float>(p[i]);
  }
}

template <typename T>
XTF_INLINE void store(T* p, int64_t i, float v) {
  if constexpr (std::is_same_v<T, float>) {
    p[i] = v;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    uint32_t u = float_to_bits(v);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
    p[i].x = static_cast<uint16_t>((v != v) ? 0x7FC0u : r);
  } else {
    p[i] = static_cast<c10::Half>(v);
  }
}

// exp(x) for x <= ~88: Cephes expf polynomial on x - n ln2, |r| <= ln2 / 2, ~1 ulp.
// Underflows to exactly 0 below -87.3; NaN in gives NaN out.
XTF_INLINE float fast_exp(float x) {
  const float xc = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  // round to nearest through the 1.5 * 2^23 magic constant (vectorises, no libm call)
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = static_cast<int32_t>(n) + 127;
  const float scale = bits_to_float(static_cast<uint32_t>(e) << 23);
  float out = p * scale;
  out = (x < -87.3f) ? 0.0f : out;
  return (x != x) ? x : out;
}

// c * tanh(raw / c). For |t| >= 0.625 through one exp, tanh|t| = 1 - 2 / (exp(2|t|) + 1)
// (no cancellation there: the result is >= 0.55); below, where that form cancels, the odd
// minimax polynomial of Cephes' tanhf (relative error ~1e-7). Both are computed and one is
// selected, so the loop stays branch-free and vectorised.
XTF_INLINE float softcap_fn(float raw, float c, float inv_c) {
  const float t = raw * inv_c;
  const float a = t < 0.0f ? -t : t;
  const float e = fast_exp(2.0f * (a > 40.0f ? 40.0f : a));
  const float big = 1.0f - 2.0f / (e + 1.0f);
  const float s = a * a;
  float poly = -5.70498872745e-3f;
  poly = poly * s + 2.06390887954e-2f;
  poly = poly * s - 5.37397155531e-2f;
  poly = poly * s + 1.33314422036e-1f;
  poly = poly * s - 3.33332819422e-1f;
  const float small = poly * s * a + a;
  float th = a < 0.625f ? small : big;
  th = t < 0.0f ? -th : th;
  th = (raw != raw) ? raw : th;
  return c * th;
}

struct Params {
  bool has_cap;
  float cap;
  float inv_cap;
  float ls;        // label smoothing
  float zl;        // z-loss coefficient
  int64_t vocab;   // full vocabulary size (for ls / V)
};

// z of column j of a row: raw (+ bias) then softcap
template <typename T, bool CAP, bool BIAS>
XTF_INLINE float zval(const T* row, const float* bias, int64_t j, float cap, float inv_cap) {
  float v = load(row, j);
  if constexpr (BIAS) v += bias[j];
  if constexpr (CAP) v = softcap_fn(v, cap, inv_cap);
  return v;
}

// Precise z (libm tanh) for the single gold element.
template <typename T>
inline double zval_precise(const T* row, const float* bias, int64_t j, const Params& P) {
  double v = static_cast<double>(load(row, j));
  if (bias) v += static_cast<double>(bias[j]);
  return P.has_cap ? static_cast<double>(P.cap) * std::tanh(v / static_cast<double>(P.cap)) : v;
}

struct RowStats {
  float max, lse, gold, entropy, zsum;  // lse, gold, zsum relative to max
};

// Statistics of one full-vocabulary row (two sweeps: max, then exp-sums of z - max).
template <typename T, bool CAP, bool BIAS>
RowStats row_stats_t(const T* row, const float* bias, int64_t C, int64_t y, const Params& P) {
  const float cap = P.cap, inv_cap = P.inv_cap;
  float m = -std::numeric_limits<float>::infinity();
  // softcap is monotone: the max of z is softcap(max of raw + bias)
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < C; ++j) {
    const float v = zval<T, false, BIAS>(row, bias, j, cap, inv_cap);
    m = v > m ? v : m;
  }
  if constexpr (CAP) m = softcap_fn(m, cap, inv_cap);
  double s = 0.0, t = 0.0, zs = 0.0;
  for (int64_t j0 = 0; j0 < C; j0 += kBlock) {
    const int64_t j1 = std::min(C, j0 + kBlock);
    float bs = 0.0f, bt = 0.0f, bz = 0.0f;
#pragma omp simd reduction(+ : bs, bt, bz)
    for (int64_t j = j0; j < j1; ++j) {
      const float zc = zval<T, CAP, BIAS>(row, bias, j, cap, inv_cap) - m;
      const float e = fast_exp(zc);
      bs += e;
      bt += e > 0.0f ? e * zc : 0.0f;  // 0 * log 0 = 0 (a -inf logit)
      bz += zc;
    }
    s += bs;
    t += bt;
    zs += bz;
  }
  const bool bad = std::isnan(s) || !std::isfinite(m);  // a NaN, a +inf or an all -inf row
  RowStats r;
  const double lse = std::log(s);
  r.max = m;
  r.lse = bad ? std::numeric_limits<float>::quiet_NaN() : static_cast<float>(lse);
  r.gold = static_cast<float>(zval_precise(row, bias, y, P) - static_cast<double>(m));
  r.entropy = static_cast<float>(lse - t / s);
  r.zsum = static_cast<float>(zs);
  return r;
}

template <typename T>
RowStats row_stats(const T* row, const float* bias, int64_t C, int64_t y, const Params& P) {
  if (P.has_cap) {
    return bias ? row_stats_t<T, true, true>(row, bias, C, y, P)
                : row_stats_t<T, true, false>(row, bias, C, y, P);
  }
  return bias ? row_stats_t<T, false, true>(row, bias, C, y, P)
              : row_stats_t<T, false, false>(row, bias, C, y, P);
}

// Overwrite columns [0, C) of a row (vocabulary columns [v0, v0 + C)) with
// scale * d loss / d raw, given the row's max m and lse_rel (a carries exp(-lse_rel)).
// y_local = y - v0 (outside [0, C): no gold here).
template <typename T, bool CAP, bool BIAS, bool ACC>
void row_grad_t(T* row, const float* bias, int64_t C, float m, float a, float sub,
                const Params& P, float* acc) {
  const float cap = P.cap, inv_cap = P.inv_cap;
#pragma omp simd
  for (int64_t j = 0; j < C; ++j) {
    const float z = zval<T, CAP, BIAS>(row, bias, j, cap, inv_cap);
    float g = fast_exp(z - m) * a - sub;
    if constexpr (CAP) {
      const float q = z * inv_cap;
      g *= 1.0f - q * q;
    }
    if constexpr (ACC) acc[j] += g;  // fp32, before the rounding to T
    store(row, j, g);
  }
}

template <typename T, bool CAP, bool BIAS>
void row_grad_acc(T* row, const float* bias, int64_t C, float m, float a, float sub,
                  const Params& P, float* acc) {
  if (acc) row_grad_t<T, CAP, BIAS, true>(row, bias, C, m, a, sub, P, acc);
  else row_grad_t<T, CAP, BIAS, false>(row, bias, C, m, a, sub, P, acc);
}

// acc (optional, fp32 [C]): += the row's gradient before rounding (the bias gradient)
template <typename T>
void row_grad(T* row, const float* bias, int64_t C, int64_t y_local, float m, float lse_rel,
              float scale, const Params& P, float* acc) {
  const double lse = static_cast<double>(m) + lse_rel;
  const float a = static_cast<float>(scale * (1.0 + 2.0 * P.zl * lse) * std::exp(-lse_rel));
  const float sub = scale * P.ls / static_cast<float>(P.vocab);
  // gold element from the precise z before the row is overwritten
  double gold_grad = 0.0;
  float gold_vec = 0.0f;  // what the vector loop will put there (replaced below)
  const bool hit = y_local >= 0 && y_local < C;
  if (hit) {
    const double z = zval_precise(row, bias, y_local, P);
    const double p = std::exp(z - static_cast<double>(m) - lse_rel);
    double g = p * (1.0 + 2.0 * P.zl * lse) - P.ls / static_cast<double>(P.vocab) - (1.0 - P.ls);
    if (P.has_cap) {
      const double q = z / P.cap;
      g *= 1.0 - q * q;
    }
    gold_grad = g * scale;
    if (acc) {
      float zv = load(row, y_local) + (bias ? bias[y_local] : 0.0f);
      if (P.has_cap) zv = softcap_fn(zv, P.cap, P.inv_cap);
      float gv = fast_exp(zv - m) * a - sub;
      if (P.has_cap) {
        const float q = zv * P.inv_cap;
        gv *= 1.0f - q * q;
      }
      gold_vec = gv;
    }
  }
  if (P.has_cap) {
    if (bias) row_grad_acc<T, true, true>(row, bias, C, m, a, sub, P, acc);
    else row_grad_acc<T, true, false>(row, bias, C, m, a, sub, P, acc);
  } else {
    if (bias) row_grad_acc<T, false, true>(row, bias, C, m, a, sub, P, acc);
    else row_grad_acc<T, false, false>(row, bias, C, m, a, sub, P, acc);
  }
  if (hit) {
    store(row, y_local, static_cast<float>(gold_grad));
    if (acc) acc[y_local] += static_cast<float>(gold_grad) - gold_vec;
  }
}

// Per-thread fp32 column sums of the gradient, reduced into db at the end.
struct ColumnSums {
  float* out;
  int64_t C;
  std::vector<float> bufs;
  ColumnSums(const c10::optional<torch::Tensor>& db, int64_t cols) : out(nullptr), C(cols) {
    if (!db.has_value() || !db->defined()) return;
    TORCH_CHECK(db->scalar_type() == at::kFloat && db->is_contiguous() && db->dim() == 1 &&
                    db->size(0) == cols,
                "db: expected a contiguous 1-D float32 tensor of ", cols, " entries");
    out = db->data_ptr<float>();
    bufs.assign(static_cast<size_t>(at::get_num_threads()) * C, 0.0f);
  }
  float* local() {
    if (!out) return nullptr;
    const int64_t t = std::min<int64_t>(at::get_thread_num(), at::get_num_threads() - 1);
    return bufs.data() + t * C;
  }
  void reduce() {
    if (!out) return;
    const int64_t nt = static_cast<int64_t>(bufs.size()) / std::max<int64_t>(C, 1);
    at::parallel_for(0, C, 4096, [&](int64_t c0, int64_t c1) {
      for (int64_t t = 0; t < nt; ++t) {
        const float* b = bufs.data() + t * C;
        for (int64_t c = c0; c < c1; ++c) out[c] += b[c];
      }
    });
  }
};

Params make_params(c10::optional<double> softcap, double ls, double zl, int64_t vocab) {
  Params P;
  P.has_cap = softcap.has_value();
  P.cap = P.has_cap ? static_cast<float>(*softcap) : 1.0f;
  P.inv_cap = 1.0f / P.cap;
  P.ls = static_cast<float>(ls);
  P.zl = static_cast<float>(zl);
  P.vocab = vocab;
  return P;
}

void check_logits(const torch::Tensor& z, const char* name) {
  TORCH_CHECK(z.device().is_cpu(), name, ": expected a CPU tensor");
  TORCH_CHECK(z.dim() == 2, name, ": expected a 2-D [rows, cols] tensor, got ", z.dim(), "-D");
  TORCH_CHECK(z.stride(1) == 1, name, ": expected unit stride along the vocabulary");
  const auto t = z.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, name,
              ": expected float32, bfloat16 or float16, got ", t);
}

const float* bias_ptr(const c10::optional<torch::Tensor>& bias, int64_t cols, int64_t offset) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->dim() == 1,
              "bias: expected a contiguous 1-D float32 tensor");
  TORCH_CHECK(bias->size(0) >= offset + cols, "bias: expected at least ", offset + cols,
              " entries, got ", bias->size(0));
  return bias->data_ptr<float>() + offset;
}

void check_rows(const torch::Tensor& t, int64_t rows, at::ScalarType dt, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows && t.is_contiguous() && t.scalar_type() == dt,
              name, ": expected a contiguous 1-D ", dt, " tensor of ", rows, " entries");
}

}  // namespace

// Statistics of every row of z [R, V] (the full vocabulary). For the first n_grad rows,
// z is then overwritten with d loss / d raw logits (unit upstream gradient); db (optional,
// fp32 [V]) += the column sums of that gradient in fp32.
// Returns (row_max, lse, gold, entropy, sum_logits), each fp32 [R]; lse, gold and sum_logits
// are relative to row_max (lse = log sum exp(z - row_max), gold = z_y - row_max, ...).
std::vector<torch::Tensor> stats_and_grad(torch::Tensor z, torch::Tensor y,
                                          c10::optional<torch::Tensor> bias,
                                          c10::optional<double> softcap, double label_smoothing,
                                          double z_loss, int64_t n_grad,
                                          c10::optional<torch::Tensor> db) {
  check_logits(z, "z");
  const int64_t R = z.size(0), V = z.size(1);
  check_rows(y, R, at::kLong, "y");
  TORCH_CHECK(n_grad >= 0 && n_grad <= R, "n_grad: expected a value in [0, ", R, "], got ", n_grad);
  const float* b = bias_ptr(bias, V, 0);
  const Params P = make_params(softcap, label_smoothing, z_loss, V);
  auto opts = torch::TensorOptions().dtype(torch::kFloat32);
  auto mx = torch::empty({R}, opts), lse = torch::empty({R}, opts);
  auto gold = torch::empty({R}, opts), ent = torch::empty({R}, opts), zsum = torch::empty({R}, opts);
  const int64_t* yp = y.data_ptr<int64_t>();
  float *mp = mx.data_ptr<float>(), *lp = lse.data_ptr<float>(), *gp = gold.data_ptr<float>();
  float *ep = ent.data_ptr<float>(), *sp = zsum.data_ptr<float>();
  const int64_t ld = z.stride(0);
  ColumnSums sums(db, V);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "xtf_stats", [&] {
    scalar_t* base = z.data_ptr<scalar_t>();
    at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
      float* acc = sums.local();
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* row = base + r * ld;
        TORCH_CHECK(yp[r] >= 0 && yp[r] < V, "y: expected labels in [0, ", V, ")");
        const RowStats st = row_stats(row, b, V, yp[r], P);
        mp[r] = st.max;
        lp[r] = st.lse;
        gp[r] = st.gold;
        ep[r] = st.entropy;
        sp[r] = st.zsum;
        if (r < n_grad) row_grad(row, b, V, yp[r], st.max, st.lse, 1.0f, P, acc);
      }
    });
  });
  sums.reduce();
  return {mx, lse, gold, ent, zsum};
}

// Overwrite z [R, C], the raw logits of vocabulary columns [v0, v0 + C) of R rows, with
// row_scale[r] * d loss_r / d raw, given each row's maximum and log-sum-exp relative to it
// (as stats_and_grad returns them). vocab = the full vocabulary size;
// db (optional, fp32 [C]) += the column sums of the gradient in fp32.
void grad_block_(torch::Tensor z, torch::Tensor y, torch::Tensor row_max, torch::Tensor lse,
                 c10::optional<torch::Tensor> row_scale, c10::optional<torch::Tensor> bias,
                 int64_t v0, int64_t vocab, c10::optional<double> softcap, double label_smoothing,
                 double z_loss, c10::optional<torch::Tensor> db) {
  check_logits(z, "z");
  const int64_t R = z.size(0), C = z.size(1);
  check_rows(y, R, at::kLong, "y");
  check_rows(row_max, R, at::kFloat, "row_max");
  check_rows(lse, R, at::kFloat, "lse");
  TORCH_CHECK(v0 >= 0 && v0 + C <= vocab, "v0: expected the block [v0, v0 + ", C,
              ") inside the vocabulary of ", vocab);
  const float* sc = nullptr;
  if (row_scale.has_value() && row_scale->defined()) {
    check_rows(*row_scale, R, at::kFloat, "row_scale");
    sc = row_scale->data_ptr<float>();
  }
  const float* b = bias_ptr(bias, C, v0);
  const Params P = make_params(softcap, label_smoothing, z_loss, vocab);
  const int64_t* yp = y.data_ptr<int64_t>();
  const float* mp = row_max.data_ptr<float>();
  const float* lp = lse.data_ptr<float>();
  const int64_t ld = z.stride(0);
  ColumnSums sums(db, C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "xtf_grad", [&] {
    scalar_t* base = z.data_ptr<scalar_t>();
    at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
      float* acc = sums.local();
      for (int64_t r = r0; r < r1; ++r) {
        row_grad(base + r * ld, b, C, yp[r] - v0, mp[r], lp[r], sc ? sc[r] : 1.0f, P, acc);
      }
    });
  });
  sums.reduce();
}

// c * tanh(x / c) elementwise through the row kernels' softcap_fn (a test hook).
torch::Tensor softcap_values(torch::Tensor x, double c) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x: expected a contiguous float32 CPU tensor");
  TORCH_CHECK(c > 0, "c: expected a positive softcap, got ", c);
  auto out = torch::empty_like(x);
  const float cf = static_cast<float>(c), inv = 1.0f / cf;
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t n = x.numel();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) op[i] = softcap_fn(xp[i], cf, inv);
  return out;
}

// Kernel self-description for `python -m xtf_kernels.info`.
std::string build_info() {
  std::string s = "xtf native: C++" + std::to_string(__cplusplus / 100 % 100);
#if defined(__AVX512BF16__)
  s += ", avx512bf16";
#endif
#if defined(__AVX512F__)
  s += ", avx512f";
#elif defined(__AVX2__)
  s += ", avx2";
#endif
  s += ", threads=" + std::to_string(at::get_num_threads());
  return s;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "xtf_kernels native CPU row kernels for the fused masked cross-entropy";
  m.def("stats_and_grad", &stats_and_grad, "statistics of every row; gradient in place for the first n_grad rows",
        py::arg("z"), py::arg("y"), py::arg("bias"), py::arg("softcap"), py::arg("label_smoothing"),
        py::arg("z_loss"), py::arg("n_grad"), py::arg("db") = py::none());
  m.def("grad_block_", &grad_block_, "gradient in place for a vocabulary block of logits",
        py::arg("z"), py::arg("y"), py::arg("row_max"), py::arg("lse"), py::arg("row_scale"),
        py::arg("bias"),
        py::arg("v0"), py::arg("vocab"), py::arg("softcap"), py::arg("label_smoothing"),
        py::arg("z_loss"), py::arg("db") = py::none());
  m.def("softcap_values", &softcap_values, "c * tanh(x / c) through the kernels' softcap (test hook)",
        py::arg("x"), py::arg("c"));
  m.def("build_info", &build_info, "compile-time features of this build");
}
