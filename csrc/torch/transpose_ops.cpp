// torch op over the tiled transposed copy (csrc/cpu/transpose.cpp):
//
//   flamingo_rt_C::transpose_copy(Tensor a) -> Tensor
//
// a (R, C) on the CPU, any strides, 2-, 4- or 8-byte elements; returns a.t() as a new
// contiguous (C, R) tensor: a.t().contiguous(), several times faster on large matrices.
// CPU kernel (fake kernel in flamingo_rt/_cpp_fakes.py); no autograd here.
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include "common.h"

namespace flamingo_rt {
namespace torch_ops {
namespace {

constexpr const char* kTC = "flamingo_rt_C::transpose_copy";

at::Tensor transpose_copy_cpu_impl(const at::Tensor& a) {
  TORCH_CHECK(a.dim() == 2, kTC, ": expected a 2-D tensor, got ", a.dim(), " dims (shape ", a.sizes(), ")");
  TORCH_CHECK(a.device().is_cpu(), kTC, ": expected a CPU tensor, got ", a.device());
  const int64_t es = a.element_size();
  TORCH_CHECK(es == 2 || es == 4 || es == 8, kTC, ": expected 2-, 4- or 8-byte elements, got ",
              a.scalar_type(), " (", es, " bytes)");
  TORCH_CHECK(!a.is_complex() || es == 8, kTC, ": complex tensors are not supported");
  at::Tensor out = at::empty({a.size(1), a.size(0)}, a.options());
  Transpose2dParams p;
  p.src = a.data_ptr();
  p.dst = out.data_ptr();
  p.R = a.size(0);
  p.C = a.size(1);
  p.src_stride_r = a.stride(0);
  p.src_stride_c = a.stride(1);
  p.elem_size = es;
  const Status s = transpose_2d_cpu(p);
  TORCH_CHECK(s == Status::kOk, kTC, ": kernel failed: ", status_string(s));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flamingo_rt_C, m) { m.def("transpose_copy(Tensor a) -> Tensor"); }

TORCH_LIBRARY_IMPL(flamingo_rt_C, CPU, m) { m.impl("transpose_copy", &transpose_copy_cpu_impl); }

}  // namespace torch_ops
}  // namespace flamingo_rt
