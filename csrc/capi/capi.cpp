// The C API (csrc/include/flamingo_rt/flamingo_rt.h) over AOTInductor packages: a model holds
// the two packages, the tokenizer and the manifest; a session holds its KV and media caches
// and mirrors flamingo_rt/export/runner.py (the Python reference of this host logic).
#include "flamingo_rt/flamingo_rt.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/version.h>  // TORCH_VERSION_MAJOR / _MINOR: the libtorch this library is built on
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "api_error.h"
#include "beam_search.h"
#include "flamingo_rt/tokenizer.h"
#include "manifest.h"
#include "preprocess.h"
#include "sampling.h"

using flamingo_rt::capi::ApiError;
using flamingo_rt::capi::guard;

struct flamingo_model {
  flamingo_rt::capi::Manifest manifest;
  flamingo_rt::Tokenizer tokenizer;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> encode, step, decode;  // decode: T = 1
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> score;  // null for exports without one
  at::ScalarType dtype = at::kFloat;
  at::Device device = at::kCPU;
};

struct flamingo_session {
  flamingo_model* model = nullptr;
  at::Tensor kv, media, logits;
  int pos = 0, num_media = 0, seen_images = 0;
  std::vector<int32_t> pending;
  // media appended and not encoded yet (preprocessed pixels (F, 3, S, S), never written):
  // the last queued_media.size() of the num_media slots, encoded together at the next run
  std::vector<at::Tensor> queued_media;
};

namespace {

using flamingo_rt::capi::Manifest;

[[noreturn]] void invalid(const std::string& what) { throw ApiError(FLAMINGO_ERR_INVALID_ARGUMENT, what); }

at::ScalarType dtype_from_name(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  if (name == "float64") return at::kDouble;
  throw ApiError(FLAMINGO_ERR_FORMAT, "manifest: unsupported dtype \"" + name + "\"");
}

std::unique_ptr<torch::inductor::AOTIModelPackageLoader> load_package(const std::string& path) {
  if (!std::filesystem::is_regular_file(path)) throw ApiError(FLAMINGO_ERR_IO, path + ": no such package file");
  try {
    return std::make_unique<torch::inductor::AOTIModelPackageLoader>(path);
  } catch (const c10::Error& e) {
    throw ApiError(FLAMINGO_ERR_FORMAT, path + ": not a loadable AOTInductor package (" +
                                            e.what_without_backtrace() + ")");
  } catch (const std::exception& e) {
    throw ApiError(FLAMINGO_ERR_FORMAT, path + ": not a loadable AOTInductor package (" + e.what() + ")");
  }
}

// AOTInductor packages are tied to the torch release that compiled them: refuse an export whose
// torch major.minor differs from the libtorch this library is built on (it would fail to load
// with an obscure message, or worse).
void check_torch_version(const Manifest& man, const std::string& folder) {
  const std::string& v = man.torch_version;
  const size_t dot1 = v.find('.'), dot2 = dot1 == std::string::npos ? dot1 : v.find_first_not_of("0123456789", dot1 + 1);
  const std::string exported = dot1 == std::string::npos ? v : v.substr(0, dot2);
  const std::string ours = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
  if (exported != ours) {
    throw ApiError(FLAMINGO_ERR_FORMAT, folder + ": exported with torch " + v + ", but this library is built on libtorch " +
                                            ours + " (AOTInductor packages are tied to the torch release that "
                                            "compiled them): re-export the model with torch " + ours);
  }
}

void check_session(const flamingo_session* s) {
  if (s == nullptr) invalid("expected a session, got NULL");
}

// A session cache (n, 2, 1, ...) as the decode step's one row (1, n, 2, ...): the same memory.
at::Tensor kv_rows(const at::Tensor& cache) { return cache.squeeze(2).unsqueeze(0); }

// Encodes the queued media into their media-cache slots: runs of consecutive media with the
// same frame count, one encoder call each (a few-shot prompt's images in one batch). A medium
// leaves the queue once its keys/values are written; a failed call keeps the rest queued.
void encode_queued(flamingo_session* s) {
  flamingo_model* m = s->model;
  auto& q = s->queued_media;
  while (!q.empty()) {
    size_t n = 1;
    while (n < q.size() && q[n].size(0) == q[0].size(0)) ++n;
    const int64_t slot = s->num_media - static_cast<int64_t>(q.size());
    const at::Tensor kv = m->encode->run({at::stack(at::TensorList(q.data(), n))}).at(0);  // (X, 2, n, L, H, dh)
    s->media.select(2, 0).narrow(2, slot, static_cast<int64_t>(n)).copy_(kv);
    q.erase(q.begin(), q.begin() + static_cast<std::ptrdiff_t>(n));
  }
}

// Runs the queued media and tokens through the model; returns the logits of the last token.
at::Tensor flush(flamingo_session* s) {
  flamingo_model* m = s->model;
  if (s->pending.empty()) {
    if (!s->logits.defined()) invalid("nothing to generate from: append text or media first");
    return s->logits;
  }
  const int T = static_cast<int>(s->pending.size());
  if (s->pos + T > m->manifest.max_seq_len) {
    throw ApiError(FLAMINGO_ERR_CAPACITY, "the context needs " + std::to_string(s->pos + T) +
                                              " token slots; this export has max_seq_len = " +
                                              std::to_string(m->manifest.max_seq_len));
  }
  at::Tensor ids = at::empty({1, T}, at::kLong);
  at::Tensor index = at::empty({1, T}, at::kInt);
  auto* ip = ids.data_ptr<int64_t>();
  auto* xp = index.data_ptr<int32_t>();
  int seen = s->seen_images;  // committed only when the step ran
  for (int t = 0; t < T; ++t) {
    ip[t] = s->pending[t];
    if (s->pending[t] == m->manifest.image_id) ++seen;
    xp[t] = seen - 1;
  }
  encode_queued(s);
  at::Tensor start = at::full({1}, s->pos, at::kLong);
  // the decode step takes rows-first caches (B, ...): one row, the session's memory as it is
  std::vector<at::Tensor> out =
      T == 1 ? m->decode->run({ids.to(m->device), start.to(m->device), index.to(m->device), kv_rows(s->kv),
                               kv_rows(s->media)})
             : m->step->run({ids.to(m->device), start.to(m->device), index.to(m->device), s->kv, s->media});
  s->seen_images = seen;
  s->pos += T;
  s->pending.clear();
  s->logits = out.at(0).to(at::kCPU, at::kFloat).contiguous();
  return s->logits;
}

// CAPACITY unless `n` more tokens fit the context (appended, generated and queued ones);
// checked before anything is queued, so a refused append leaves the session as it was.
void check_room(const flamingo_session* s, size_t n, const char* what, const char* outcome = "nothing was appended") {
  const int64_t need = s->pos + static_cast<int64_t>(s->pending.size()) + static_cast<int64_t>(n);
  if (need > s->model->manifest.max_seq_len) {
    throw ApiError(FLAMINGO_ERR_CAPACITY, std::string(what) + " needs " + std::to_string(n) +
                                              " token slot(s) and the context holds " +
                                              std::to_string(need - static_cast<int64_t>(n)) +
                                              "; this export has max_seq_len = " +
                                              std::to_string(s->model->manifest.max_seq_len) + " (" + outcome +
                                              ")");
  }
}

// Adds to out[i] the log-probabilities of candidate i's tokens after its first: the
// candidates (less their last token) packed one after another past the context's end, run
// by the score step in packs of at most kMaxPackTokens and the free slots (a longer
// candidate alone). As ExportedSession._score_packed; the context is left as it was (the
// slots written lie past s->pos).
constexpr size_t kMaxPackTokens = 256;

void score_packed(flamingo_session* s, const std::vector<std::vector<int32_t>>& ids, double* out) {
  flamingo_model* m = s->model;
  const size_t cap = std::min(kMaxPackTokens, static_cast<size_t>(m->manifest.max_seq_len - s->pos));
  // the packs, in order (runtime.engine.pack_continuations): candidates of two tokens or more
  std::vector<std::vector<size_t>> packs;
  size_t used = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    const size_t n = ids[i].size() - 1;  // the tokens fed
    if (n == 0) continue;
    if (packs.empty() || used + n > cap) {
      packs.emplace_back();
      used = 0;
    }
    packs.back().push_back(i);
    used += n;
  }
  for (const std::vector<size_t>& pack : packs) {
    size_t fed = 0;
    for (size_t i : pack) fed += ids[i].size() - 1;
    const int64_t T = static_cast<int64_t>(fed);
    at::Tensor tok = at::empty({1, T}, at::kLong), offset = at::empty({1, T}, at::kLong);
    auto* tp = tok.data_ptr<int64_t>();
    auto* op = offset.data_ptr<int64_t>();
    int64_t t = 0;
    for (size_t i : pack)
      for (size_t j = 0; j + 1 < ids[i].size(); ++j, ++t) {
        tp[t] = ids[i][j];
        op[t] = static_cast<int64_t>(j);
      }
    at::Tensor index = at::full({1, T}, s->seen_images - 1, at::kInt);  // the context's last medium
    at::Tensor start = at::full({1}, s->pos, at::kLong);
    std::vector<at::Tensor> res = m->score->run(
        {tok.to(m->device), start.to(m->device), offset.to(m->device), index.to(m->device), s->kv, s->media});
    const at::Tensor lp = at::log_softmax(res.at(0).to(at::kCPU, at::kFloat)[0], -1).contiguous();  // (T, V)
    const float* lpp = lp.data_ptr<float>();
    const int64_t V = lp.size(1);
    t = 0;
    for (size_t i : pack)
      for (size_t j = 0; j + 1 < ids[i].size(); ++j, ++t) out[i] += lpp[t * V + ids[i][j + 1]];
  }
}

void append_frames(flamingo_session* s, const at::Tensor& frames) {
  flamingo_model* m = s->model;
  if (s->num_media >= m->manifest.max_media) {
    throw ApiError(FLAMINGO_ERR_CAPACITY, "the session already holds max_media = " +
                                              std::to_string(m->manifest.max_media) + " media");
  }
  check_room(s, 1, "the medium's <image> token");
  if (frames.size(0) > m->manifest.max_frames) {
    invalid("a clip of " + std::to_string(frames.size(0)) + " frames; this export takes at most " +
            std::to_string(m->manifest.max_frames));
  }
  at::Tensor px = flamingo_rt::capi::preprocess_frames(frames, m->manifest, m->dtype, m->device);
  s->queued_media.push_back(px[0]);  // (F, 3, S, S); encoded at the next run
  ++s->num_media;
  s->pending.push_back(m->manifest.image_id);
}

// float pixels may stray this far outside [0, 1] (an earlier resize's rounding) before they are
// refused (flamingo_rt/runtime/prompt.py: _PIXEL_SLACK)
constexpr double kPixelSlack = 1e-3;

void check_pixels(const void* p, int frames, int width, int height) {
  if (p == nullptr) invalid("expected pixels, got NULL");
  if (width < 1 || height < 1 || frames < 1) {
    invalid("expected width, height and frames >= 1, got " + std::to_string(width) + " x " +
            std::to_string(height) + " x " + std::to_string(frames));
  }
  if (static_cast<int64_t>(width) * height > (int64_t{1} << 28)) invalid("image too large");
}

// Longest suffix of `text` that is a proper prefix of one of `stops`.
size_t held_suffix(const std::string& text, const std::vector<std::string>& stops) {
  size_t best = 0;
  for (const std::string& st : stops)
    for (size_t k = std::min(st.size() - 1, text.size()); k > best; --k)
      if (text.compare(text.size() - k, k, st, 0, k) == 0) {
        best = k;
        break;
      }
  return best;
}

// Beam search (flamingo_session_generate with num_beams > 1): the queued prompt runs on the
// session; K rows copied from its caches decode the beams, all in one call of the decode step
// a token (the media rows are read only: nothing generated is a medium); the session's own
// caches are left at the prompt's end and the best hypothesis is queued in its context.
void generate_beams(flamingo_session* s, const flamingo_generate_params& p, const std::vector<std::string>& stops,
                    flamingo_piece_callback callback, void* user_data, flamingo_generate_result* result) {
  flamingo_model* m = s->model;
  flamingo_generate_result r{};
  const int K = p.num_beams;
  if (K > m->manifest.max_beams) {
    invalid("num_beams " + std::to_string(K) + "; this export decodes at most max_beams = " +
            std::to_string(m->manifest.max_beams) + " rows at once (flamingo-rt export --max-beams)");
  }
  const auto t0 = std::chrono::steady_clock::now();
  const at::Tensor first = flush(s)[0];  // (V,) float32
  const auto t1 = std::chrono::steady_clock::now();
  flamingo_rt::capi::BeamSearchParams bp;
  bp.num_beams = K;
  bp.length_penalty = p.length_penalty;
  bp.early_stopping = p.early_stopping;
  // the answer is queued in the context: it must fit (as greedy, the answer ends at the cache's end)
  bp.max_new_tokens = std::min(p.max_new_tokens, m->manifest.max_seq_len - s->pos);
  if (bp.max_new_tokens < 1) {
    throw ApiError(FLAMINGO_ERR_CAPACITY, "the context is full (max_seq_len = " +
                                              std::to_string(m->manifest.max_seq_len) + "): no room for an answer");
  }
  if (p.stop_at_endofchunk) bp.stop_ids.push_back(m->manifest.eoc_id);
  if (p.stop_at_endoftext) bp.stop_ids.push_back(m->manifest.eos_id);
  bp.banned_ids = {m->manifest.image_id, m->manifest.pad_id};
  bp.vocab_size = m->tokenizer.vocab_size();
  // the beams' caches: K rows (rows first, as the decode step takes them) of the session's
  // (the media cache is read only: its rows are copies of the session's one), all decoded in
  // one call of the decode step a token
  const at::Tensor kv_row = kv_rows(s->kv), media_row = kv_rows(s->media);  // (1, ...)
  std::vector<int64_t> kv_shape = kv_row.sizes().vec(), media_shape = media_row.sizes().vec();
  kv_shape[0] = K;
  media_shape[0] = K;
  at::Tensor kv, media;
  int64_t filled = s->pos;  // cache slots each beam holds
  const at::Tensor index = at::full({K, 1}, s->seen_images - 1, at::kInt).to(m->device);
  const auto step = [&](const std::vector<int64_t>& rows, const std::vector<int32_t>& toks) {
    if (!kv.defined()) {  // the first step: every beam continues the prompt
      kv = at::empty(kv_shape, s->kv.options());
      kv.narrow(4, 0, filled).copy_(kv_row.narrow(4, 0, filled));  // broadcast over the K rows
      media = media_row.expand(media_shape).contiguous();
    } else {
      bool moved = false;
      for (int j = 0; j < K; ++j) moved = moved || rows[j] != j;
      if (moved) {  // beam j continues beam rows[j]: its filled slots are copied
        const at::Tensor idx = at::tensor(rows, at::kLong).to(m->device);
        kv.narrow(4, 0, filled).copy_(kv.narrow(4, 0, filled).index_select(0, idx));
      }
    }
    at::Tensor ids = at::empty({K, 1}, at::kLong);
    for (int j = 0; j < K; ++j) ids.data_ptr<int64_t>()[j] = toks[j];
    const at::Tensor start = at::full({1}, filled, at::kLong).to(m->device);
    at::Tensor logits = m->decode->run({ids.to(m->device), start, index, kv, media}).at(0);
    ++filled;
    return logits.to(at::kCPU, at::kFloat);  // (K, V)
  };
  const std::vector<int32_t> best = flamingo_rt::capi::beam_search(first, bp, step);
  // the answer's text: up to a stop token, cut at the first stop string
  flamingo_rt::IncrementalDecoder dec(m->tokenizer);
  std::string text;
  for (int32_t t : best) {
    if (std::find(bp.stop_ids.begin(), bp.stop_ids.end(), t) != bp.stop_ids.end()) {
      r.hit_stop = 1;
      break;
    }
    ++r.num_tokens;
    text += dec.push(t);
  }
  text += dec.flush();
  size_t cut = std::string::npos;
  for (const std::string& st : stops) cut = std::min(cut, text.find(st));
  if (cut != std::string::npos) {
    text.resize(cut);
    r.hit_stop = 1;
  }
  s->pending.insert(s->pending.end(), best.begin(), best.end());
  if (callback != nullptr && !text.empty() && callback(text.data(), text.size(), user_data) != 0) r.stopped_by_callback = 1;
  const auto t2 = std::chrono::steady_clock::now();
  r.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();
  r.decode_seconds = std::chrono::duration<double>(t2 - t1).count();
  if (result != nullptr) *result = r;
}

// Runs each package once on placeholder inputs (no image, one medium of black pixels, a
// token of id eos at slot 0) in caches of its own: the first prompt then finds the weights
// paged in, the allocator and the thread pools started.
void warm_up(flamingo_model* m) {
  const Manifest& man = m->manifest;
  const auto opts = at::TensorOptions().dtype(m->dtype).device(m->device);
  const auto longs = at::TensorOptions().dtype(at::kLong).device(m->device);
  const auto ints = at::TensorOptions().dtype(at::kInt).device(m->device);
  at::Tensor kv = at::zeros(man.kv_cache_shape, opts), media = at::zeros(man.media_cache_shape, opts);
  try {
    m->encode->run({at::zeros({1, 1, 3, man.image_size, man.image_size}, opts)});
    const int64_t T = std::min(2, man.max_seq_len);
    const at::Tensor start = at::zeros({1}, longs);
    m->step->run({at::full({1, T}, man.eos_id, longs), start, at::full({1, T}, -1, ints), kv, media});
    m->decode->run({at::full({1, 1}, man.eos_id, longs), start, at::full({1, 1}, -1, ints), kv_rows(kv),
                    kv_rows(media)});
    if (m->score) {
      m->score->run({at::full({1, 1}, man.eos_id, longs), start, at::zeros({1, 1}, longs), at::full({1, 1}, -1, ints),
                     kv, media});
    }
  } catch (const c10::Error& e) {
    throw ApiError(FLAMINGO_ERR_RUNTIME, std::string("the warm-up run of the packages failed (load with warmup = 0 "
                                                     "to skip it): ") + e.what_without_backtrace());
  }
}

}  // namespace

extern "C" {

const char* flamingo_status_string(flamingo_status status) {
  switch (status) {
    case FLAMINGO_OK: return "ok";
    case FLAMINGO_ERR_INVALID_ARGUMENT: return "invalid argument";
    case FLAMINGO_ERR_IO: return "i/o error";
    case FLAMINGO_ERR_FORMAT: return "bad format";
    case FLAMINGO_ERR_CAPACITY: return "capacity exceeded";
    case FLAMINGO_ERR_RUNTIME: return "runtime error";
  }
  return "unknown status";
}

const char* flamingo_version(void) { return "0.1.0"; }

flamingo_model_params flamingo_model_default_params(void) {
  flamingo_model_params p;
  p.num_threads = 0;
  p.warmup = 1;
  return p;
}

flamingo_status flamingo_model_load(const char* folder, const flamingo_model_params* params, flamingo_model** out) {
  return guard("flamingo_model_load", [&] {
    if (out == nullptr) invalid("expected a place for the model (out), got NULL");
    *out = nullptr;
    if (folder == nullptr) invalid("expected an export folder, got NULL");
    flamingo_model_params p = params ? *params : flamingo_model_default_params();
    if (p.num_threads < 0) invalid("expected num_threads >= 0, got " + std::to_string(p.num_threads));
    if (p.num_threads > 0) at::set_num_threads(p.num_threads);
    Manifest man = flamingo_rt::capi::read_manifest(folder);
    check_torch_version(man, folder);
    flamingo_rt::Tokenizer tok = flamingo_rt::Tokenizer::from_file(std::string(folder) + "/tokenizer.json");
    if (tok.image_token_id() != man.image_id || tok.eoc_token_id() != man.eoc_id || tok.eos_token_id() != man.eos_id) {
      throw ApiError(FLAMINGO_ERR_FORMAT, "tokenizer.json's special token ids differ from the manifest's");
    }
    auto model = std::unique_ptr<flamingo_model>(new flamingo_model{man, tok, nullptr, nullptr, nullptr});
    model->dtype = dtype_from_name(man.dtype);
    if (man.device != "cpu" && man.device != "cuda") throw ApiError(FLAMINGO_ERR_FORMAT, "manifest: unknown device " + man.device);
    model->device = at::Device(man.device);
    model->encode = load_package(man.encode_package);
    model->step = load_package(man.step_package);
    model->decode = load_package(man.decode_package);
    if (!man.score_package.empty()) model->score = load_package(man.score_package);
    if (p.warmup) warm_up(model.get());
    *out = model.release();
  });
}

void flamingo_model_free(flamingo_model* model) { delete model; }

int flamingo_model_max_seq_len(const flamingo_model* m) { return m ? m->manifest.max_seq_len : 0; }
int flamingo_model_max_media(const flamingo_model* m) { return m ? m->manifest.max_media : 0; }
int flamingo_model_max_frames(const flamingo_model* m) { return m ? m->manifest.max_frames : 0; }
int flamingo_model_image_size(const flamingo_model* m) { return m ? m->manifest.image_size : 0; }

flamingo_status flamingo_tokenize(const flamingo_model* model, const char* utf8, int32_t* out_ids, size_t capacity,
                                  size_t* n_ids) {
  return guard("flamingo_tokenize", [&] {
    if (model == nullptr || utf8 == nullptr || n_ids == nullptr) invalid("expected a model, text and n_ids, got NULL");
    std::vector<int32_t> ids = model->tokenizer.encode(utf8);
    *n_ids = ids.size();
    if (out_ids != nullptr)
      for (size_t i = 0; i < ids.size() && i < capacity; ++i) out_ids[i] = ids[i];
  });
}

flamingo_status flamingo_session_create(flamingo_model* model, flamingo_session** out) {
  return guard("flamingo_session_create", [&] {
    if (out == nullptr) invalid("expected a place for the session (out), got NULL");
    *out = nullptr;
    if (model == nullptr) invalid("expected a model, got NULL");
    auto s = std::make_unique<flamingo_session>();
    s->model = model;
    auto opts = at::TensorOptions().dtype(model->dtype).device(model->device);
    s->kv = at::zeros(model->manifest.kv_cache_shape, opts);
    s->media = at::zeros(model->manifest.media_cache_shape, opts);
    *out = s.release();
  });
}

void flamingo_session_free(flamingo_session* session) { delete session; }

flamingo_status flamingo_session_prefill(flamingo_session* s) {
  return guard("flamingo_session_prefill", [&] {
    check_session(s);
    if (!s->pending.empty()) flush(s);
  });
}

flamingo_status flamingo_session_fork(const flamingo_session* s, flamingo_session** out) {
  return guard("flamingo_session_fork", [&] {
    if (out == nullptr) invalid("expected a place for the new session (out), got NULL");
    *out = nullptr;
    check_session(s);
    auto f = std::make_unique<flamingo_session>();
    f->model = s->model;
    f->kv = s->kv.clone();
    f->media = s->media.clone();
    if (s->logits.defined()) f->logits = s->logits.clone();
    f->pos = s->pos;
    f->num_media = s->num_media;
    f->seen_images = s->seen_images;
    f->pending = s->pending;
    f->queued_media = s->queued_media;  // never written: shared
    *out = f.release();
  });
}

flamingo_status flamingo_session_reset(flamingo_session* s) {
  return guard("flamingo_session_reset", [&] {
    check_session(s);
    s->pos = s->num_media = s->seen_images = 0;
    s->pending.clear();
    s->queued_media.clear();
    s->logits = at::Tensor();
  });
}

int flamingo_session_num_tokens(const flamingo_session* s) {
  return s ? s->pos + static_cast<int>(s->pending.size()) : 0;
}

flamingo_status flamingo_session_append_text(flamingo_session* s, const char* utf8) {
  return guard("flamingo_session_append_text", [&] {
    check_session(s);
    if (utf8 == nullptr) invalid("expected text, got NULL");
    std::vector<int32_t> ids = s->model->tokenizer.encode(utf8);
    for (int32_t id : ids)
      if (id == s->model->manifest.image_id) invalid("the text contains <image>; append images with append_image_*");
    check_room(s, ids.size(), "the text");
    s->pending.insert(s->pending.end(), ids.begin(), ids.end());
  });
}

flamingo_status flamingo_session_append_image_rgb8(flamingo_session* s, const uint8_t* rgb, int width, int height) {
  return guard("flamingo_session_append_image_rgb8", [&] {
    check_session(s);
    check_pixels(rgb, 1, width, height);
    append_frames(s, flamingo_rt::capi::frames_from_rgb8(rgb, 1, width, height));
  });
}

flamingo_status flamingo_session_append_image_f32(flamingo_session* s, const float* chw, int width, int height) {
  return guard("flamingo_session_append_image_f32", [&] {
    check_session(s);
    check_pixels(chw, 1, width, height);
    at::Tensor t = at::from_blob(const_cast<float*>(chw), {1, 3, height, width}, at::kFloat).clone();
    // as the Python runtime: a 0-255 float image or NaN would be normalised into garbage silently
    auto [lo_t, hi_t] = at::aminmax(t);
    const double lo = lo_t.item<double>(), hi = hi_t.item<double>();
    if (!std::isfinite(lo) || !std::isfinite(hi)) invalid("expected finite pixel values, got NaN or infinity");
    if (lo < -kPixelSlack || hi > 1.0 + kPixelSlack) {
      invalid("expected float pixels in [0, 1], got values in [" + std::to_string(lo) + ", " + std::to_string(hi) +
              "]; pass RGB8 pixels (append_image_rgb8) or divide by 255");
    }
    append_frames(s, t);
  });
}

flamingo_status flamingo_session_append_clip_rgb8(flamingo_session* s, const uint8_t* rgb, int frames, int width,
                                                  int height) {
  return guard("flamingo_session_append_clip_rgb8", [&] {
    check_session(s);
    check_pixels(rgb, frames, width, height);
    append_frames(s, flamingo_rt::capi::frames_from_rgb8(rgb, frames, width, height));
  });
}

flamingo_generate_params flamingo_generate_default_params(void) {
  flamingo_generate_params p;
  p.max_new_tokens = 32;
  p.temperature = 0.f;
  p.top_k = 0;
  p.top_p = 1.f;
  p.seed = 0;
  p.stop_at_endofchunk = 1;
  p.stop_at_endoftext = 1;
  p.stop_strings = nullptr;
  p.num_stop_strings = 0;
  p.num_beams = 1;
  p.length_penalty = 1.f;
  p.early_stopping = 0;
  return p;
}

flamingo_status flamingo_session_generate(flamingo_session* s, const flamingo_generate_params* params,
                                          flamingo_piece_callback callback, void* user_data,
                                          flamingo_generate_result* result) {
  return guard("flamingo_session_generate", [&] {
    check_session(s);
    flamingo_generate_params p = params ? *params : flamingo_generate_default_params();
    if (p.max_new_tokens < 1) invalid("expected max_new_tokens >= 1, got " + std::to_string(p.max_new_tokens));
    if (!(p.temperature >= 0.f)) invalid("expected temperature >= 0");
    if (p.top_k < 0) invalid("expected top_k >= 0, got " + std::to_string(p.top_k));
    if (!(p.top_p > 0.f && p.top_p <= 1.f)) invalid("expected top_p in (0, 1]");
    if (p.num_stop_strings < 0 || (p.num_stop_strings > 0 && p.stop_strings == nullptr)) invalid("bad stop strings");
    std::vector<std::string> stops;
    for (int i = 0; i < p.num_stop_strings; ++i) {
      if (p.stop_strings[i] == nullptr || p.stop_strings[i][0] == '\0') invalid("expected non-empty stop strings");
      stops.emplace_back(p.stop_strings[i]);
    }
    if (p.num_beams < 1) invalid("expected num_beams >= 1, got " + std::to_string(p.num_beams));
    if (p.num_beams > 1) {
      if (p.temperature != 0.f) invalid("expected either sampling (temperature > 0) or beam search (num_beams > 1), got both");
      if (!std::isfinite(p.length_penalty)) invalid("expected a finite length_penalty");
      if (p.early_stopping < 0 || p.early_stopping > 2) {
        invalid("expected early_stopping 0, 1 or 2, got " + std::to_string(p.early_stopping));
      }
      generate_beams(s, p, stops, callback, user_data, result);
      return;
    }
    flamingo_generate_result r{};
    flamingo_model* m = s->model;
    flamingo_rt::capi::SamplingParams sp{p.temperature, p.top_k, p.top_p};
    std::mt19937_64 rng(p.seed);
    flamingo_rt::IncrementalDecoder dec(m->tokenizer);
    std::string text;
    size_t emitted = 0;
    bool by_string = false;
    // emit text[emitted:upto]; false when the callback asked to stop
    auto emit = [&](size_t upto) {
      if (upto > emitted && callback != nullptr) {
        if (callback(text.data() + emitted, upto - emitted, user_data) != 0) r.stopped_by_callback = 1;
      }
      emitted = std::max(emitted, upto);
      return r.stopped_by_callback == 0;
    };
    auto on_text = [&](const std::string& piece) {
      text += piece;
      if (!stops.empty()) {
        size_t cut = std::string::npos;
        const size_t from = emitted > 0 ? emitted - 1 : 0;
        for (const std::string& st : stops) {
          size_t at = text.find(st, from > st.size() ? from - st.size() : 0);
          if (at != std::string::npos && at < cut) cut = at;
        }
        if (cut != std::string::npos) {
          emit(cut);
          r.hit_stop = 1;
          by_string = true;
          text.resize(cut);
          return false;
        }
        return emit(text.size() - held_suffix(text, stops));
      }
      return emit(text.size());
    };
    auto t0 = std::chrono::steady_clock::now();
    at::Tensor logits = flush(s);
    auto t1 = std::chrono::steady_clock::now();
    for (int i = 0; i < p.max_new_tokens; ++i) {
      // as the Python runtime: never <image> or <pad>, nor LM rows beyond the tokenizer's vocabulary
      logits = logits.clone();  // masked below; the session's last logits stay raw (score reads them)
      float* lp = logits.data_ptr<float>();
      const int64_t V = logits.size(-1);
      for (int64_t v = 0; v < V; ++v)  // NaN would choose a banned token (<image>) or stop silently
        if (std::isnan(lp[v])) {
          throw ApiError(FLAMINGO_ERR_RUNTIME, "the model's logits are NaN at generated token " + std::to_string(i) +
                                                   " (non-finite weights, or an overflow in a half dtype); "
                                                   "reset the session");
        }
      lp[m->manifest.image_id] = -INFINITY;
      lp[m->manifest.pad_id] = -INFINITY;
      for (int64_t v = m->tokenizer.vocab_size(); v < V; ++v) lp[v] = -INFINITY;
      const int32_t next = flamingo_rt::capi::choose_token(lp, V, sp, rng);
      if ((p.stop_at_endoftext && next == m->manifest.eos_id) || (p.stop_at_endofchunk && next == m->manifest.eoc_id)) {
        r.hit_stop = 1;
        s->pending.push_back(next);  // the stop token stays in the context
        break;
      }
      ++r.num_tokens;
      s->pending.push_back(next);
      if (!on_text(dec.push(next))) break;
      if (i + 1 == p.max_new_tokens) break;
      if (s->pos + 1 > m->manifest.max_seq_len) break;  // the caches are full: the answer ends here
      logits = flush(s);
    }
    if (!r.stopped_by_callback && !by_string) {  // what the decoder and the stop-string check held back
      text += dec.flush();
      emit(text.size());
    }
    auto t2 = std::chrono::steady_clock::now();
    r.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();
    r.decode_seconds = std::chrono::duration<double>(t2 - t1).count();
    if (result != nullptr) *result = r;
  });
}

flamingo_status flamingo_session_score(flamingo_session* s, const char* const* candidates, int num_candidates,
                                       double* out_logprobs) {
  return guard("flamingo_session_score", [&] {
    check_session(s);
    if (candidates == nullptr || out_logprobs == nullptr) invalid("expected candidates and out_logprobs, got NULL");
    if (num_candidates < 1) invalid("expected num_candidates >= 1, got " + std::to_string(num_candidates));
    flamingo_model* m = s->model;
    std::vector<std::vector<int32_t>> ids(num_candidates);
    size_t longest = 0;
    for (int i = 0; i < num_candidates; ++i) {
      if (candidates[i] == nullptr) invalid("expected candidate " + std::to_string(i) + ", got NULL");
      ids[i] = m->tokenizer.encode(candidates[i]);
      if (ids[i].empty()) invalid("expected non-empty candidates; candidate " + std::to_string(i) + " has no token");
      for (int32_t id : ids[i])
        if (id == m->manifest.image_id) invalid("candidate " + std::to_string(i) + " contains <image>");
      longest = std::max(longest, ids[i].size());
    }
    if (s->pending.empty() && !s->logits.defined()) invalid("nothing to score after: append text or media first");
    check_room(s, longest - 1, "the longest candidate (less its last token)", "nothing was scored");
    const at::Tensor first = flush(s);  // the context's last logits: the first token's distribution
    const int pos0 = s->pos;
    const at::Tensor lp0 = at::log_softmax(first, -1).contiguous();
    // however scoring ends, the context is as before: the position and the last logits (the
    // cache slots written past pos0 are never read: a step attends to positions < its end)
    struct Restore {
      flamingo_session* s;
      int pos;
      at::Tensor logits;
      ~Restore() {
        s->pos = pos;
        s->logits = logits;
        s->pending.clear();
      }
    } restore{s, pos0, first};
    for (int i = 0; i < num_candidates; ++i) out_logprobs[i] = lp0.data_ptr<float>()[ids[i][0]];
    if (m->score) {
      score_packed(s, ids, out_logprobs);
      return;
    }
    for (int i = 0; i < num_candidates; ++i) {  // an export without a score step: a token at a time
      s->pos = pos0;
      for (size_t j = 0; j + 1 < ids[i].size(); ++j) {
        s->pending.assign(1, ids[i][j]);
        const at::Tensor lp = at::log_softmax(flush(s), -1).contiguous();
        out_logprobs[i] += lp.data_ptr<float>()[ids[i][j + 1]];
      }
    }
  });
}

}  // extern "C"
