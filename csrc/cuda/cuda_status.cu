// The one thread-local record of the last CUDA error (see cuda_status.cuh).
#include "cuda_status.cuh"

namespace flamingo_rt {
namespace {
thread_local const char* g_last_error = "";
}  // namespace

namespace cuda_detail {
Status record_cuda_error(cudaError_t e) {
  if (e == cudaSuccess) return Status::kOk;
  g_last_error = cudaGetErrorString(e);
  return Status::kCudaError;
}
}  // namespace cuda_detail

const char* last_cuda_error() { return g_last_error; }

}  // namespace flamingo_rt
