// ctest `kernels_cpu`: the CPU kernels through the public header only, against a
// straightforward scalar float64 computation, on fresh random data every run.
//
// Checked: bias_gamma_act forward and backward (dx and dbias), float32, bfloat16, float64,
// gelu / relu / silu, with and without bias, layouts NCHW, NHWC, a permuted padded
// view and a stride-0 (expanded) input; outputs are poisoned with NaN first; dbias
// must be bitwise identical across runs and thread counts. transpose_2d_cpu bit for bit on
// three source layouts; spatial_mean_cpu (NFNet squeeze) on channels-last and NCHW sources;
// softmax_xent_rows_cpu's loss and in-place gradient (float32, a wider row stride, an ignored row);
// the Winograd 3x3 convolution's three stages (weight, input and output transforms, products)
// against a direct float64 convolution, V, M and y poisoned first, several tile ranges, and
// its weight-gradient stages against a float64 correlation of x and dy.
// Exits non-zero on failure.
#include "flamingo_rt/conv3x3_winograd.h"
#include "flamingo_rt/conv3x3_winograd_bf16.h"
#include "flamingo_rt/kernels.h"
#include "flamingo_rt/nfnet.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

using flamingo_rt::Act;
using flamingo_rt::DType;
using flamingo_rt::Status;

namespace {

constexpr double kPi = 3.14159265358979323846;

int g_failures = 0;
int g_checks = 0;

uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A logical (N, C, H, W) tensor stored with arbitrary strides in a buffer of dtype.
struct Tensor {
  DType dtype;
  int64_t sizes[4];
  int64_t strides[4];
  std::vector<unsigned char> buf;
  size_t esz() const { return dtype == DType::kFloat64 ? 8 : dtype == DType::kFloat32 ? 4 : 2; }
  int64_t off(int64_t n, int64_t c, int64_t h, int64_t w) const {
    return n * strides[0] + c * strides[1] + h * strides[2] + w * strides[3];
  }
  double get(int64_t i) const {
    if (dtype == DType::kFloat64) {
      double d;
      std::memcpy(&d, buf.data() + i * 8, 8);
      return d;
    }
    if (dtype == DType::kFloat32) {
      float f;
      std::memcpy(&f, buf.data() + i * 4, 4);
      return f;
    }
    uint16_t h;
    std::memcpy(&h, buf.data() + i * 2, 2);
    return bf16_to_f32(h);
  }
  void set(int64_t i, double v) {
    if (dtype == DType::kFloat64) {
      std::memcpy(buf.data() + i * 8, &v, 8);
    } else if (dtype == DType::kFloat32) {
      const float f = float(v);
      std::memcpy(buf.data() + i * 4, &f, 4);
    } else {
      uint16_t h = f32_to_bf16(float(v));
      std::memcpy(buf.data() + i * 2, &h, 2);
    }
  }
  double at(int64_t n, int64_t c, int64_t h, int64_t w) const { return get(off(n, c, h, w)); }
  void* data() { return buf.data(); }
};

// layout: "nchw", "nhwc", "perm" (memory order N, W, C, H with padding on C),
// "expand" (stride 0 along H; for inputs only).
Tensor make(DType dt, const int64_t sz[4], const std::string& layout) {
  Tensor t;
  t.dtype = dt;
  std::memcpy(t.sizes, sz, sizeof(t.sizes));
  const int64_t N = sz[0], C = sz[1], H = sz[2], W = sz[3];
  int64_t extent;
  if (layout == "nhwc") {
    int64_t s[4] = {H * W * C, 1, W * C, C};
    std::memcpy(t.strides, s, sizeof(s));
    extent = N * H * W * C;
  } else if (layout == "perm") {
    const int64_t Hp = H, Cp = C + 3;  // padding between channel blocks
    int64_t s[4] = {W * Cp * Hp, Hp, 1, Cp * Hp};
    std::memcpy(t.strides, s, sizeof(s));
    extent = N * W * Cp * Hp;
  } else if (layout == "expand") {
    int64_t s[4] = {C * W, W, 0, 1};
    std::memcpy(t.strides, s, sizeof(s));
    extent = N * C * W;
  } else {
    int64_t s[4] = {C * H * W, H * W, W, 1};
    std::memcpy(t.strides, s, sizeof(s));
    extent = N * C * H * W;
  }
  t.buf.assign(size_t(extent) * t.esz(), 0);
  return t;
}

void fill_random(Tensor& t, std::mt19937_64& rng, float scale) {
  std::normal_distribution<double> nd(0.0, scale);
  const int64_t n = int64_t(t.buf.size() / t.esz());
  for (int64_t i = 0; i < n; ++i) t.set(i, nd(rng));
}

void poison(Tensor& t) {
  const int64_t n = int64_t(t.buf.size() / t.esz());
  for (int64_t i = 0; i < n; ++i) t.set(i, std::nan(""));
}

double act_ref(Act a, double v) {
  switch (a) {
    case Act::kRelu: return v > 0 ? v : 0.0;
    case Act::kSilu: return v / (1.0 + std::exp(-v));
    default: return 0.5 * v * std::erfc(-v / std::sqrt(2.0));
  }
}
double act_grad_ref(Act a, double v) {
  switch (a) {
    case Act::kRelu: return v > 0 ? 1.0 : 0.0;
    case Act::kSilu: {
      const double s = 1.0 / (1.0 + std::exp(-v));
      return s * (1.0 + v * (1.0 - s));
    }
    default: {
      const double cdf = 0.5 * std::erfc(-v / std::sqrt(2.0));
      return cdf + v * std::exp(-0.5 * v * v) / std::sqrt(2.0 * kPi);
    }
  }
}

// Sum of the magnitudes of the terms of act'(v): the scale of float32 rounding
// errors in act'(v), which can cancel to near zero (gelu' near v = -0.75).
double act_grad_mag_ref(Act a, double v) {
  switch (a) {
    case Act::kRelu: return 1.0;
    case Act::kSilu: {
      const double s = 1.0 / (1.0 + std::exp(-v));
      return s * (1.0 + std::fabs(v) * (1.0 - s));
    }
    default: {
      const double cdf = 0.5 * std::erfc(-v / std::sqrt(2.0));
      return cdf + std::fabs(v) * std::exp(-0.5 * v * v) / std::sqrt(2.0 * kPi);
    }
  }
}

void expect(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::printf("  FAIL: %s\n", what.c_str());
  }
}

struct Err {
  double num = 0, den = 0, worst = 0;
  bool nan = false;
  // |got - ref| must be <= tol_abs + tol_rel * scale (scale >= |ref|).
  void add(double got, double ref, double tol_abs, double tol_rel, double scale) {
    if (!std::isfinite(got)) nan = true;
    num += (got - ref) * (got - ref);
    den += ref * ref;
    const double e = std::fabs(got - ref) / (tol_abs + tol_rel * scale);
    if (e > worst || std::isnan(e)) worst = std::isnan(e) ? 1e30 : e;
  }
  double rel() const { return std::sqrt(num / (den > 0 ? den : 1.0)); }
};

void run_case(std::mt19937_64& rng, DType dt, Act act, bool with_bias, const int64_t sz[4],
              const std::string& in_layout, const std::string& out_layout) {
  const bool bf = dt == DType::kBFloat16, f64 = dt == DType::kFloat64;
  // Elementwise bound |got - ref| <= atol + rtol |ref|, with the kernel computing in
  // float32 and rounding once at the output (bf16: half an ulp = 2^-9 relative);
  // float64 kernels compute in float64.
  const double rtol = bf ? 8e-3 : f64 ? 1e-13 : 2e-6, atol = bf ? 1e-5 : f64 ? 1e-15 : 1e-7;
  const double gamma = 1.7015043497085571;
  const int64_t N = sz[0], C = sz[1], H = sz[2], W = sz[3];
  char name[256];
  std::snprintf(name, sizeof(name), "%s %s bias=%d in=%s out=%s shape=(%lld,%lld,%lld,%lld)",
                flamingo_rt::dtype_name(dt), flamingo_rt::act_name(act), int(with_bias),
                in_layout.c_str(), out_layout.c_str(), (long long)N, (long long)C,
                (long long)H, (long long)W);

  Tensor x = make(dt, sz, in_layout), dy = make(dt, sz, in_layout == "expand" ? "nchw" : in_layout);
  fill_random(x, rng, 2.0);
  fill_random(dy, rng, 1.0);
  int64_t bsz[4] = {1, C, 1, 1};
  Tensor bias = make(dt, bsz, "nchw");
  fill_random(bias, rng, 1.0);
  Tensor y = make(dt, sz, out_layout), dx = make(dt, sz, out_layout), db = make(dt, bsz, "nchw");
  poison(y);
  poison(dx);
  poison(db);

  flamingo_rt::BiasGammaActParams fp;
  fp.dtype = dt;
  fp.act = act;
  fp.gamma = gamma;
  std::memcpy(fp.sizes, sz, sizeof(fp.sizes));
  fp.x = x.data();
  std::memcpy(fp.x_strides, x.strides, sizeof(fp.x_strides));
  fp.bias = with_bias ? bias.data() : nullptr;
  fp.bias_stride = 1;
  fp.y = y.data();
  std::memcpy(fp.y_strides, y.strides, sizeof(fp.y_strides));
  Status st = flamingo_rt::bias_gamma_act_cpu(fp);
  expect(st == Status::kOk, std::string(name) + ": forward status " + flamingo_rt::status_string(st));

  flamingo_rt::BiasGammaActBackwardParams bp;
  bp.dtype = dt;
  bp.act = act;
  bp.gamma = gamma;
  std::memcpy(bp.sizes, sz, sizeof(bp.sizes));
  bp.grad_out = dy.data();
  std::memcpy(bp.grad_out_strides, dy.strides, sizeof(bp.grad_out_strides));
  bp.x = x.data();
  std::memcpy(bp.x_strides, x.strides, sizeof(bp.x_strides));
  bp.bias = with_bias ? bias.data() : nullptr;
  bp.grad_x = dx.data();
  std::memcpy(bp.grad_x_strides, dx.strides, sizeof(bp.grad_x_strides));
  bp.grad_bias = db.data();
  st = flamingo_rt::bias_gamma_act_backward_cpu(bp);
  expect(st == Status::kOk, std::string(name) + ": backward status " + flamingo_rt::status_string(st));

  Err ey, edx, edb;
  std::vector<double> dbias_ref(size_t(C), 0.0), dbias_abs(size_t(C), 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) {
          const double v = double(x.at(n, c, h, w)) + (with_bias ? double(bias.get(c)) : 0.0);
          const double yr = gamma * act_ref(act, v);
          ey.add(y.at(n, c, h, w), yr, atol, rtol, std::fabs(yr));
          const double d = double(dy.at(n, c, h, w));
          const double g = gamma * act_grad_ref(act, v) * d;
          edx.add(dx.at(n, c, h, w), g, atol, rtol, std::fabs(g) + gamma * std::fabs(d) * act_grad_mag_ref(act, v) * (bf ? 0.0 : 1.0));
          dbias_ref[size_t(c)] += g;
          dbias_abs[size_t(c)] += std::fabs(g);
        }
  bool db_ok = true;
  for (int64_t c = 0; c < C; ++c) {
    const double got = db.get(c), ref = dbias_ref[size_t(c)];
    // float32 accumulation: error grows with the sum of magnitudes, not the result.
    const double tol = f64 ? 1e-13 * dbias_abs[size_t(c)] + 1e-15
                           : (bf ? 8e-3 * std::fabs(ref) : 0.0) + 1e-6 * dbias_abs[size_t(c)] + 1e-6;
    edb.num += (got - ref) * (got - ref);
    edb.den += ref * ref;
    if (!(std::fabs(got - ref) <= tol)) db_ok = false;
  }
  char msg[512];
  std::snprintf(msg, sizeof(msg), "%s: y rel err %.2e (worst/tol %.2f)%s", name, ey.rel(), ey.worst,
                ey.nan ? " NON-FINITE OUTPUT" : "");
  expect(!ey.nan && ey.worst <= 1.0, msg);
  std::snprintf(msg, sizeof(msg), "%s: dx rel err %.2e (worst/tol %.2f)%s", name, edx.rel(), edx.worst,
                edx.nan ? " NON-FINITE OUTPUT" : "");
  expect(!edx.nan && edx.worst <= 1.0, msg);
  std::snprintf(msg, sizeof(msg), "%s: dbias rel err %.2e", name, std::sqrt(edb.num / (edb.den + 1e-300)));
  expect(db_ok, msg);

  // Determinism: dbias bitwise identical on a rerun and with one thread.
  Tensor db2 = make(dt, bsz, "nchw");
  poison(db2);
  bp.grad_bias = db2.data();
#ifdef _OPENMP
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
#endif
  st = flamingo_rt::bias_gamma_act_backward_cpu(bp);
#ifdef _OPENMP
  omp_set_num_threads(threads);
#endif
  expect(st == Status::kOk && db2.buf == db.buf, std::string(name) + ": dbias deterministic across thread counts");

  std::printf("  checked %-86s y %.1e dx %.1e db %.1e\n", name, ey.rel(), edx.rel(),
              std::sqrt(edb.num / (edb.den + 1e-300)));
}

void test_errors() {
  flamingo_rt::BiasGammaActParams p;
  float a[4] = {0, 0, 0, 0};
  int64_t sz[4] = {1, 1, 2, 2};
  std::memcpy(p.sizes, sz, sizeof(sz));
  int64_t st[4] = {4, 4, 2, 1};
  std::memcpy(p.x_strides, st, sizeof(st));
  std::memcpy(p.y_strides, st, sizeof(st));
  p.x = a;
  p.y = a;
  p.dtype = DType::kFloat16;
  expect(flamingo_rt::bias_gamma_act_cpu(p) == Status::kUnsupportedDtype, "float16 on CPU -> kUnsupportedDtype");
  p.dtype = DType::kFloat32;
  p.y = nullptr;
  expect(flamingo_rt::bias_gamma_act_cpu(p) == Status::kInvalidArgument, "null y -> kInvalidArgument");
  p.y = a;
  p.act = static_cast<Act>(7);
  expect(flamingo_rt::bias_gamma_act_cpu(p) == Status::kInvalidArgument, "bad act -> kInvalidArgument");
  p.act = Act::kGelu;
  p.sizes[0] = -1;
  expect(flamingo_rt::bias_gamma_act_cpu(p) == Status::kInvalidArgument, "negative size -> kInvalidArgument");
  Act parsed;
  expect(flamingo_rt::act_from_string("silu", &parsed) && parsed == Act::kSilu, "act_from_string(silu)");
  expect(!flamingo_rt::act_from_string("tanh", &parsed), "act_from_string(tanh) fails");
  // Empty batch: dbias is zero.
  flamingo_rt::BiasGammaActBackwardParams b;
  int64_t esz[4] = {0, 3, 2, 2};
  std::memcpy(b.sizes, esz, sizeof(esz));
  float db[3] = {std::nanf(""), std::nanf(""), std::nanf("")};
  b.grad_bias = db;
  expect(flamingo_rt::bias_gamma_act_backward_cpu(b) == Status::kOk && db[0] == 0 && db[1] == 0 && db[2] == 0,
         "N=0 backward zeroes dbias");
  std::printf("  error handling checks done\n");
}

// transpose_2d_cpu: dst (C, R) == src^T bit for bit, for 2/4/8-byte elements, a row-major,
// a column-major and a padded strided source, odd and threaded sizes; then the errors.
template <typename T>
void check_transpose(std::mt19937_64& rng, int64_t R, int64_t C, int layout) {
  // layout 0: row-major (R, C); 1: the transpose of a row-major (C, R); 2: every other
  // element of a (2R, 2C + 3) row-major buffer.
  const int64_t rows = layout == 2 ? 2 * R : R, cols = layout == 2 ? 2 * C + 3 : C;
  std::vector<T> buf(size_t(rows * cols));
  for (auto& v : buf) v = T(rng());
  int64_t sr = C, sc = 1;
  if (layout == 1) { sr = 1; sc = R; }
  if (layout == 2) { sr = 2 * cols; sc = 2; }
  std::vector<T> dst(size_t(R * C), T(0x5a));
  flamingo_rt::Transpose2dParams p;
  p.src = buf.data();
  p.dst = dst.data();
  p.R = R;
  p.C = C;
  p.src_stride_r = sr;
  p.src_stride_c = sc;
  p.elem_size = sizeof(T);
  bool ok = flamingo_rt::transpose_2d_cpu(p) == Status::kOk;
  for (int64_t r = 0; ok && r < R; ++r)
    for (int64_t c = 0; c < C; ++c)
      if (dst[size_t(c * R + r)] != buf[size_t(r * sr + c * sc)]) { ok = false; break; }
  expect(ok, "transpose " + std::to_string(sizeof(T)) + "-byte " + std::to_string(R) + "x" +
                 std::to_string(C) + " layout " + std::to_string(layout));
}

void test_transpose(std::mt19937_64& rng) {
  const int64_t shapes[][2] = {{1, 1}, {7, 130}, {65, 63}, {300, 257}, {1024, 96}};
  for (const auto& s : shapes)
    for (int layout = 0; layout < 3; ++layout) {
      check_transpose<uint16_t>(rng, s[0], s[1], layout);
      check_transpose<uint32_t>(rng, s[0], s[1], layout);
      check_transpose<uint64_t>(rng, s[0], s[1], layout);
    }
  flamingo_rt::Transpose2dParams p;
  float a[2] = {0, 0};
  p.src = a;
  p.dst = a;
  p.R = 1;
  p.C = 2;
  p.elem_size = 3;
  expect(flamingo_rt::transpose_2d_cpu(p) == Status::kUnsupportedDtype, "transpose 3-byte -> kUnsupportedDtype");
  p.elem_size = 4;
  p.dst = nullptr;
  expect(flamingo_rt::transpose_2d_cpu(p) == Status::kInvalidArgument, "transpose null dst -> kInvalidArgument");
  p.R = 0;
  expect(flamingo_rt::transpose_2d_cpu(p) == Status::kOk, "transpose of an empty matrix -> kOk");
  p.R = -1;
  expect(flamingo_rt::transpose_2d_cpu(p) == Status::kInvalidArgument, "transpose negative size -> kInvalidArgument");
  std::printf("  transpose checks done\n");
}


// spatial_mean_cpu: the float64 mean of each (n, c) plane within float32 rounding, for a
// channels-last and an NCHW float32 source (odd and threaded sizes), NaN for H * W == 0,
// and the errors.
void test_spatial_mean(std::mt19937_64& rng) {
  std::normal_distribution<float> nd(0.5f, 1.0f);
  const int64_t shapes[][4] = {{2, 3, 5, 7}, {3, 130, 17, 19}, {1, 64, 1, 1}};
  for (const auto& sz : shapes)
    for (int cl = 0; cl < 2; ++cl) {
      const int64_t N = sz[0], C = sz[1], H = sz[2], W = sz[3];
      std::vector<float> x(size_t(N * C * H * W));
      for (auto& v : x) v = nd(rng);
      flamingo_rt::SpatialMeanParams p;
      p.dtype = DType::kFloat32;
      for (int d = 0; d < 4; ++d) p.sizes[d] = sz[d];
      const int64_t st_cl[4] = {H * W * C, 1, W * C, C}, st_nchw[4] = {C * H * W, H * W, W, 1};
      for (int d = 0; d < 4; ++d) p.x_strides[d] = cl ? st_cl[d] : st_nchw[d];
      std::vector<float> out(size_t(N * C), -1.0f);
      p.x = x.data();
      p.out = out.data();
      bool ok = flamingo_rt::spatial_mean_cpu(p) == Status::kOk;
      for (int64_t n = 0; ok && n < N; ++n)
        for (int64_t c = 0; c < C; ++c) {
          double want = 0.0;
          for (int64_t h = 0; h < H; ++h)
            for (int64_t w = 0; w < W; ++w)
              want += x[size_t(n * p.x_strides[0] + c * p.x_strides[1] + h * p.x_strides[2] + w * p.x_strides[3])];
          want /= double(H * W);
          if (std::fabs(out[size_t(n * C + c)] - want) > 1e-5 * (1.0 + std::fabs(want))) { ok = false; break; }
        }
      expect(ok, "spatial_mean " + std::string(cl ? "channels-last " : "nchw ") + std::to_string(N) + "x" +
                     std::to_string(C) + "x" + std::to_string(H) + "x" + std::to_string(W));
    }
  flamingo_rt::SpatialMeanParams p;
  float out[2] = {0, 0};
  p.sizes[0] = 1; p.sizes[1] = 2; p.sizes[2] = 0; p.sizes[3] = 3;
  p.out = out;
  expect(flamingo_rt::spatial_mean_cpu(p) == Status::kOk && std::isnan(out[0]) && std::isnan(out[1]),
         "spatial_mean of empty planes -> NaN");
  p.sizes[2] = 2;
  expect(flamingo_rt::spatial_mean_cpu(p) == Status::kInvalidArgument, "spatial_mean null x -> kInvalidArgument");
  p.dtype = DType::kFloat16;
  p.x = out;
  expect(flamingo_rt::spatial_mean_cpu(p) == Status::kUnsupportedDtype, "spatial_mean float16 -> kUnsupportedDtype");
  std::printf("  spatial_mean checks done\n");
}

void test_softmax_xent(std::mt19937_64& rng) {
  std::normal_distribution<float> nd(0.0f, 3.0f);
  const int64_t N = 9, V = 1037, stride = 1050;
  std::vector<float> x(static_cast<size_t>(N * stride), 0.0f);
  for (auto& v : x) v = nd(rng);
  std::vector<int64_t> t(static_cast<size_t>(N), 0);
  for (int64_t r = 0; r < N; ++r) t[size_t(r)] = int64_t(rng() % uint64_t(V));
  t[3] = -100;  // ignored
  const std::vector<float> x0 = x;
  std::vector<float> loss(size_t(N), -1.0f);
  flamingo_rt::SoftmaxXentRowsParams p;
  p.logits = x.data();
  p.dtype = DType::kFloat32;
  p.stride = stride;
  p.targets = t.data();
  p.loss = loss.data();
  p.write_grad = true;
  p.scale = 0.5f;
  p.N = N;
  p.V = V;
  bool ok = flamingo_rt::softmax_xent_rows_cpu(p) == Status::kOk;
  for (int64_t r = 0; ok && r < N; ++r) {
    const float* row = x0.data() + r * stride;
    double m = row[0], s = 0.0;
    for (int64_t j = 1; j < V; ++j) m = std::max(m, double(row[j]));
    for (int64_t j = 0; j < V; ++j) s += std::exp(double(row[j]) - m);
    const double lse = m + std::log(s);
    const bool ign = t[size_t(r)] == -100;
    const double want_loss = ign ? 0.0 : lse - row[t[size_t(r)]];
    if (std::fabs(loss[size_t(r)] - want_loss) > 1e-5 * (1.0 + std::fabs(want_loss))) ok = false;
    for (int64_t j = 0; ok && j < V; ++j) {
      const double g = ign ? 0.0 : 0.5 * (std::exp(double(row[j]) - lse) - (j == t[size_t(r)] ? 1.0 : 0.0));
      if (std::fabs(x[size_t(r * stride + j)] - g) > 1e-6) ok = false;
    }
    for (int64_t j = V; ok && j < stride; ++j)  // past the row: untouched
      if (x[size_t(r * stride + j)] != x0[size_t(r * stride + j)]) ok = false;
  }
  expect(ok, "softmax_xent_rows float32 loss and gradient vs float64");
  t[0] = V;
  expect(flamingo_rt::softmax_xent_rows_cpu(p) == Status::kInvalidArgument, "softmax_xent_rows target out of range -> kInvalidArgument");
  p.dtype = DType::kFloat16;
  expect(flamingo_rt::softmax_xent_rows_cpu(p) == Status::kUnsupportedDtype, "softmax_xent_rows float16 -> kUnsupportedDtype");
  std::printf("  softmax_xent_rows checks done\n");
}

}  // namespace

// float64 references for the Winograd checks: conv3x3(x, w, padding 1, groups) over channels-last
// x (N, H, W, C), w (CO, C/G, 3, 3), and its weight gradient for dy (N, H, W, CO).
struct Conv3x3Ref {
  int64_t N, C, H, W, CO, G;
  // the convolution (no bias) at output pixel (n, i, j), channel o
  double out(const std::vector<double>& x, const std::vector<float>& w, int64_t n, int64_t i, int64_t j,
             int64_t o) const {
    const int64_t cg = C / G, g = o / (CO / G);
    double acc = 0.0;
    for (int64_t c = 0; c < cg; ++c)
      for (int64_t ki = 0; ki < 3; ++ki)
        for (int64_t kj = 0; kj < 3; ++kj) {
          const int64_t yy = i + ki - 1, xx = j + kj - 1;
          if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
          acc += x[size_t(((n * H + yy) * W + xx) * C + g * cg + c)] * double(w[size_t(((o * cg + c) * 3 + ki) * 3 + kj)]);
        }
    return acc;
  }
  // dL/dw[o, c, ki, kj]
  double dw(const std::vector<double>& x, const std::vector<double>& dy, int64_t o, int64_t c, int64_t ki,
            int64_t kj) const {
    const int64_t ci = (o / (CO / G)) * (C / G) + c;
    double acc = 0.0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < H; ++i)
        for (int64_t j = 0; j < W; ++j) {
          const int64_t yy = i + ki - 1, xx = j + kj - 1;
          if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
          acc += dy[size_t(((n * H + i) * W + j) * CO + o)] * x[size_t(((n * H + yy) * W + xx) * C + ci)];
        }
    return acc;
  }
};

// gamma * gelu(conv3x3(x, w, padding 1, groups) + bias) through the Winograd stages, x and y
// channels-last (y with a padded pixel stride), tiles in ranges of `chunk` (0: all at once).
void check_winograd(std::mt19937_64& rng, int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t G,
                    int64_t chunk) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t cg = C / G, cog = CO / G, tiles = N * flamingo_rt::winograd_tiles(H) * flamingo_rt::winograd_tiles(W);
  std::vector<float> x(size_t(N * H * W * C)), w(static_cast<size_t>(CO * cg * 9)), b(static_cast<size_t>(CO));
  for (auto& v : x) v = nd(rng);
  for (auto& v : w) v = nd(rng) / std::sqrt(float(9 * cg));
  for (auto& v : b) v = 0.3f * nd(rng);
  const int64_t ystride = CO + 3;  // pixel stride of y
  std::vector<float> u(size_t(36 * G * cg * cog)), y(size_t(N * H * W * ystride), std::nanf(""));
  bool ok = flamingo_rt::winograd_f43_weight_cpu(w.data(), CO, cg, G, u.data()) == Status::kOk;
  const int64_t step = chunk > 0 ? chunk : tiles;
  for (int64_t t0 = 0; ok && t0 < tiles; t0 += step) {
    const int64_t n = std::min(step, tiles - t0);
    std::vector<float> v(size_t(36 * G * n * cg), std::nanf("")), m(size_t(36 * G * n * cog), std::nanf(""));
    flamingo_rt::Conv3x3WinogradParams p;
    p.n = N, p.h = H, p.w = W, p.c_in = C, p.c_out = CO, p.groups = G;
    p.x = x.data(), p.sx_n = H * W * C, p.sx_h = W * C, p.sx_w = C;
    p.tile_begin = t0, p.tile_count = n;
    p.v = v.data(), p.m = m.data(), p.u = u.data(), p.bias = b.data();
    p.has_act = true, p.act = Act::kGelu, p.gamma = 1.5;
    p.y = y.data(), p.sy_n = H * W * ystride, p.sy_h = W * ystride, p.sy_w = ystride;
    ok = flamingo_rt::conv3x3_winograd_input_cpu(p) == Status::kOk &&
         flamingo_rt::conv3x3_winograd_products_cpu(p) == Status::kOk &&
         flamingo_rt::conv3x3_winograd_output_cpu(p) == Status::kOk;
  }
  const Conv3x3Ref ref{N, C, H, W, CO, G};
  const std::vector<double> xd(x.begin(), x.end());
  Err e;
  for (int64_t n = 0; ok && n < N; ++n)
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j)
        for (int64_t o = 0; o < CO; ++o) {
          const double acc = b[size_t(o)] + ref.out(xd, w, n, i, j, o);
          const double want = 1.5 * acc * 0.5 * std::erfc(-acc / std::sqrt(2.0));
          e.add(y[size_t(((n * H + i) * W + j) * ystride + o)], want, 1e-5, 5e-5, 1.0 + std::fabs(want));
        }
  expect(ok && !e.nan && e.worst <= 1.0 && e.rel() < 1e-5,
         "winograd conv " + std::to_string(N) + "x" + std::to_string(C) + "x" + std::to_string(H) + "x" +
             std::to_string(W) + " -> " + std::to_string(CO) + " groups " + std::to_string(G) + " chunk " +
             std::to_string(chunk) + " (rel " + std::to_string(e.rel()) + ")");
}

// dL/dw of that convolution (no bias) for a random dy, through the weight-gradient stages in
// ranges of `chunk` tiles (the first range writes dL/dU, the others add), against float64; the
// same with the last range through conv3x3_winograd_weight_grad_last_cpu (products and inverse
// in one stage, dL/dU of the earlier ranges read, never written for the last) bit for bit.
void check_winograd_weight_grad(std::mt19937_64& rng, int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO,
                                int64_t G, int64_t chunk) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t cg = C / G, cog = CO / G, tiles = N * flamingo_rt::winograd_tiles(H) * flamingo_rt::winograd_tiles(W);
  std::vector<float> x(size_t(N * H * W * C)), dy(size_t(N * H * W * CO));
  for (auto& v : x) v = nd(rng);
  for (auto& v : dy) v = nd(rng);
  std::vector<float> du(size_t(36 * G * cg * cog), std::nanf("")), dw(size_t(CO * cg * 9), std::nanf(""));
  std::vector<float> dw_last(dw.size(), std::nanf(""));
  const int64_t step = chunk > 0 ? chunk : tiles;
  bool ok = true;
  for (const bool last_fused : {false, true}) {
    std::fill(du.begin(), du.end(), std::nanf(""));
    for (int64_t t0 = 0; ok && t0 < tiles; t0 += step) {
      const int64_t n = std::min(step, tiles - t0);
      std::vector<float> v(size_t(36 * G * n * cg), std::nanf("")), m(size_t(36 * G * n * cog), std::nanf(""));
      flamingo_rt::Conv3x3WinogradParams p;
      p.n = N, p.h = H, p.w = W, p.c_in = C, p.c_out = CO, p.groups = G;
      p.x = x.data(), p.sx_n = H * W * C, p.sx_h = W * C, p.sx_w = C;
      p.dy = dy.data(), p.sdy_n = H * W * CO, p.sdy_h = W * CO, p.sdy_w = CO;
      p.tile_begin = t0, p.tile_count = n, p.du_accumulate = t0 > 0;
      p.v = v.data(), p.m = m.data(), p.du = du.data();
      ok = flamingo_rt::conv3x3_winograd_input_cpu(p) == Status::kOk &&
           flamingo_rt::conv3x3_winograd_grad_output_transform_cpu(p) == Status::kOk;
      if (last_fused && t0 + n == tiles) {
        if (t0 == 0) p.du = nullptr;  // one range: no dL/dU at all
        ok = ok && flamingo_rt::conv3x3_winograd_weight_grad_last_cpu(p, dw_last.data()) == Status::kOk;
      } else {
        ok = ok && flamingo_rt::conv3x3_winograd_weight_grad_products_cpu(p) == Status::kOk;
      }
    }
    if (!last_fused) ok = ok && flamingo_rt::winograd_f43_weight_grad_cpu(du.data(), CO, cg, G, dw.data()) == Status::kOk;
  }
  expect(ok && std::memcmp(dw.data(), dw_last.data(), dw.size() * sizeof(float)) == 0,
         "winograd weight grad, last range fused: bit for bit the separate stages (chunk " + std::to_string(chunk) +
             ")");
  const Conv3x3Ref ref{N, C, H, W, CO, G};
  const std::vector<double> xd(x.begin(), x.end()), dyd(dy.begin(), dy.end());
  Err e;
  for (int64_t o = 0; ok && o < CO; ++o)
    for (int64_t c = 0; c < cg; ++c)
      for (int64_t ki = 0; ki < 3; ++ki)
        for (int64_t kj = 0; kj < 3; ++kj) {
          const double want = ref.dw(xd, dyd, o, c, ki, kj);
          e.add(dw[size_t(((o * cg + c) * 3 + ki) * 3 + kj)], want, 1e-4, 5e-5, 1.0 + std::fabs(want));
        }
  expect(ok && !e.nan && e.worst <= 1.0 && e.rel() < 1e-5,
         "winograd weight grad " + std::to_string(N) + "x" + std::to_string(C) + "x" + std::to_string(H) + "x" +
             std::to_string(W) + " -> " + std::to_string(CO) + " groups " + std::to_string(G) + " chunk " +
             std::to_string(chunk) + " (rel " + std::to_string(e.rel()) + ")");
}

void test_winograd(std::mt19937_64& rng) {
  check_winograd(rng, 2, 32, 9, 7, 48, 1, 0);   // partial tiles at the bottom and right
  check_winograd(rng, 1, 64, 8, 8, 64, 2, 3);   // 32 -> 32 per group (the AVX-512 products), 3-tile ranges
  check_winograd(rng, 2, 20, 5, 6, 12, 2, 1);   // 10 -> 6 per group (the plain products), one tile a range
  check_winograd(rng, 1, 16, 1, 1, 16, 1, 0);   // a 1x1 image
  check_winograd_weight_grad(rng, 2, 32, 9, 7, 48, 1, 0);
  check_winograd_weight_grad(rng, 1, 64, 8, 8, 64, 2, 3);
  check_winograd_weight_grad(rng, 2, 20, 5, 6, 12, 2, 1);
  check_winograd_weight_grad(rng, 1, 200, 6, 5, 64, 2, 0);  // 100 input channels a group: several row blocks
  check_winograd_weight_grad(rng, 1, 200, 6, 5, 64, 2, 2);
  {
    flamingo_rt::Conv3x3WinogradParams q;
    std::vector<float> v(36 * 4 * 16), m(36 * 4 * 16), dwq(16 * 16 * 9);
    q.n = 1, q.h = 4, q.w = 4, q.c_in = 16, q.c_out = 16, q.v = v.data(), q.m = m.data();
    q.du_accumulate = true;  // adding to a dL/dU that is not given
    expect(flamingo_rt::conv3x3_winograd_weight_grad_last_cpu(q, dwq.data()) == Status::kInvalidArgument,
           "winograd weight grad last stage: du_accumulate without du is an invalid argument");
    q.du_accumulate = false;
    expect(flamingo_rt::conv3x3_winograd_weight_grad_last_cpu(q, nullptr) == Status::kInvalidArgument,
           "winograd weight grad last stage: no dw is an invalid argument");
  }
  flamingo_rt::Conv3x3WinogradParams p;
  p.n = 1, p.h = 4, p.w = 4, p.c_in = 6, p.c_out = 4, p.groups = 4;
  expect(flamingo_rt::conv3x3_winograd_input_cpu(p) == Status::kInvalidArgument,
         "winograd: c_in not a multiple of groups -> kInvalidArgument");
  p.groups = 2;
  expect(flamingo_rt::conv3x3_winograd_input_cpu(p) == Status::kInvalidArgument, "winograd: null x -> kInvalidArgument");
  p.tile_begin = 2;  // one tile only
  expect(flamingo_rt::conv3x3_winograd_output_cpu(p) == Status::kInvalidArgument,
         "winograd: a tile range past the tiles -> kInvalidArgument");
  p.tile_begin = 0;
  p.dtype = DType::kBFloat16;
  expect(flamingo_rt::conv3x3_winograd_products_cpu(p) == Status::kUnsupportedDtype,
         "winograd: bfloat16 -> kUnsupportedDtype");
  std::printf("  winograd checks done\n");
}

namespace {
uint16_t to_bf16(float f) {  // round to nearest even (finite inputs)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
double from_bf16(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace

// The bfloat16 F(2x2, 3x3) stages (gamma * gelu(conv + bias), y with a padded pixel stride and
// poisoned, tiles in ranges of `chunk`), vectorized or all `plain` (portable), against the
// float64 direct convolution of the same bfloat16 inputs: norm error < 1.5e-2 (bfloat16 V, U
// and y; measured 2-4e-3).
void check_winograd_bf16(std::mt19937_64& rng, int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO, int64_t G,
                         int64_t chunk, bool plain) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t cg = C / G, cog = CO / G;
  const int64_t tiles = N * flamingo_rt::winograd_f23_tiles(H) * flamingo_rt::winograd_f23_tiles(W);
  std::vector<uint16_t> x(size_t(N * H * W * C));
  std::vector<float> w(static_cast<size_t>(CO * cg * 9)), b(static_cast<size_t>(CO));
  for (auto& v : x) v = to_bf16(nd(rng));
  for (auto& v : w) v = nd(rng) / std::sqrt(float(9 * cg));
  for (auto& v : b) v = 0.3f * nd(rng);
  const int64_t ystride = CO + 5;
  std::vector<uint16_t> u(size_t(16 * G * cg * cog)), y(size_t(N * H * W * ystride), 0x7fc0);  // NaN
  bool ok = flamingo_rt::winograd_f23_weight_bf16_cpu(w.data(), CO, cg, G, u.data()) == Status::kOk;
  const int64_t step = chunk > 0 ? chunk : tiles;
  for (int64_t t0 = 0; ok && t0 < tiles; t0 += step) {
    const int64_t n = std::min(step, tiles - t0);
    std::vector<uint16_t> v(size_t(16 * G * n * cg), 0x7fc0);
    std::vector<float> m(size_t(16 * G * n * cog), std::nanf(""));
    flamingo_rt::Conv3x3WinogradBf16Params p;
    p.n = N, p.h = H, p.w = W, p.c_in = C, p.c_out = CO, p.groups = G;
    p.x = x.data(), p.sx_n = H * W * C, p.sx_h = W * C, p.sx_w = C;
    p.tile_begin = t0, p.tile_count = n;
    p.v = v.data(), p.m = m.data(), p.u = u.data(), p.bias = b.data();
    p.has_act = true, p.act = Act::kGelu, p.gamma = 1.5, p.portable = plain;
    p.y = y.data(), p.sy_n = H * W * ystride, p.sy_h = W * ystride, p.sy_w = ystride;
    ok = flamingo_rt::conv3x3_winograd_bf16_input_cpu(p) == Status::kOk &&
         flamingo_rt::conv3x3_winograd_bf16_products_cpu(p, plain) == Status::kOk &&
         flamingo_rt::conv3x3_winograd_bf16_output_cpu(p) == Status::kOk;
  }
  const Conv3x3Ref ref{N, C, H, W, CO, G};
  std::vector<double> xd(x.size());
  std::transform(x.begin(), x.end(), xd.begin(), from_bf16);
  Err e;
  for (int64_t n = 0; ok && n < N; ++n)
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j)
        for (int64_t o = 0; o < CO; ++o) {
          const double acc = b[size_t(o)] + ref.out(xd, w, n, i, j, o);
          const double want = 1.5 * acc * 0.5 * std::erfc(-acc / std::sqrt(2.0));
          e.add(from_bf16(y[size_t(((n * H + i) * W + j) * ystride + o)]), want, 0.1, 0.1, 1.0 + std::fabs(want));
        }
  expect(ok && !e.nan && e.worst <= 1.0 && e.rel() < 1.5e-2,
         "winograd bf16 conv " + std::to_string(N) + "x" + std::to_string(C) + "x" + std::to_string(H) + "x" +
             std::to_string(W) + " -> " + std::to_string(CO) + " groups " + std::to_string(G) + " chunk " +
             std::to_string(chunk) + (plain ? " plain" : "") + " (rel " + std::to_string(e.rel()) + ")");
}

// dL/dw of that convolution (no bias) for a random dy through the bfloat16 weight-gradient
// stages (tile ranges of `chunk`, even but the last; the first writes dL/dU, the others add),
// against the float64 weight gradient of the same bfloat16 inputs: norm error < 1.5e-2.
void check_winograd_bf16_weight_grad(std::mt19937_64& rng, int64_t N, int64_t C, int64_t H, int64_t W, int64_t CO,
                                     int64_t G, int64_t chunk, bool plain) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t cg = C / G, cog = CO / G;
  const int64_t tiles = N * flamingo_rt::winograd_f23_tiles(H) * flamingo_rt::winograd_f23_tiles(W);
  std::vector<uint16_t> x(size_t(N * H * W * C)), dy(size_t(N * H * W * CO));
  for (auto& v : x) v = to_bf16(nd(rng));
  for (auto& v : dy) v = to_bf16(nd(rng));
  const int64_t step = chunk > 0 ? chunk : tiles, np = (step + 1) / 2;
  std::vector<uint16_t> vp(size_t(16 * G * np * cg * 2), 0x7fc0), yp(size_t(16 * G * np * cog * 2), 0x7fc0);
  std::vector<float> du(size_t(16 * G * cg * cog), std::nanf("")), dw(size_t(CO * cg * 9), std::nanf(""));
  flamingo_rt::Conv3x3WinogradBf16Params p;
  p.n = N, p.h = H, p.w = W, p.c_in = C, p.c_out = CO, p.groups = G;
  p.x = x.data(), p.sx_n = H * W * C, p.sx_h = W * C, p.sx_w = C;
  p.dy = dy.data(), p.sdy_n = H * W * CO, p.sdy_h = W * CO, p.sdy_w = CO;
  p.v = vp.data(), p.m = yp.data(), p.du = du.data(), p.portable = plain;
  bool ok = true;
  for (int64_t t0 = 0; ok && t0 < tiles; t0 += step) {
    p.tile_begin = t0, p.tile_count = std::min(step, tiles - t0), p.du_accumulate = t0 > 0;
    ok = flamingo_rt::conv3x3_winograd_bf16_input_pairs_cpu(p) == Status::kOk &&
         flamingo_rt::conv3x3_winograd_bf16_grad_output_pairs_cpu(p) == Status::kOk &&
         flamingo_rt::conv3x3_winograd_bf16_weight_grad_products_cpu(p, plain) == Status::kOk;
  }
  ok = ok && flamingo_rt::winograd_f23_weight_grad_cpu(du.data(), CO, cg, G, dw.data()) == Status::kOk;
  // the bfloat16 overload: the float32 result rounded to nearest even, element for element
  std::vector<uint16_t> dw16(dw.size());
  ok = ok && flamingo_rt::winograd_f23_weight_grad_cpu(du.data(), CO, cg, G, dw16.data()) == Status::kOk;
  for (size_t i = 0; ok && i < dw.size(); ++i) ok = dw16[i] == to_bf16(dw[i]);
  // the last range through conv3x3_winograd_bf16_weight_grad_last_cpu (products and inverse in one
  // stage; with one range no dL/dU at all): bit for bit the separate stages, both outputs
  std::vector<float> dw_last(dw.size(), std::nanf(""));
  std::vector<uint16_t> dw16_last(dw.size(), 0x7fc0);
  for (const bool out16 : {false, true}) {
    std::fill(du.begin(), du.end(), std::nanf(""));
    for (int64_t t0 = 0; ok && t0 < tiles; t0 += step) {
      p.tile_begin = t0, p.tile_count = std::min(step, tiles - t0), p.du_accumulate = t0 > 0;
      p.du = t0 + step >= tiles && t0 == 0 ? nullptr : du.data();
      ok = flamingo_rt::conv3x3_winograd_bf16_input_pairs_cpu(p) == Status::kOk &&
           flamingo_rt::conv3x3_winograd_bf16_grad_output_pairs_cpu(p) == Status::kOk;
      if (t0 + step < tiles)
        ok = ok && flamingo_rt::conv3x3_winograd_bf16_weight_grad_products_cpu(p, plain) == Status::kOk;
      else if (out16)
        ok = ok && flamingo_rt::conv3x3_winograd_bf16_weight_grad_last_cpu(p, dw16_last.data(), plain) == Status::kOk;
      else
        ok = ok && flamingo_rt::conv3x3_winograd_bf16_weight_grad_last_cpu(p, dw_last.data(), plain) == Status::kOk;
    }
  }
  p.du = du.data();
  expect(ok && std::memcmp(dw.data(), dw_last.data(), dw.size() * sizeof(float)) == 0 && dw16 == dw16_last,
         "winograd bf16 weight grad, last range fused: bit for bit the separate stages (chunk " +
             std::to_string(chunk) + (plain ? " plain)" : ")"));
  const Conv3x3Ref ref{N, C, H, W, CO, G};
  std::vector<double> xd(x.size()), dyd(dy.size());
  std::transform(x.begin(), x.end(), xd.begin(), from_bf16);
  std::transform(dy.begin(), dy.end(), dyd.begin(), from_bf16);
  Err e;
  for (int64_t o = 0; ok && o < CO; ++o)
    for (int64_t c = 0; c < cg; ++c)
      for (int64_t ki = 0; ki < 3; ++ki)
        for (int64_t kj = 0; kj < 3; ++kj) {
          const double want = ref.dw(xd, dyd, o, c, ki, kj);
          e.add(dw[size_t(((o * cg + c) * 3 + ki) * 3 + kj)], want, 0.1, 0.1, 1.0 + std::fabs(want));
        }
  expect(ok && !e.nan && e.worst <= 1.0 && e.rel() < 1.5e-2,
         "winograd bf16 weight grad " + std::to_string(N) + "x" + std::to_string(C) + "x" + std::to_string(H) + "x" +
             std::to_string(W) + " -> " + std::to_string(CO) + " groups " + std::to_string(G) + " chunk " +
             std::to_string(chunk) + (plain ? " plain" : "") + " (rel " + std::to_string(e.rel()) + ")");
}

void test_winograd_bf16(std::mt19937_64& rng) {
  check_winograd_bf16(rng, 2, 32, 9, 7, 48, 1, 0, false);    // partial tiles at the bottom and right
  check_winograd_bf16(rng, 2, 32, 9, 7, 48, 1, 0, true);
  check_winograd_bf16(rng, 1, 128, 8, 8, 128, 2, 5, false);  // 64 -> 64 per group, 5-tile ranges
  check_winograd_bf16(rng, 2, 36, 5, 6, 20, 2, 1, false);    // 18 -> 10 per group (partial chunks), 1-tile ranges
  check_winograd_bf16(rng, 1, 16, 1, 1, 16, 1, 0, false);    // a 1x1 image
  check_winograd_bf16_weight_grad(rng, 2, 32, 9, 7, 48, 1, 0, false);  // 50 tiles: one range
  check_winograd_bf16_weight_grad(rng, 2, 32, 9, 7, 48, 1, 0, true);
  check_winograd_bf16_weight_grad(rng, 1, 128, 8, 8, 64, 2, 6, false);  // 6-tile ranges, the last 4
  check_winograd_bf16_weight_grad(rng, 3, 36, 5, 5, 20, 2, 4, false);   // partial chunks; 27 tiles: the last range 3
  check_winograd_bf16_weight_grad(rng, 1, 200, 6, 5, 64, 2, 0, false);  // 100 input channels a group: several row blocks
  check_winograd_bf16_weight_grad(rng, 1, 200, 6, 5, 64, 2, 4, false);
  flamingo_rt::Conv3x3WinogradBf16Params p;
  p.n = 1, p.h = 4, p.w = 4, p.c_in = 6, p.c_out = 4, p.groups = 2;
  expect(flamingo_rt::conv3x3_winograd_bf16_input_cpu(p) == Status::kInvalidArgument,
         "winograd bf16: odd c_in / groups -> kInvalidArgument");
  p.c_in = 8;
  expect(flamingo_rt::conv3x3_winograd_bf16_input_cpu(p) == Status::kInvalidArgument,
         "winograd bf16: null x -> kInvalidArgument");
  p.tile_begin = 5;  // four tiles only
  expect(flamingo_rt::conv3x3_winograd_bf16_output_cpu(p) == Status::kInvalidArgument,
         "winograd bf16: a tile range past the tiles -> kInvalidArgument");
  float w[9] = {0};
  uint16_t u[16];
  expect(flamingo_rt::winograd_f23_weight_bf16_cpu(w, 1, 1, 1, u) == Status::kInvalidArgument,
         "winograd bf16 weight: odd c_in / groups -> kInvalidArgument");
  std::printf("  winograd bf16 checks done (AVX-512 BF16 products: %d)\n", int(flamingo_rt::winograd_bf16_cpu_supported()));
}

int main() {
  std::random_device rd;
  const uint64_t seed = (uint64_t(rd()) << 32) ^ rd();
  std::mt19937_64 rng(seed);
  std::printf("kernels_cpu: seed %llu, built_with_cuda=%d", (unsigned long long)seed,
              int(flamingo_rt::built_with_cuda()));
#ifdef _OPENMP
  std::printf(", OpenMP threads %d", omp_get_max_threads());
#endif
  std::printf("\n");

  const int64_t shapes[][4] = {
      {2, 5, 7, 3},     // odd sizes
      {3, 64, 17, 19},  // large enough for the threaded path
      {1, 2, 130, 131}, // rows longer than one task chunk (NCHW)
      {2, 17000, 1, 2}, // channel rows longer than one task chunk (NHWC)
      {2, 1, 5, 4},     // C == 1
      {1, 3, 1, 1},     // one pixel
      {300, 8, 1, 1},   // (N, C) only
  };
  const DType dtypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat64};
  const Act acts[] = {Act::kGelu, Act::kRelu, Act::kSilu};
  const char* layouts[][2] = {{"nchw", "nchw"}, {"nhwc", "nhwc"}, {"perm", "nchw"},
                              {"nchw", "nhwc"}, {"expand", "nchw"}};
  for (const auto& sz : shapes)
    for (DType dt : dtypes)
      for (Act a : acts)
        for (const auto& lay : layouts)
          for (int b = 0; b < 2; ++b) run_case(rng, dt, a, b == 1, sz, lay[0], lay[1]);
  test_errors();
  test_transpose(rng);
  test_spatial_mean(rng);
  test_softmax_xent(rng);
  test_winograd(rng);
  test_winograd_bf16(rng);

  std::printf("kernels_cpu: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
