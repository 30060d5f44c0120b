// Native CPU row kernels of xtf_kernels' masked cross-entropy (backend="native").
//
// The GEMMs stay in ATen (oneDNN / MKL through torch.mm); this file owns everything around
// them: one pass over each row of a logits chunk that produces the fp32 statistics (row
// maximum, log-sum-exp, gold logit, entropy, sum of logits) and, for rows that need a gradient,
// overwrites the logits in place with d loss / d raw-logits (softmax - smoothed one-hot,
// z-loss and softcap chain rule, optional per-row scale; optionally its fp32 column sums,
// i.e. the bias gradient, taken before the rounding to bf16 / fp16). An fp32 row without a
// softcap keeps exp(z - max) from its statistics sweep, so its gradient costs no second exp.
// Rows are spread over ATen's OpenMP pool (at::parallel_for); the inner loops are written
// lane-wise in GCC / Clang vector extensions, one native register of fp32 lanes at a time
// (16 on AVX-512, 8 on AVX2, 4 on SSE2 / NEON), so they are vectorised on every ISA the build
// can target (_native_build.py: XTF_NATIVE_ISA): a Cephes-style exp in plain lane arithmetic,
// bf16 / fp16 <-> fp32 by bit manipulation (round-to-nearest-even), and every sum taken in
// fp32 lanes over 16 columns per lane, then folded into fp64 lanes (the row sums keep the
// precision of a float64 reference on every path).
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

// Only the ATen / c10 headers the kernels use (torch/extension.h alone takes ~35 s of the
// first-use compile); the Python bindings are a separate translation unit,
// masked_ce_bindings.cpp, which ninja compiles in parallel with this one.
#include "masked_ce_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// the inner loops only vectorise when every helper is inlined into them
#define XTF_INLINE inline __attribute__((always_inline))

// ---------------------------------------------------------------------------------------
// lanes: every row loop works on groups of kLanes columns held in GCC / Clang vector
// extensions, kLanes columns at a time, kLanes = one native register. The vectorisation does
// not depend on GCC's auto-vectoriser, which gave up on these loops for AVX2 targets
// (-fopt-info-vec: "not vectorized: control flow in loop" for the gradient loop, and the
// statistics loop ran its scalar version), so the AVX2 build ran scalar code: ~6 ns per
// logit and fp32 sums accumulated sequentially over 2048 columns.
// ---------------------------------------------------------------------------------------
// one native register of fp32 lanes: wider generic vectors are split by GCC element by element
// for comparisons and conversions, which is slower than scalar code
#if defined(__AVX512F__)
#define XTF_LANES 16
#elif defined(__AVX2__)  // 8 lanes need 256-bit integer ops too (AVX alone splits them)
#define XTF_LANES 8
#else  // SSE2 / NEON / AVX without AVX2
#define XTF_LANES 4
#endif
constexpr int kLanes = XTF_LANES;
constexpr int64_t kFold = 16 * kLanes;  // fp32 lane sums are folded into double every kFold columns
typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef int32_t vi __attribute__((vector_size(kLanes * 4)));
typedef uint32_t vu __attribute__((vector_size(kLanes * 4)));
typedef uint16_t vh __attribute__((vector_size(kLanes * 2)));
typedef double vdh __attribute__((vector_size(kLanes * 4)));  // kLanes / 2 doubles: one register
typedef float vfh __attribute__((vector_size(kLanes * 2)));   // kLanes / 2 floats: half a register

// fp64 lane sums: kLanes doubles held as two native registers (a single kLanes-double vector
// is wider than the ISA's registers, and GCC would keep it, and what feeds it, in memory)
struct Sum64 {
  vdh lo = vdh{}, hi = vdh{};
  XTF_INLINE void add(vf v) {
    // the two halves by memcpy (compiles to register extracts; __builtin_shufflevector
    // would need GCC >= 12)
    vfh a, b;
    std::memcpy(&a, &v, sizeof(a));
    std::memcpy(&b, reinterpret_cast<const char*>(&v) + sizeof(a), sizeof(b));
    lo += __builtin_convertvector(a, vdh);
    hi += __builtin_convertvector(b, vdh);
  }
  XTF_INLINE double total() const {
    double s = 0.0;
    for (int l = 0; l < kLanes / 2; ++l) s += lo[l];
    for (int l = 0; l < kLanes / 2; ++l) s += hi[l];
    return s;
  }
};

template <typename V, typename S>
XTF_INLINE V splat(S s) {
  return V{} + s;  // scalar broadcast to every lane
}

XTF_INLINE vf lane_iota() {
  vf r;
  for (int l = 0; l < kLanes; ++l) r[l] = static_cast<float>(l);
  return r;
}

// ---------------------------------------------------------------------------------------
// element conversion: plain integer / float lane arithmetic, no calls
// ---------------------------------------------------------------------------------------
XTF_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// fp16 bits -> fp32, exact for normals, subnormals, inf and NaN; no fp32 subnormal is ever
// an operand, so the result is the same with denormals-are-zero set (torch.set_flush_denormal)
XTF_INLINE vf half_to_float(vu u) {
  const vu sign = (u & 0x8000u) << 16;
  const vu em = u & 0x7FFFu;
  const vf normal = (vf)(em << 13) * splat<vf>(0x1p112f);                   // exponent rebias
  const vf sub = __builtin_convertvector((vi)em, vf) * splat<vf>(0x1p-24f);  // m * 2^-24, exact
  const vu special = (em << 13) | 0x7F800000u;                                // inf / NaN
  vu bits = (em < splat<vu>(0x0400u)) ? (vu)sub : (vu)normal;
  bits = (em >= splat<vu>(0x7C00u)) ? special : bits;
  return (vf)(bits | sign);
}

// fp32 -> fp16 bits, round to nearest even (the classic bias trick; overflow to inf, NaN kept)
XTF_INLINE vu float_to_half(vf f) {
  const vu w = (vu)f;
  const vu shl1 = w + w;
  const vu sign = w & 0x80000000u;
  vf base = ((vf)(w & 0x7FFFFFFFu) * splat<vf>(0x1p112f)) * splat<vf>(0x1p-110f);
  vu bias = shl1 & 0xFF000000u;
  bias = (bias < splat<vu>(0x71000000u)) ? splat<vu>(0x71000000u) : bias;
  base = (vf)((bias >> 1) + 0x07800000u) + base;
  const vu bits = (vu)base;
  const vu nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  return (sign >> 16) | ((shl1 > splat<vu>(0xFF000000u)) ? splat<vu>(0x7E00u) : nonsign);
}

// fp32 -> bf16 bits, round to nearest even, NaN -> quiet NaN
XTF_INLINE vu float_to_bf16(vf v) {
  const vu u = (vu)v;
  const vu r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (v != v) ? splat<vu>(0x7FC0u) : r;
}

// one full group of kLanes elements
XTF_INLINE vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
XTF_INLINE vf vload(const c10::BFloat16* p) {
  vh h;
  std::memcpy(&h, p, sizeof(h));
  return (vf)(__builtin_convertvector(h, vu) << 16);
}
XTF_INLINE vf vload(const c10::Half* p) {
  vh h;
  std::memcpy(&h, p, sizeof(h));
  return half_to_float(__builtin_convertvector(h, vu));
}
XTF_INLINE void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
XTF_INLINE void vstore(c10::BFloat16* p, vf v) {
  const vh h = __builtin_convertvector(float_to_bf16(v), vh);
  std::memcpy(p, &h, sizeof(h));
}
XTF_INLINE void vstore(c10::Half* p, vf v) {
  const vh h = __builtin_convertvector(float_to_half(v), vh);
  std::memcpy(p, &h, sizeof(h));
}

// a partial group (n < kLanes elements; the other lanes hold `fill`) and its store
template <typename T>
XTF_INLINE vf vload_part(const T* p, int n, float fill) {
  T tmp[kLanes];
  for (int l = 0; l < kLanes; ++l) tmp[l] = T(0.0f);
  std::memcpy(tmp, p, sizeof(T) * n);
  vf v = vload(tmp);
  const vf lanes = lane_iota();
  return (lanes < splat<vf>(static_cast<float>(n))) ? v : splat<vf>(fill);
}
template <typename T>
XTF_INLINE void vstore_part(T* p, int n, vf v) {
  T tmp[kLanes];
  vstore(tmp, v);
  std::memcpy(p, tmp, sizeof(T) * n);
}

// single elements through the same lane code (so a scalar recomputation equals the vector one)
template <typename T>
XTF_INLINE float load1(const T* p, int64_t i) {
  return vload_part(p + i, 1, 0.0f)[0];
}
template <typename T>
XTF_INLINE void store1(T* p, int64_t i, float v) {
  vstore_part(p + i, 1, splat<vf>(v));
}

// exp(x) for x <= ~88: Cephes expf polynomial on x - n ln2, |r| <= ln2 / 2, ~1 ulp.
// Underflows to exactly 0 below -87.3; NaN in gives NaN out. The clamps are written as
// max / min selects (one instruction each: a NaN lane becomes -87.3 there and is restored at
// the end), and 2^n is built from the integer bits of the rounding sum 1.5 * 2^23 + n.
XTF_INLINE vf vexp(vf x) {
  vf xc = (x > splat<vf>(-87.3f)) ? x : splat<vf>(-87.3f);
  xc = (xc < splat<vf>(88.7f)) ? xc : splat<vf>(88.7f);
  // round to nearest through the 1.5 * 2^23 magic constant
  const vf nm = xc * 1.44269504088896341f + 12582912.0f;
  const vf n = nm - 12582912.0f;
  vf r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat<vf>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // the bits of nm are those of 1.5 * 2^23 plus n (|n| <= 128): shifted by 23, only n's
  // remain (mod 2^32); adding 127 << 23 biases the exponent
  const vi e = (vi)((vu)nm << 23) + 0x3F800000;  // unsigned shift: no signed overflow
  vf out = p * (vf)e;
  out = (x >= splat<vf>(-87.3f)) ? out : splat<vf>(0.0f);
  return (x != x) ? x : out;
}

// c * tanh(raw / c). For |t| >= 0.625 through one exp, tanh|t| = 1 - 2 / (exp(2|t|) + 1)
// (no cancellation there: the result is >= 0.55); below, where that form cancels, the odd
// minimax polynomial of Cephes' tanhf (relative error ~1e-7). Both are computed per lane and
// one is selected.
XTF_INLINE vf vsoftcap(vf raw, float c, float inv_c) {
  const vf t = raw * inv_c;
  const vf a = (vf)((vu)t & 0x7FFFFFFFu);
  const vf e = vexp(2.0f * ((a > splat<vf>(40.0f)) ? splat<vf>(40.0f) : a));
  const vf big = 1.0f - 2.0f / (e + 1.0f);
  const vf s = a * a;
  vf poly = splat<vf>(-5.70498872745e-3f);
  poly = poly * s + 2.06390887954e-2f;
  poly = poly * s - 5.37397155531e-2f;
  poly = poly * s + 1.33314422036e-1f;
  poly = poly * s - 3.33332819422e-1f;
  const vf small = poly * s * a + a;
  vf th = (a < splat<vf>(0.625f)) ? small : big;
  th = (t < splat<vf>(0.0f)) ? -th : th;
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

// z of a group starting at column j: raw (+ bias) (then softcap when CAP); n < kLanes: a
// partial group whose other lanes hold `fill` before the softcap
template <typename T, bool CAP, bool BIAS>
XTF_INLINE vf zgroup(const T* row, const float* bias, int64_t j, int n, float fill, const Params& P) {
  vf v = n == kLanes ? vload(row + j) : vload_part(row + j, n, fill);
  if constexpr (BIAS) v += n == kLanes ? vload(bias + j) : vload_part(bias + j, n, 0.0f);
  if constexpr (CAP) v = vsoftcap(v, P.cap, P.inv_cap);
  return v;
}

// Precise z (libm tanh) for the single gold element.
template <typename T>
inline double zval_precise(const T* row, const float* bias, int64_t j, const Params& P) {
  double v = static_cast<double>(load1(row, j));
  if (bias) v += static_cast<double>(bias[j]);
  return P.has_cap ? static_cast<double>(P.cap) * std::tanh(v / static_cast<double>(P.cap)) : v;
}

struct RowStats {
  float max, lse, gold, entropy, zsum;  // lse, gold, zsum relative to max
};

// max over the row of raw (+ bias); NaN lanes are ignored here (the sums catch them)
template <typename T, bool BIAS>
float row_max_t(const T* row, const float* bias, int64_t C, const Params& P) {
  const float ninf = -std::numeric_limits<float>::infinity();
  vf mx = splat<vf>(ninf);
  const int64_t full = C - C % kLanes;
  for (int64_t j = 0; j < full; j += kLanes) {
    const vf v = zgroup<T, false, BIAS>(row, bias, j, kLanes, ninf, P);
    mx = (v > mx) ? v : mx;
  }
  if (full < C) {
    const vf v = zgroup<T, false, BIAS>(row, bias, full, static_cast<int>(C - full), ninf, P);
    mx = (v > mx) ? v : mx;
  }
  float m = ninf;
  for (int l = 0; l < kLanes; ++l) m = mx[l] > m ? mx[l] : m;
  return m;
}

// Statistics of one full-vocabulary row (two sweeps: max, then exp-sums of z - max). Each
// lane sums 16 columns in fp32 before its partial sums are folded into double lanes.
// KEEP_EXP (fp32 rows without a softcap): the row is overwritten with exp(z - max), which the
// gradient sweep then scales (row_grad with kept_gold) instead of computing every exp again;
// the gold logit is read before the overwrite.
template <typename T, bool CAP, bool BIAS, bool KEEP_EXP = false>
RowStats row_stats_t(T* row, const float* bias, int64_t C, int64_t y, const Params& P) {
  static_assert(!KEEP_EXP || (std::is_same<T, float>::value && !CAP), "KEEP_EXP: fp32 rows, no softcap");
  const double zy = zval_precise(row, bias, y, P);
  float m = row_max_t<T, BIAS>(row, bias, C, P);
  if constexpr (CAP) m = vsoftcap(splat<vf>(m), P.cap, P.inv_cap)[0];  // softcap is monotone
  const vf mv = splat<vf>(m), zero = splat<vf>(0.0f);
  Sum64 S, Tt, Z;
  const int64_t full = C - C % kLanes;
  for (int64_t j0 = 0; j0 < full; j0 += kFold) {
    const int64_t j1 = std::min(full, j0 + kFold);
    vf bs = zero, bt = zero, bz = zero;
    for (int64_t j = j0; j < j1; j += kLanes) {
      const vf zc = zgroup<T, CAP, BIAS>(row, bias, j, kLanes, 0.0f, P) - mv;
      const vf e = vexp(zc);
      if constexpr (KEEP_EXP) vstore(row + j, e);
      bs += e;
      bt += (e > zero) ? e * zc : zero;  // 0 * log 0 = 0 (a -inf logit)
      bz += zc;
    }
    S.add(bs);
    Tt.add(bt);
    Z.add(bz);
  }
  if (full < C) {  // the last partial group: lanes past the row end contribute nothing
    const int n = static_cast<int>(C - full);
    const vi valid = lane_iota() < splat<vf>(static_cast<float>(n));
    vf zc = zgroup<T, CAP, BIAS>(row, bias, full, n, 0.0f, P) - mv;
    const vf e = valid ? vexp(zc) : zero;
    if constexpr (KEEP_EXP) vstore_part(row + full, n, e);
    zc = valid ? zc : zero;
    S.add(e);
    Tt.add((e > zero) ? e * zc : zero);
    Z.add(zc);
  }
  const double s = S.total(), t = Tt.total(), zs = Z.total();
  const bool bad = std::isnan(s) || !std::isfinite(m);  // a NaN, a +inf or an all -inf row
  RowStats r;
  const double lse = std::log(s);
  r.max = m;
  r.lse = bad ? std::numeric_limits<float>::quiet_NaN() : static_cast<float>(lse);
  r.gold = static_cast<float>(zy - static_cast<double>(m));
  r.entropy = static_cast<float>(lse - t / s);
  r.zsum = static_cast<float>(zs);
  return r;
}

template <typename T>
RowStats row_stats(T* row, const float* bias, int64_t C, int64_t y, const Params& P) {
  if (P.has_cap) {
    return bias ? row_stats_t<T, true, true>(row, bias, C, y, P)
                : row_stats_t<T, true, false>(row, bias, C, y, P);
  }
  return bias ? row_stats_t<T, false, true>(row, bias, C, y, P)
              : row_stats_t<T, false, false>(row, bias, C, y, P);
}

// scale * d loss / d raw of one group, given the row's max m, a = scale * (1 + 2 zl lse) *
// exp(-lse_rel) and sub = scale * ls / V. KEPT: the row holds exp(z - m) already (row_stats_t
// with KEEP_EXP), the same lane values this computes otherwise.
template <typename T, bool CAP, bool BIAS, bool KEPT = false>
XTF_INLINE vf grad_group(const T* row, const float* bias, int64_t j, int n, float m, float a,
                         float sub, const Params& P) {
  if constexpr (KEPT) {
    const vf e = n == kLanes ? vload(row + j) : vload_part(row + j, n, 0.0f);
    return e * a - sub;
  } else {
    const vf z = zgroup<T, CAP, BIAS>(row, bias, j, n, 0.0f, P);
    vf g = vexp(z - m) * a - sub;
    if constexpr (CAP) {
      const vf q = z * P.inv_cap;
      g *= 1.0f - q * q;
    }
    return g;
  }
}

// Overwrite columns [0, C) of a row with scale * d loss / d raw (the gold column is fixed up
// by the caller); acc (optional, fp32 [C]) += the gradient before the rounding to T.
template <typename T, bool CAP, bool BIAS, bool KEPT = false>
void row_grad_t(T* row, const float* bias, int64_t C, float m, float a, float sub,
                const Params& P, float* acc) {
  const int64_t full = C - C % kLanes;
  for (int64_t j = 0; j < full; j += kLanes) {
    const vf g = grad_group<T, CAP, BIAS, KEPT>(row, bias, j, kLanes, m, a, sub, P);
    if (acc) vstore(acc + j, vload(acc + j) + g);
    vstore(row + j, g);
  }
  if (full < C) {
    const int n = static_cast<int>(C - full);
    const vf g = grad_group<T, CAP, BIAS, KEPT>(row, bias, full, n, m, a, sub, P);
    if (acc) vstore_part(acc + full, n, vload_part(acc + full, n, 0.0f) + g);
    vstore_part(row + full, n, g);
  }
}

// what row_grad_t computes for the single column j (before rounding)
template <typename T>
float grad_at(const T* row, const float* bias, int64_t j, float m, float a, float sub,
              const Params& P, bool kept) {
  const float* b = bias ? bias + j : nullptr;
  if (kept) return grad_group<T, false, false, true>(row + j, b, 0, 1, m, a, sub, P)[0];
  if (P.has_cap) {
    return b ? grad_group<T, true, true>(row + j, b, 0, 1, m, a, sub, P)[0]
             : grad_group<T, true, false>(row + j, b, 0, 1, m, a, sub, P)[0];
  }
  return b ? grad_group<T, false, true>(row + j, b, 0, 1, m, a, sub, P)[0]
           : grad_group<T, false, false>(row + j, b, 0, 1, m, a, sub, P)[0];
}

// scale * d loss / d raw at the gold column in double, from its precise z (bias, softcap applied)
double gold_grad_at(double z, float m, float lse_rel, double lse, float scale, const Params& P) {
  const double p = std::exp(z - static_cast<double>(m) - lse_rel);
  double g = p * (1.0 + 2.0 * P.zl * lse) - P.ls / static_cast<double>(P.vocab) - (1.0 - P.ls);
  if (P.has_cap) {
    const double q = z / P.cap;
    g *= 1.0 - q * q;
  }
  return g * scale;
}

// acc (optional, fp32 [C]): += the row's gradient before rounding (the bias gradient).
// kept_gold (optional): the row holds exp(z - m) (row_stats_t with KEEP_EXP) and this is the
// precise gold z that row_stats_t read before overwriting it.
template <typename T>
void row_grad(T* row, const float* bias, int64_t C, int64_t y_local, float m, float lse_rel,
              float scale, const Params& P, float* acc, const double* kept_gold = nullptr) {
  const double lse = static_cast<double>(m) + lse_rel;
  const float a = static_cast<float>(scale * (1.0 + 2.0 * P.zl * lse) * std::exp(-lse_rel));
  const float sub = scale * P.ls / static_cast<float>(P.vocab);
  const bool kept = kept_gold != nullptr;
  TORCH_CHECK(!kept || (std::is_same<T, float>::value), "row_grad: kept exp values need fp32 rows");
  // gold element from the precise z before the row is overwritten
  double gold_grad = 0.0;
  float gold_vec = 0.0f;  // what the vector loop will put there (replaced below)
  const bool hit = y_local >= 0 && y_local < C;
  if (hit) {
    const double z = kept ? *kept_gold : zval_precise(row, bias, y_local, P);
    gold_grad = gold_grad_at(z, m, lse_rel, lse, scale, P);
    if (acc) gold_vec = grad_at(row, bias, y_local, m, a, sub, P, kept);
  }
  if (kept) {  // fp32 rows only (row_stats_and_grad)
    if constexpr (std::is_same<T, float>::value) row_grad_t<T, false, false, true>(row, bias, C, m, a, sub, P, acc);
  } else if (P.has_cap) {
    if (bias) row_grad_t<T, true, true>(row, bias, C, m, a, sub, P, acc);
    else row_grad_t<T, true, false>(row, bias, C, m, a, sub, P, acc);
  } else {
    if (bias) row_grad_t<T, false, true>(row, bias, C, m, a, sub, P, acc);
    else row_grad_t<T, false, false>(row, bias, C, m, a, sub, P, acc);
  }
  if (hit) {
    store1(row, y_local, static_cast<float>(gold_grad));
    if (acc) acc[y_local] += static_cast<float>(gold_grad) - gold_vec;
  }
}

// Statistics of one full-vocabulary row, then the row overwritten with its unit-upstream
// gradient (acc as in row_grad). fp32 rows without a softcap keep exp(z - m) from the
// statistics sweep, so each logit costs one exp; the others compute it again.
template <typename T>
RowStats row_stats_and_grad(T* row, const float* bias, int64_t C, int64_t y, const Params& P, float* acc) {
  if constexpr (std::is_same<T, float>::value) {
    if (!P.has_cap) {
      const double zy = zval_precise(row, bias, y, P);
      const RowStats st = bias ? row_stats_t<T, false, true, true>(row, bias, C, y, P)
                               : row_stats_t<T, false, false, true>(row, bias, C, y, P);
      row_grad(row, bias, C, y, st.max, st.lse, 1.0f, P, acc, &zy);
      return st;
    }
  }
  const RowStats st = row_stats(row, bias, C, y, P);
  row_grad(row, bias, C, y, st.max, st.lse, 1.0f, P, acc);
  return st;
}

// The rows [0, R) cut into `parts` contiguous parts, one per thread of ATen's pool, and fp32
// column sums of the gradient (the bias gradient) kept per part, then added into db in part
// order: the result does not depend on which thread ran which part (no thread ids).
struct RowParts {
  int64_t R, parts;
  explicit RowParts(int64_t rows)
      : R(rows), parts(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows))) {}
  // f(part, r0, r1) for every part, in parallel
  template <typename F>
  void run(F&& f) const {
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) f(p, R * p / parts, R * (p + 1) / parts);
    });
  }
};

struct ColumnSums {
  float* out;
  int64_t C;
  std::vector<float> bufs;
  ColumnSums(const c10::optional<at::Tensor>& db, int64_t cols, int64_t parts) : out(nullptr), C(cols) {
    if (!db.has_value() || !db->defined()) return;
    TORCH_CHECK(db->scalar_type() == at::kFloat && db->is_contiguous() && db->dim() == 1 &&
                    db->size(0) == cols,
                "db: expected a contiguous 1-D float32 tensor of ", cols, " entries");
    out = db->data_ptr<float>();
    bufs.assign(static_cast<size_t>(parts) * C, 0.0f);
  }
  float* part(int64_t p) { return out ? bufs.data() + p * C : nullptr; }
  void reduce() {
    if (!out) return;
    const int64_t np = static_cast<int64_t>(bufs.size()) / std::max<int64_t>(C, 1);
    at::parallel_for(0, C, 4096, [&](int64_t c0, int64_t c1) {
      for (int64_t p = 0; p < np; ++p) {
        const float* b = bufs.data() + p * C;
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

void check_logits(const at::Tensor& z, const char* name) {
  TORCH_CHECK(z.device().is_cpu(), name, ": expected a CPU tensor");
  TORCH_CHECK(z.dim() == 2, name, ": expected a 2-D [rows, cols] tensor, got ", z.dim(), "-D");
  TORCH_CHECK(z.stride(1) == 1, name, ": expected unit stride along the vocabulary");
  const auto t = z.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, name,
              ": expected float32, bfloat16 or float16, got ", t);
}

const float* bias_ptr(const c10::optional<at::Tensor>& bias, int64_t cols, int64_t offset) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->dim() == 1,
              "bias: expected a contiguous 1-D float32 tensor");
  TORCH_CHECK(bias->size(0) >= offset + cols, "bias: expected at least ", offset + cols,
              " entries, got ", bias->size(0));
  return bias->data_ptr<float>() + offset;
}

void check_rows(const at::Tensor& t, int64_t rows, at::ScalarType dt, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows && t.is_contiguous() && t.scalar_type() == dt,
              name, ": expected a contiguous 1-D ", dt, " tensor of ", rows, " entries");
}

// Calls f(T{}) with T the element type of z (float32, bfloat16 or float16; check_logits has
// refused the others).
template <typename F>
void dispatch_logits(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kBFloat16: f(c10::BFloat16(0.0f)); break;
    case at::kHalf: f(c10::Half(0.0f)); break;
    default: f(0.0f); break;
  }
}

}  // namespace

namespace xtf_native {

// Statistics of every row of z [R, V] (the full vocabulary). For the first n_grad rows,
// z is then overwritten with d loss / d raw logits (unit upstream gradient); db (optional,
// fp32 [V]) += the column sums of that gradient in fp32.
// Returns (row_max, lse, gold, entropy, sum_logits), each fp32 [R]; lse, gold and sum_logits
// are relative to row_max (lse = log sum exp(z - row_max), gold = z_y - row_max, ...).
std::vector<at::Tensor> stats_and_grad(at::Tensor z, at::Tensor y,
                                          c10::optional<at::Tensor> bias,
                                          c10::optional<double> softcap, double label_smoothing,
                                          double z_loss, int64_t n_grad,
                                          c10::optional<at::Tensor> db) {
  check_logits(z, "z");
  const int64_t R = z.size(0), V = z.size(1);
  check_rows(y, R, at::kLong, "y");
  TORCH_CHECK(n_grad >= 0 && n_grad <= R, "n_grad: expected a value in [0, ", R, "], got ", n_grad);
  const float* b = bias_ptr(bias, V, 0);
  const Params P = make_params(softcap, label_smoothing, z_loss, V);
  auto opts = at::TensorOptions().dtype(at::kFloat);
  auto mx = at::empty({R}, opts), lse = at::empty({R}, opts);
  auto gold = at::empty({R}, opts), ent = at::empty({R}, opts), zsum = at::empty({R}, opts);
  const int64_t* yp = y.data_ptr<int64_t>();
  float *mp = mx.data_ptr<float>(), *lp = lse.data_ptr<float>(), *gp = gold.data_ptr<float>();
  float *ep = ent.data_ptr<float>(), *sp = zsum.data_ptr<float>();
  const int64_t ld = z.stride(0);
  const RowParts parts(R);
  ColumnSums sums(db, V, parts.parts);
  dispatch_logits(z.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* base = z.data_ptr<scalar_t>();
    parts.run([&](int64_t p, int64_t r0, int64_t r1) {
      float* acc = sums.part(p);
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* row = base + r * ld;
        TORCH_CHECK(yp[r] >= 0 && yp[r] < V, "y: expected labels in [0, ", V, ")");
        const RowStats st = r < n_grad ? row_stats_and_grad(row, b, V, yp[r], P, acc)
                                       : row_stats(row, b, V, yp[r], P);
        mp[r] = st.max;
        lp[r] = st.lse;
        gp[r] = st.gold;
        ep[r] = st.entropy;
        sp[r] = st.zsum;
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
void grad_block_(at::Tensor z, at::Tensor y, at::Tensor row_max, at::Tensor lse,
                 c10::optional<at::Tensor> row_scale, c10::optional<at::Tensor> bias,
                 int64_t v0, int64_t vocab, c10::optional<double> softcap, double label_smoothing,
                 double z_loss, c10::optional<at::Tensor> db) {
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
  const RowParts parts(R);
  ColumnSums sums(db, C, parts.parts);
  dispatch_logits(z.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* base = z.data_ptr<scalar_t>();
    parts.run([&](int64_t p, int64_t r0, int64_t r1) {
      float* acc = sums.part(p);
      for (int64_t r = r0; r < r1; ++r) {
        row_grad(base + r * ld, b, C, yp[r] - v0, mp[r], lp[r], sc ? sc[r] : 1.0f, P, acc);
      }
    });
  });
  sums.reduce();
}

// c * tanh(x / c) elementwise through the row kernels' softcap (a test hook).
at::Tensor softcap_values(at::Tensor x, double c) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x: expected a contiguous float32 CPU tensor");
  TORCH_CHECK(c > 0, "c: expected a positive softcap, got ", c);
  auto out = at::empty_like(x);
  const float cf = static_cast<float>(c), inv = 1.0f / cf;
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t n = x.numel();
  for (int64_t i = 0; i < n; i += kLanes) {
    const int k = static_cast<int>(std::min<int64_t>(kLanes, n - i));
    vstore_part(op + i, k, vsoftcap(vload_part(xp + i, k, 0.0f), cf, inv));
  }
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
#elif defined(__AVX__)
  s += ", avx";
#else
  s += ", baseline";
#endif
  s += ", lanes=" + std::to_string(kLanes);
  s += ", threads=" + std::to_string(at::get_num_threads());
  return s;
}

}  // namespace xtf_native
