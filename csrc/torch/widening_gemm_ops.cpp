// bfloat16 x bfloat16 -> float32 matrix products through MKL's cblas_gemm_bf16bf16f32, the
// BLAS that torch's x86-64 CPU library carries inside it (AMX or AVX512-BF16 kernels on
// Intel CPUs):
//
//   flamingo_rt_C::widening_gemm_available() -> bool
//   flamingo_rt_C::widening_addmm_(Tensor(a!) c, Tensor a, Tensor b, float alpha, float beta) -> ()
//       c = beta * c + alpha * (a @ b), c float32 (M, N) with unit column stride, a (M, K) and
//       b (K, N) bfloat16 with a unit stride in either dim (a transposed operand is read in
//       place: no copy), accumulated in float32 and never rounded to bfloat16. beta = 0: c is
//       only written.
//
// torch's own bfloat16 products return bfloat16, so a float32 weight gradient or an input
// gradient summed over several products needs a widening pass per product, and oneDNN runs a
// column-major first operand (every dy^T x) at half speed on AMX; this product does neither.
// The symbol is declared weak: a torch build without it (non-x86, no MKL) leaves it null and
// widening_gemm_available() says false (callers then take torch.mm and widen).
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include <cstdint>
#include <limits>

extern "C" {
// MKL, LP64 interface (MKL_INT = int); layouts / transposes as CBLAS enums.
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
                            int ldc) __attribute__((weak));
}

namespace flamingo_rt {
namespace torch_ops {
namespace {

constexpr const char* kOp = "flamingo_rt_C::widening_addmm_";
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

bool widening_gemm_available() { return cblas_gemm_bf16bf16f32 != nullptr; }

bool fits_int(int64_t v) { return v >= 0 && v <= std::numeric_limits<int>::max(); }

// An operand of rows x cols as (transpose flag, leading dimension), reading it in place when
// one of its strides is 1; else a contiguous copy in `keep`.
struct Operand {
  const uint16_t* p;
  int trans, ld;
};

Operand operand(const at::Tensor& t, at::Tensor& keep) {
  const int64_t rows = t.size(0), cols = t.size(1);
  if (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(cols, 1) && fits_int(t.stride(0))) {
    keep = t;
    return {static_cast<const uint16_t*>(t.data_ptr()), kNoTrans, int(std::max<int64_t>(t.stride(0), 1))};
  }
  if (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(rows, 1) && fits_int(t.stride(1))) {
    keep = t;
    return {static_cast<const uint16_t*>(t.data_ptr()), kTrans, int(std::max<int64_t>(t.stride(1), 1))};
  }
  keep = t.contiguous();
  return {static_cast<const uint16_t*>(keep.data_ptr()), kNoTrans, int(std::max<int64_t>(cols, 1))};
}

void widening_addmm_(at::Tensor c, const at::Tensor& a, const at::Tensor& b, double alpha, double beta) {
  TORCH_CHECK(widening_gemm_available(), kOp,
              ": this torch build has no MKL cblas_gemm_bf16bf16f32 (check widening_gemm_available() first)");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2, kOp, ": expected 2-D c, a, b, got ", c.dim(), ", ",
              a.dim(), ", ", b.dim(), " dims");
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16, kOp,
              ": expected bfloat16 a and b, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(c.scalar_type() == at::kFloat, kOp, ": expected a float32 c, got ", c.scalar_type());
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu() && c.device().is_cpu(), kOp, ": expected CPU tensors");
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  TORCH_CHECK(b.size(0) == K && c.size(0) == M && c.size(1) == N, kOp, ": expected c (M, N) = a (M, K) @ b (K, N), got c ",
              c.sizes(), ", a ", a.sizes(), ", b ", b.sizes());
  TORCH_CHECK(c.stride(1) == 1 || N <= 1, kOp, ": expected c with unit column stride, got strides ", c.strides());
  TORCH_CHECK(fits_int(M) && fits_int(N) && fits_int(K) && fits_int(c.stride(0)), kOp,
              ": sizes and strides must fit 32 bits, got c ", c.sizes(), " a ", a.sizes());
  if (M == 0 || N == 0) return;
  if (K == 0) {  // an empty sum
    if (beta == 0.0)
      c.zero_();
    else if (beta != 1.0)
      c.mul_(beta);
    return;
  }
  at::Tensor ka, kb;
  const Operand oa = operand(a, ka), ob = operand(b, kb);
  const int ldc = int(std::max<int64_t>(c.stride(0), std::max<int64_t>(N, 1)));
  cblas_gemm_bf16bf16f32(kRowMajor, oa.trans, ob.trans, int(M), int(N), int(K), float(alpha), oa.p, oa.ld, ob.p,
                         ob.ld, float(beta), static_cast<float*>(c.data_ptr()), ldc);
}

}  // namespace
}  // namespace torch_ops
}  // namespace flamingo_rt

TORCH_LIBRARY_FRAGMENT(flamingo_rt_C, m) {
  m.def("widening_gemm_available() -> bool", [] { return flamingo_rt::torch_ops::widening_gemm_available(); });
  m.def("widening_addmm_(Tensor(a!) c, Tensor a, Tensor b, float alpha, float beta) -> ()");
}

TORCH_LIBRARY_IMPL(flamingo_rt_C, CPU, m) {
  m.impl("widening_addmm_", &flamingo_rt::torch_ops::widening_addmm_);
}
