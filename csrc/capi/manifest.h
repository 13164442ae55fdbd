// manifest.json of an export folder (written by flamingo_rt/export/package.py), version 2: the
// media encoder takes N media a call, (N, F, 3, S, S) -> (X, 2, N, L, H, dh), the decode step
// B rows in [1, max_beams].
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace flamingo_rt::capi {

struct Manifest {
  std::string device;  // "cpu" or "cuda"
  std::string dtype;   // "float32", "bfloat16", ...
  std::string torch_version;  // the torch that compiled the packages, e.g. "2.14.1+cu130"
  int max_seq_len = 0, max_media = 0, max_frames = 0, image_size = 0, vocab_size = 0;
  int max_beams = 1;  // the most rows the decode step takes at once
  std::array<float, 3> image_mean{}, image_std{};
  int32_t image_id = 0, eoc_id = 0, pad_id = 0, eos_id = 0;
  std::vector<int64_t> kv_cache_shape, media_cache_shape, media_kv_shape;
  std::string encode_package, step_package, decode_package;
  std::string score_package;  // empty for exports made before the score step (2026-12-07)
};

// Reads and checks `folder`/manifest.json. Throws ApiError (FLAMINGO_ERR_IO when missing,
// FLAMINGO_ERR_FORMAT when malformed, naming the field).
Manifest read_manifest(const std::string& folder);

}  // namespace flamingo_rt::capi
