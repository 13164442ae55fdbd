// torch op over the row cross-entropy kernel (csrc/cpu/softmax_xent.cpp):
//
//   flamingo_rt_C::softmax_xent_rows_(Tensor(a!) logits, Tensor targets, int ignore_index,
//                                     bool write_grad, float scale) -> Tensor loss
//
// logits (N, V) float32 / bfloat16 on the CPU with unit element stride (any row stride, e.g.
// a column block of a wider tensor is not allowed: the row must be whole); targets (N,)
// int64. Returns the per-row loss (N,) float32 (0 where the target is ignore_index); with
// write_grad the logits are overwritten by scale * (softmax - onehot) (0 rows where
// ignored). No autograd here (linear_cross_entropy's autograd function calls it); fake
// kernel in flamingo_rt/_cpp_fakes.py.
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include "common.h"

namespace flamingo_rt {
namespace torch_ops {
namespace {

constexpr const char* kXent = "flamingo_rt_C::softmax_xent_rows_";

at::Tensor softmax_xent_rows_cpu_impl(at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index,
                                      bool write_grad, double scale) {
  TORCH_CHECK(logits.dim() == 2, kXent, ": expected logits (N, V), got shape ", logits.sizes());
  TORCH_CHECK(logits.device().is_cpu() && targets.device().is_cpu(), kXent, ": expected CPU tensors, got ",
              logits.device(), " and ", targets.device());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16, kXent,
              ": expected float32 or bfloat16 logits, got ", logits.scalar_type());
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0 || N == 0, kXent, ": expected a non-empty vocabulary, got V = 0");
  TORCH_CHECK(logits.stride(1) == 1 || V <= 1, kXent, ": expected logits with unit element stride, got strides ",
              logits.strides());
  TORCH_CHECK(N <= 1 || logits.stride(0) >= V, kXent, ": expected non-overlapping rows, got strides ",
              logits.strides());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == N && targets.scalar_type() == at::kLong, kXent,
              ": expected int64 targets of shape (", N, "), got ", targets.scalar_type(), " ", targets.sizes());
  at::Tensor t = targets.contiguous();
  at::Tensor loss = at::empty({N}, logits.options().dtype(at::kFloat));
  SoftmaxXentRowsParams p;
  p.logits = logits.data_ptr();
  p.dtype = logits.scalar_type() == at::kFloat ? DType::kFloat32 : DType::kBFloat16;
  p.stride = N > 1 ? logits.stride(0) : V;
  p.targets = t.data_ptr<int64_t>();
  p.ignore_index = ignore_index;
  p.loss = loss.data_ptr<float>();
  p.write_grad = write_grad;
  p.scale = float(scale);
  p.N = N;
  p.V = V;
  if (N > 0) {
    const Status s = softmax_xent_rows_cpu(p);
    TORCH_CHECK(s != Status::kInvalidArgument, kXent, ": expected targets in [0, ", V, ") or ", ignore_index,
                " (ignored)");
    TORCH_CHECK(s == Status::kOk, kXent, ": kernel failed: ", status_string(s));
  }
  return loss;
}

}  // namespace
}  // namespace torch_ops
}  // namespace flamingo_rt

TORCH_LIBRARY_FRAGMENT(flamingo_rt_C, m) {
  m.def("softmax_xent_rows_(Tensor(a!) logits, Tensor targets, int ignore_index, bool write_grad, float scale) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(flamingo_rt_C, CPU, m) {
  m.impl("softmax_xent_rows_", &flamingo_rt::torch_ops::softmax_xent_rows_cpu_impl);
}
