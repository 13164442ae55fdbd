// Builds without CUDA still export the CUDA entry points of xattn_cuda.h (they return
// kNotCompiled), so C++ hosts link either way.
#include "flamingo_rt/xattn_cuda.h"

namespace flamingo_rt {

#ifndef FLAMINGO_RT_WITH_CUDA
Status image_causal_attention_fwd_cuda(const ImageCausalAttnParams&, void*) { return Status::kNotCompiled; }
Status image_causal_attention_decode_cuda(const ImageCausalAttnParams&, void*) { return Status::kNotCompiled; }
const char* image_causal_attention_cuda_last_error() { return ""; }
#endif

}  // namespace flamingo_rt
