// Pixels from the host -> the media encoder's input: (1, F, 3, S, S) in the model dtype,
// resized (bilinear, antialiased, as flamingo_rt.runtime.prompt.preprocess_media) and
// normalised with the manifest's mean and std.
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>

#include "manifest.h"

namespace flamingo_rt::capi {

// frames: (F, 3, H, W) float32 in [0, 1] (CPU). Returns (1, F, 3, S, S).
at::Tensor preprocess_frames(const at::Tensor& frames, const Manifest& m, at::ScalarType dtype, at::Device device);

// RGB8 HWC frames, back to back -> (F, 3, H, W) float32 in [0, 1].
at::Tensor frames_from_rgb8(const uint8_t* rgb, int frames, int width, int height);

}  // namespace flamingo_rt::capi
