// flamingo_rt public C++ kernel API.
//
// Plain C++17, no torch, no Python: every kernel takes one params struct of raw
// pointers, sizes and strides (in elements, any value, so NCHW, channels-last NHWC and
// other views all work), a dtype tag, and for CUDA a `void* stream` (a cudaStream_t;
// nullptr means the legacy default stream). Every function returns a Status instead of
// throwing; `status_string` turns it into text.
//
// CPU kernels live in csrc/cpu (library `flamingo_rt_kernels`), CUDA kernels in csrc/cuda
// (compiled into the same library when the build has CUDA; `built_with_cuda()` says
// whether it did; without CUDA the *_cuda functions exist and return kNotCompiled).
#pragma once

#include <cstddef>
#include <cstdint>

namespace flamingo_rt {

// Element type of a kernel's tensors. bfloat16 and float16 are stored as 16-bit
// patterns (uint16_t). Math is float32 for float32/bfloat16/float16 and float64 for
// float64.
enum class DType : int32_t {
  kFloat32 = 0,
  kBFloat16 = 1,
  kFloat16 = 2,  // CUDA kernels only
  kFloat64 = 3,  // for checking (gradcheck) more than for speed
};

// Pointwise activation.
enum class Act : int32_t {
  kGelu = 0,  // exact: x * Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))
  kRelu = 1,  // max(x, 0)
  kSilu = 2,  // x * sigmoid(x)
};

enum class Status : int32_t {
  kOk = 0,
  kInvalidArgument = 1,   // null pointer, negative size, bad enum value, ...
  kUnsupportedDtype = 2,  // dtype not implemented by this backend
  kNotCompiled = 3,       // CUDA function called in a build without CUDA
  kCudaError = 4,         // a CUDA launch or runtime call failed
  kWorkspaceTooSmall = 5, // workspace missing or smaller than *_workspace_bytes()
};

inline const char* status_string(Status s) {
  switch (s) {
    case Status::kOk: return "ok";
    case Status::kInvalidArgument: return "invalid argument";
    case Status::kUnsupportedDtype: return "unsupported dtype";
    case Status::kNotCompiled: return "not compiled in this build";
    case Status::kCudaError: return "CUDA error";
    case Status::kWorkspaceTooSmall: return "workspace too small";
  }
  return "unknown status";
}

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
    case DType::kFloat64: return "float64";
  }
  return "unknown dtype";
}

inline const char* act_name(Act a) {
  switch (a) {
    case Act::kGelu: return "gelu";
    case Act::kRelu: return "relu";
    case Act::kSilu: return "silu";
  }
  return "unknown act";
}

// Parses "gelu" / "relu" / "silu". Returns false (and leaves *out alone) otherwise.
inline bool act_from_string(const char* s, Act* out) {
  if (s == nullptr || out == nullptr) return false;
  auto eq = [](const char* a, const char* b) {
    while (*a && *a == *b) { ++a; ++b; }
    return *a == *b;
  };
  if (eq(s, "gelu")) { *out = Act::kGelu; return true; }
  if (eq(s, "relu")) { *out = Act::kRelu; return true; }
  if (eq(s, "silu")) { *out = Act::kSilu; return true; }
  return false;
}

// True when this build compiled the CUDA kernels.
bool built_with_cuda();

// True when the bfloat16 CPU attention forward (image_causal_attention_fwd_cpu in
// image-causal mode with head dims a multiple of 32 and unit element strides; the
// resampler's attention goes through it) runs its products on Intel AMX tiles: the CPU has
// AMX-BF16, the OS granted this process tile data, and the environment variable
// FLAMINGO_RT_CPU_AMX is not "0" (read at every call). Otherwise the AVX-512 / AVX2 float32
// kernel runs.
bool cpu_amx_enabled();

// Text of the last CUDA error a flamingo_rt CUDA function returned kCudaError for, on
// the calling thread ("" if none; always "" without CUDA).
const char* last_cuda_error();

// ---------------------------------------------------------------------------------
// bias_gamma_act
//
//   y[n, c, h, w] = gamma * act(x[n, c, h, w] + bias[c])
//
// over a logical (N, C, H, W) tensor. Element (n, c, h, w) of tensor T lives at
// T + n*strides[0] + c*strides[1] + h*strides[2] + w*strides[3] (strides in elements).
// bias is optional (nullptr: no bias); it has C elements of `dtype` spaced bias_stride
// apart. x, bias and y all have `dtype`. y may alias x only when
// y_strides == x_strides (in place). An empty tensor is a no-op.
struct BiasGammaActParams {
  DType dtype = DType::kFloat32;
  Act act = Act::kGelu;
  double gamma = 1.0;
  int64_t sizes[4] = {0, 0, 0, 0};  // N, C, H, W

  const void* x = nullptr;
  int64_t x_strides[4] = {0, 0, 0, 0};
  const void* bias = nullptr;  // optional
  int64_t bias_stride = 1;
  void* y = nullptr;
  int64_t y_strides[4] = {0, 0, 0, 0};

  void* stream = nullptr;  // cudaStream_t (CUDA only)
};

// Backward of bias_gamma_act:
//
//   grad_x[n, c, h, w] = gamma * act'(x[n, c, h, w] + bias[c]) * grad_out[n, c, h, w]
//   grad_bias[c]       = sum over n, h, w of grad_x[n, c, h, w]
//
// grad_bias is optional (nullptr: not computed). The sum is accumulated in float32 or
// better (float64 for float64) from the unrounded values of grad_x, in an order fixed by
// the shape alone, so it is deterministic (run to run, and independent of the thread
// count).
// grad_x may alias grad_out when their strides are equal. If N*H*W == 0, grad_bias is
// set to zero.
struct BiasGammaActBackwardParams {
  DType dtype = DType::kFloat32;
  Act act = Act::kGelu;
  double gamma = 1.0;
  int64_t sizes[4] = {0, 0, 0, 0};  // N, C, H, W

  const void* grad_out = nullptr;
  int64_t grad_out_strides[4] = {0, 0, 0, 0};
  const void* x = nullptr;
  int64_t x_strides[4] = {0, 0, 0, 0};
  const void* bias = nullptr;  // optional
  int64_t bias_stride = 1;
  void* grad_x = nullptr;
  int64_t grad_x_strides[4] = {0, 0, 0, 0};
  void* grad_bias = nullptr;  // optional, C elements of dtype
  int64_t grad_bias_stride = 1;

  // CUDA only: device scratch memory of at least
  // bias_gamma_act_backward_cuda_workspace_bytes(params) bytes (when that is > 0).
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  void* stream = nullptr;  // cudaStream_t (CUDA only)
};

// CPU (OpenMP) kernels: float32, bfloat16 and float64.
Status bias_gamma_act_cpu(const BiasGammaActParams& p);
Status bias_gamma_act_backward_cpu(const BiasGammaActBackwardParams& p);

// CUDA kernels: float32, bfloat16, float16 and float64; pointers are device pointers; the
// launch is asynchronous on p.stream.
Status bias_gamma_act_cuda(const BiasGammaActParams& p);
size_t bias_gamma_act_backward_cuda_workspace_bytes(const BiasGammaActBackwardParams& p);
Status bias_gamma_act_backward_cuda(const BiasGammaActBackwardParams& p);

}  // namespace flamingo_rt

#include "flamingo_rt/xattn.h"
#include "flamingo_rt/small_linear.h"
#include "flamingo_rt/transpose.h"
#include "flamingo_rt/decode_attention.h"
#include "flamingo_rt/layer_norm.h"
#include "flamingo_rt/softmax_xent.h"
#include "flamingo_rt/decode_layer.h"
