// ctest `xattn_cpu`: image_causal_attention_fwd_cpu through the public header on a small
// input (float32 and float64, both modes, rows before any image and a row with no image,
// output poisoned with NaN first) against a scalar float64 computation. Exits non-zero on
// failure.
#include "flamingo_rt/kernels.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

using flamingo_rt::DType;
using flamingo_rt::Status;

namespace {

int g_fail = 0;

template <typename T>
void run(DType dt, bool allp, std::mt19937_64& rng) {
  const int64_t B = 2, Tn = 21, H = 2, dh = 24, M = 3, N = 5;
  std::normal_distribution<double> nd;
  std::vector<T> q(B * Tn * H * dh), k(B * M * N * H * dh), v(k.size()), out(q.size(), T(NAN));
  for (auto& x : q) x = T(nd(rng));
  for (auto& x : k) x = T(nd(rng));
  for (auto& x : v) x = T(nd(rng));
  std::vector<int32_t> mi(B * Tn, -1);
  for (int64_t t = 3; t < Tn; ++t) mi[t] = t < 9 ? 0 : t < 10 ? 1 : 2;  // row 1: no image
  const double scale = 1.0 / std::sqrt(double(dh));
  flamingo_rt::ImageCausalAttnParams p;
  p.dtype = dt;
  p.B = B; p.T = Tn; p.H = H; p.dh = dh; p.M = M; p.N = N;
  p.all_previous = allp;
  p.scale = scale;
  const int64_t qs[4] = {Tn * H * dh, H * dh, dh, 1}, ks[5] = {M * N * H * dh, N * H * dh, H * dh, dh, 1};
  p.q = q.data(); p.k = k.data(); p.v = v.data(); p.out = out.data();
  for (int d = 0; d < 4; ++d) p.q_strides[d] = p.out_strides[d] = qs[d];
  for (int d = 0; d < 5; ++d) p.k_strides[d] = p.v_strides[d] = ks[d];
  p.media_index = mi.data();
  p.media_index_strides[0] = Tn;
  p.media_index_strides[1] = 1;
  if (flamingo_rt::image_causal_attention_fwd_cpu(p) != Status::kOk) {
    std::printf("FAIL: status\n");
    ++g_fail;
    return;
  }
  double num = 0, den = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < Tn; ++t)
      for (int64_t h = 0; h < H; ++h) {
        const int32_t idx = mi[b * Tn + t];
        std::vector<double> s, o(dh, 0.0);
        std::vector<int64_t> keys;
        for (int64_t j = (allp ? 0 : idx); idx >= 0 && j <= idx; ++j)
          for (int64_t n = 0; n < N; ++n) {
            double d = 0;
            for (int64_t i = 0; i < dh; ++i)
              d += double(q[((b * Tn + t) * H + h) * dh + i]) * double(k[(((b * M + j) * N + n) * H + h) * dh + i]);
            s.push_back(d * scale);
            keys.push_back(j * N + n);
          }
        double mx = -INFINITY, sum = 0;
        for (double x : s) mx = std::max(mx, x);
        for (double& x : s) sum += (x = std::exp(x - mx));
        for (size_t e = 0; e < s.size(); ++e)
          for (int64_t i = 0; i < dh; ++i) o[i] += s[e] / sum * double(v[((b * M * N + keys[e]) * H + h) * dh + i]);
        for (int64_t i = 0; i < dh; ++i) {
          const double got = double(out[((b * Tn + t) * H + h) * dh + i]);
          if (!(std::isfinite(got)) || (idx < 0 && got != 0.0)) ++g_fail;
          num += (got - o[i]) * (got - o[i]);
          den += o[i] * o[i];
        }
      }
  const double rel = std::sqrt(num / den), tol = dt == DType::kFloat64 ? 1e-13 : 2e-6;
  std::printf("xattn fwd %s all_previous=%d: rel err %.3g\n", flamingo_rt::dtype_name(dt), int(allp), rel);
  if (!(rel < tol)) ++g_fail;
}

}  // namespace

int main() {
  std::mt19937_64 rng(std::random_device{}());
  for (bool allp : {false, true}) {
    run<float>(DType::kFloat32, allp, rng);
    run<double>(DType::kFloat64, allp, rng);
  }
  std::printf("xattn_cpu: %d failures\n", g_fail);
  return g_fail == 0 ? 0 : 1;
}
