// Cross-entropy over rows of logits, with the softmax gradient written in place (CPU kernel):
//
//   lse[r]   = log(sum_j exp(logits[r, j]))
//   loss[r]  = lse[r] - logits[r, target[r]]                 (0 where target[r] == ignore_index)
//   logits[r, j] <- scale * (exp(logits[r, j] - lse[r]) - [j == target[r]])
//                                                            (the whole row 0 where ignored)
//
// The gradient overwrite is optional (write_grad). logits float32 or bfloat16 (the logits of a
// bf16 product are read as such and the gradient rounded to nearest even once, as
// `softmax(logits.float()) - onehot` cast to bf16 would be); math in float32. Targets must be
// in [0, V) or ignore_index (checked: kInvalidArgument otherwise, nothing written for that
// row's gradient). Rows (unit element stride, any row stride) over OpenMP threads.
#pragma once

#include <cstdint>

namespace flamingo_rt {

struct SoftmaxXentRowsParams {
  void* logits = nullptr;  // (N, V), row stride `stride`; overwritten with the gradient when write_grad
  DType dtype = DType::kFloat32;
  int64_t stride = 0;
  const int64_t* targets = nullptr;  // (N,)
  int64_t ignore_index = -100;
  float* loss = nullptr;  // (N,) per-row loss, 0 for ignored rows
  bool write_grad = false;
  float scale = 1.0f;  // the gradient's multiplier
  int64_t N = 0, V = 0;
};

Status softmax_xent_rows_cpu(const SoftmaxXentRowsParams& p);

}  // namespace flamingo_rt
