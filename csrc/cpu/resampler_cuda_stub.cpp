// resampler_attention_cuda in a build without CUDA: exists, returns kNotCompiled
// (the kernel is csrc/cuda/resampler.cu).
#include "flamingo_rt/resampler_cuda.h"

#ifndef FLAMINGO_RT_WITH_CUDA
namespace flamingo_rt {

Status resampler_attention_cuda(const ResamplerAttentionParams&) { return Status::kNotCompiled; }

const char* resampler_attention_cuda_last_error() { return "not compiled with CUDA"; }

}  // namespace flamingo_rt
#endif  // FLAMINGO_RT_WITH_CUDA
