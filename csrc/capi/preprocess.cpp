#include "preprocess.h"

#include <ATen/ATen.h>

namespace flamingo_rt::capi {

at::Tensor frames_from_rgb8(const uint8_t* rgb, int frames, int width, int height) {
  at::Tensor t = at::from_blob(const_cast<uint8_t*>(rgb), {frames, height, width, 3}, at::kByte);
  return t.permute({0, 3, 1, 2}).to(at::kFloat).div_(255.0);  // a copy: the host keeps its buffer
}

at::Tensor preprocess_frames(const at::Tensor& frames, const Manifest& m, at::ScalarType dtype, at::Device device) {
  at::Tensor t = frames;
  const int64_t S = m.image_size;
  if (t.size(2) != S || t.size(3) != S) {
    t = at::_upsample_bilinear2d_aa(t, {S, S}, /*align_corners=*/false);
  }
  at::Tensor mean = at::tensor({m.image_mean[0], m.image_mean[1], m.image_mean[2]}).view({1, 3, 1, 1});
  at::Tensor std = at::tensor({m.image_std[0], m.image_std[1], m.image_std[2]}).view({1, 3, 1, 1});
  t = (t - mean) / std;
  return t.unsqueeze(0).to(device, dtype).contiguous();
}

}  // namespace flamingo_rt::capi
