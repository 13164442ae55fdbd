// The status of a flamingo_rt CUDA host function: one record, per calling thread, of the
// last CUDA error's text for every kernel file (read through last_cuda_error() and the
// per-op *_cuda_last_error() spellings of the public headers).
#pragma once

#include <cuda_runtime.h>

#include "flamingo_rt/kernels.h"

namespace flamingo_rt {
namespace cuda_detail {

// kOk for cudaSuccess; otherwise records cudaGetErrorString(e) as the calling thread's last
// CUDA error and returns kCudaError. Defined in cuda_status.cu.
Status record_cuda_error(cudaError_t e);

// The status of the kernel launches made since the last check (cudaGetLastError), recorded.
inline Status launch_status() { return record_cuda_error(cudaGetLastError()); }

}  // namespace cuda_detail
}  // namespace flamingo_rt
