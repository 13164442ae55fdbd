// ctest `cpp_host` (run by tests/cpp/run_host_test.py with an export folder of the world
// model, max_seq_len 96, max_media 4): the C API's contracts that the example host does not
// reach -- NULL handles, parameter checks, float pixels, refused appends that leave the session
// as it was, reset, tokenize's count-only form, seeded sampling, and sessions of one model on
// several threads at once.
//
//   test_capi EXPORT_DIR
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "flamingo_rt/flamingo_rt.h"

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

// `st` is `want` and the last error names `needle`
void check_status(flamingo_status st, flamingo_status want, const char* needle, const std::string& what) {
  const std::string msg = flamingo_last_error();
  check(st == want && msg.find(needle) != std::string::npos,
        what + " -> " + flamingo_status_string(st) + " (want " + flamingo_status_string(want) + "): " + msg);
}

int collect(const char* piece, size_t len, void* user_data) {
  static_cast<std::string*>(user_data)->append(piece, len);
  return 0;
}

// A seed-coloured image with a little noise.
std::vector<uint8_t> image_rgb8(int w, int h, int seed) {
  std::vector<uint8_t> px(static_cast<size_t>(w) * h * 3);
  const int colour[3] = {(seed * 53) % 256, (seed * 97 + 80) % 256, (seed * 193 + 160) % 256};
  uint32_t x = 2463534242u + static_cast<uint32_t>(seed) * 7919u;
  for (size_t i = 0; i < px.size(); ++i) {
    x ^= x << 13, x ^= x >> 17, x ^= x << 5;
    px[i] = static_cast<uint8_t>(std::min(255, colour[i % 3] + static_cast<int>(x >> 28)));
  }
  return px;
}

// (3, h, w) planar floats in [0, 1] from RGB8 pixels
std::vector<float> planar(const std::vector<uint8_t>& rgb, int w, int h) {
  std::vector<float> out(rgb.size());
  for (int c = 0; c < 3; ++c)
    for (int i = 0; i < w * h; ++i) out[static_cast<size_t>(c) * w * h + i] = rgb[static_cast<size_t>(i) * 3 + c] / 255.f;
  return out;
}

// A one-image prompt's answer (greedy unless `gp` says otherwise).
std::string answer(flamingo_model* m, int seed, const flamingo_generate_params& gp, const char* prompt = "a") {
  flamingo_session* s = nullptr;
  std::string text;
  if (flamingo_session_create(m, &s) != FLAMINGO_OK) return "<create failed>";
  const auto px = image_rgb8(40, 24, seed);
  if (flamingo_session_append_image_rgb8(s, px.data(), 40, 24) != FLAMINGO_OK ||
      flamingo_session_append_text(s, prompt) != FLAMINGO_OK ||
      flamingo_session_generate(s, &gp, collect, &text, nullptr) != FLAMINGO_OK) {
    text = std::string("<failed: ") + flamingo_last_error() + ">";
  }
  flamingo_session_free(s);
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s EXPORT_DIR\n", argv[0]);
    return 2;
  }
  // ------------------------------------------------------------------ NULLs and loading
  flamingo_model* m = reinterpret_cast<flamingo_model*>(0x1);
  check_status(flamingo_model_load(nullptr, nullptr, &m), FLAMINGO_ERR_INVALID_ARGUMENT, "export folder",
               "model_load(NULL folder)");
  check(m == nullptr, "a failed load sets *out to NULL");
  check_status(flamingo_model_load(argv[1], nullptr, nullptr), FLAMINGO_ERR_INVALID_ARGUMENT, "out",
               "model_load(out = NULL)");
  flamingo_model_params mp = flamingo_model_default_params();
  mp.num_threads = -1;
  check_status(flamingo_model_load(argv[1], &mp, &m), FLAMINGO_ERR_INVALID_ARGUMENT, "num_threads",
               "model_load(num_threads = -1)");
  flamingo_model_free(nullptr);
  flamingo_session_free(nullptr);
  check(flamingo_session_num_tokens(nullptr) == 0 && flamingo_model_max_seq_len(nullptr) == 0,
        "NULL handles: sizes are 0, frees are no-ops");
  check_status(flamingo_session_append_text(nullptr, "a"), FLAMINGO_ERR_INVALID_ARGUMENT, "session",
               "append_text(NULL session)");
  if (flamingo_model_load(argv[1], nullptr, &m) != FLAMINGO_OK) {
    std::printf("FAIL model_load(%s): %s\n", argv[1], flamingo_last_error());
    return 1;
  }
  check(flamingo_model_default_params().warmup == 1, "default params warm the packages up at load");
  {  // a model loaded without the warm-up answers the same
    flamingo_model_params cold = flamingo_model_default_params();
    cold.warmup = 0;
    flamingo_model* mc = nullptr;
    const flamingo_status st = flamingo_model_load(argv[1], &cold, &mc);
    flamingo_generate_params gp = flamingo_generate_default_params();
    gp.max_new_tokens = 6;
    const std::string a_cold = st == FLAMINGO_OK ? answer(mc, 5, gp) : "<load failed>";
    const std::string a_warm = answer(m, 5, gp);
    check(st == FLAMINGO_OK && a_cold == a_warm, "warmup = 0 loads and answers as warmed up: '" + a_cold + "'");
    flamingo_model_free(mc);
  }
  const int max_seq = flamingo_model_max_seq_len(m), max_media = flamingo_model_max_media(m);
  check(max_seq == 96 && max_media == 4 && flamingo_model_image_size(m) == 32,
        "manifest sizes: " + std::to_string(max_seq) + ", " + std::to_string(max_media));

  // ------------------------------------------------------------------ tokenize
  size_t n = 0;
  const bool counted = flamingo_tokenize(m, "a red circle.<|endofchunk|>", nullptr, 0, &n) == FLAMINGO_OK;
  check(counted && n > 1, "tokenize counts without a buffer: " + std::to_string(n));
  std::vector<int32_t> ids(n, -7);
  size_t n2 = 0;
  check(flamingo_tokenize(m, "a red circle.<|endofchunk|>", ids.data(), 1, &n2) == FLAMINGO_OK && n2 == n &&
            ids[0] >= 0 && ids[1] == -7,
        "tokenize writes at most `capacity` ids and reports the full count");
  check_status(flamingo_tokenize(m, "a", ids.data(), 1, nullptr), FLAMINGO_ERR_INVALID_ARGUMENT, "n_ids",
               "tokenize(n_ids = NULL)");

  // ------------------------------------------------------------------ a session's appends
  flamingo_session* s = nullptr;
  check(flamingo_session_create(m, &s) == FLAMINGO_OK, "session_create");
  std::string text;
  flamingo_generate_params gp = flamingo_generate_default_params();
  gp.max_new_tokens = 4;
  check_status(flamingo_session_generate(s, &gp, collect, &text, nullptr), FLAMINGO_ERR_INVALID_ARGUMENT,
               "nothing to generate", "generate on an empty session");
  check_status(flamingo_session_append_text(s, "x <image> y"), FLAMINGO_ERR_INVALID_ARGUMENT, "<image>",
               "append_text with <image>");
  check_status(flamingo_session_append_text(s, "bad \xC3\x28 utf-8"), FLAMINGO_ERR_INVALID_ARGUMENT, "expected UTF-8 text",
               "append_text of invalid UTF-8");
  const auto rgb = image_rgb8(40, 24, 1);
  std::vector<float> f32 = planar(rgb, 40, 24);
  std::vector<float> f255 = f32;
  for (float& v : f255) v *= 255.f;
  check_status(flamingo_session_append_image_f32(s, f255.data(), 40, 24), FLAMINGO_ERR_INVALID_ARGUMENT, "[0, 1]",
               "append_image_f32 of a 0-255 float image");
  std::vector<float> fnan = f32;
  fnan[17] = NAN;
  check_status(flamingo_session_append_image_f32(s, fnan.data(), 40, 24), FLAMINGO_ERR_INVALID_ARGUMENT, "finite",
               "append_image_f32 with a NaN");
  check_status(flamingo_session_append_image_rgb8(s, rgb.data(), 0, 24), FLAMINGO_ERR_INVALID_ARGUMENT, ">= 1",
               "append_image_rgb8 of width 0");
  check(flamingo_session_num_tokens(s) == 0, "refused appends queued nothing");
  // the f32 form of an image gives the rgb8 form's answer
  bool ok = flamingo_session_append_image_f32(s, f32.data(), 40, 24) == FLAMINGO_OK &&
            flamingo_session_append_text(s, "a") == FLAMINGO_OK &&
            flamingo_session_generate(s, &gp, collect, &text, nullptr) == FLAMINGO_OK;
  check(ok, std::string("an f32 image prompt generates") + (ok ? "" : std::string(": ") + flamingo_last_error()));
  check(text == answer(m, 1, gp), "the f32 image's answer equals the rgb8 image's: '" + text + "'");

  // the context fills: a refused append leaves the session usable
  const int before = flamingo_session_num_tokens(s);
  std::string longer;
  for (int i = 0; i < max_seq; ++i) longer += " a";
  check_status(flamingo_session_append_text(s, longer.c_str()), FLAMINGO_ERR_CAPACITY, "max_seq_len = 96",
               "text past the context");
  check(flamingo_session_num_tokens(s) == before, "the refused text queued nothing (" + std::to_string(before) +
                                                     " tokens, " + std::to_string(flamingo_session_num_tokens(s)) + ")");
  text.clear();
  ok = flamingo_session_append_text(s, " and") == FLAMINGO_OK &&
       flamingo_session_generate(s, &gp, collect, &text, nullptr) == FLAMINGO_OK;
  check(ok, std::string("the session continues after a refused append") +
                (ok ? "" : std::string(": ") + flamingo_last_error()));
  for (int k = flamingo_session_num_tokens(s); k < max_seq; ++k) flamingo_session_append_text(s, " a");
  check(flamingo_session_num_tokens(s) == max_seq, "the context filled to max_seq_len exactly");
  check_status(flamingo_session_append_image_rgb8(s, rgb.data(), 40, 24), FLAMINGO_ERR_CAPACITY, "<image>",
               "an image into a full context");
  flamingo_generate_result r{};
  text.clear();
  check(flamingo_session_generate(s, &gp, collect, &text, &r) == FLAMINGO_OK && r.num_tokens <= 1,
        "a full context generates at most the one token its last logits give: " + std::to_string(r.num_tokens));

  // reset forgets everything
  check(flamingo_session_reset(s) == FLAMINGO_OK && flamingo_session_num_tokens(s) == 0, "reset empties the context");
  check_status(flamingo_session_generate(s, &gp, collect, &text, nullptr), FLAMINGO_ERR_INVALID_ARGUMENT,
               "nothing to generate", "generate right after reset");
  for (int k = 0; k < max_media; ++k) flamingo_session_append_image_rgb8(s, rgb.data(), 40, 24);
  const int with_media = flamingo_session_num_tokens(s);
  check_status(flamingo_session_append_image_rgb8(s, rgb.data(), 40, 24), FLAMINGO_ERR_CAPACITY, "max_media = 4",
               "one medium past max_media");
  check(with_media == max_media && flamingo_session_num_tokens(s) == with_media, "the refused medium queued nothing");
  flamingo_session_free(s);

  // ------------------------------------------------------------------ generation parameters
  struct Bad {
    const char* what;
    void (*edit)(flamingo_generate_params*);
    const char* needle;
  };
  static const char* null_stop[] = {nullptr};
  const Bad bad[] = {
      {"max_new_tokens = 0", [](flamingo_generate_params* p) { p->max_new_tokens = 0; }, "max_new_tokens"},
      {"temperature = NaN", [](flamingo_generate_params* p) { p->temperature = NAN; }, "temperature"},
      {"temperature < 0", [](flamingo_generate_params* p) { p->temperature = -1.f; }, "temperature"},
      {"top_k < 0", [](flamingo_generate_params* p) { p->top_k = -2; }, "top_k"},
      {"top_p = 0", [](flamingo_generate_params* p) { p->top_p = 0.f; }, "top_p"},
      {"a NULL stop string", [](flamingo_generate_params* p) { p->stop_strings = null_stop, p->num_stop_strings = 1; },
       "stop strings"},
      {"num_beams = 0", [](flamingo_generate_params* p) { p->num_beams = 0; }, "num_beams"},
      {"beams and sampling", [](flamingo_generate_params* p) { p->num_beams = 3, p->temperature = 1.f; },
       "either sampling"},
      {"early_stopping = 3", [](flamingo_generate_params* p) { p->num_beams = 2, p->early_stopping = 3; },
       "early_stopping"},
      {"length_penalty = inf", [](flamingo_generate_params* p) { p->num_beams = 2, p->length_penalty = INFINITY; },
       "length_penalty"},
      {"more beams than the export's max_beams", [](flamingo_generate_params* p) { p->num_beams = 64; }, "max_beams"},
  };
  flamingo_session_create(m, &s);
  flamingo_session_append_text(s, "a");
  for (const Bad& b : bad) {
    flamingo_generate_params p = flamingo_generate_default_params();
    b.edit(&p);
    check_status(flamingo_session_generate(s, &p, nullptr, nullptr, nullptr), FLAMINGO_ERR_INVALID_ARGUMENT,
                 b.needle, std::string("generate with ") + b.what);
  }
  flamingo_session_free(s);

  // seeded sampling repeats; greedy is what temperature 0 gives
  flamingo_generate_params sp = flamingo_generate_default_params();
  sp.max_new_tokens = 8;
  sp.temperature = 1.5f;
  sp.top_k = 50;
  sp.seed = 123;
  const std::string a1 = answer(m, 2, sp), a2 = answer(m, 2, sp);
  check(a1 == a2 && a1.find("<failed") == std::string::npos, "the same seed samples the same answer: '" + a1 + "'");

  // ------------------------------------------------------------------ beam search
  {
    const flamingo_generate_params d = flamingo_generate_default_params();
    check(d.num_beams == 1 && d.length_penalty == 1.f && d.early_stopping == 0,
          "default params: greedy (num_beams 1), length_penalty 1, early_stopping 0");
    flamingo_generate_params bp = d;
    bp.num_beams = 3;
    bp.max_new_tokens = 6;
    std::vector<uint8_t> px = image_rgb8(40, 24, 3);
    flamingo_session* a = nullptr;
    flamingo_session_create(m, &a);
    flamingo_session_append_image_rgb8(a, px.data(), 40, 24);
    flamingo_session_append_text(a, "a");
    flamingo_session* b = nullptr;
    flamingo_session_fork(a, &b);
    const int before = flamingo_session_num_tokens(a);
    std::string text_a, text_b;
    int calls = 0;
    auto counting = [](const char* piece, size_t len, void* user) {
      auto* st = static_cast<std::pair<std::string*, int*>*>(user);
      st->first->append(piece, len);
      ++*st->second;
      return 0;
    };
    std::pair<std::string*, int*> user{&text_a, &calls};
    flamingo_generate_result r{};
    const flamingo_status st = flamingo_session_generate(a, &bp, counting, &user, &r);
    check(st == FLAMINGO_OK && calls <= 1 && r.num_tokens <= 6, "beam search answers, its text in one piece: '" +
                                                                    text_a + "' (" + flamingo_last_error() + ")");
    // the answer's tokens (and the stop token that ended it) are queued in the context
    check(flamingo_session_num_tokens(a) == before + r.num_tokens + (r.hit_stop ? 1 : 0),
          "the beam answer's tokens stay in the context: " + std::to_string(flamingo_session_num_tokens(a)) +
              " == " + std::to_string(before) + " + " + std::to_string(r.num_tokens) + " + " + std::to_string(r.hit_stop));
    const flamingo_status st_b = flamingo_session_generate(b, &bp, collect, &text_b, nullptr);
    check(st_b == FLAMINGO_OK && text_b == text_a, "a fork's beam answer is the same: '" + text_b + "'");
    flamingo_generate_params gp1 = d;
    gp1.max_new_tokens = 3;
    std::string more;
    const int held = flamingo_session_num_tokens(a);
    const flamingo_status st_more = flamingo_session_generate(a, &gp1, collect, &more, nullptr);
    check(st_more == FLAMINGO_OK && flamingo_session_num_tokens(a) > held,
          "the conversation goes on greedily after a beam answer: '" + more + "'");
    flamingo_session_free(a);
    flamingo_session_free(b);
    // a context with no room left for an answer
    flamingo_session_create(m, &a);
    while (flamingo_session_num_tokens(a) < flamingo_model_max_seq_len(m) &&
           (flamingo_session_append_text(a, " a") == FLAMINGO_OK || flamingo_session_append_text(a, "a") == FLAMINGO_OK)) {
    }
    check(flamingo_session_num_tokens(a) == flamingo_model_max_seq_len(m), "a context filled to max_seq_len");
    check_status(flamingo_session_generate(a, &bp, nullptr, nullptr, nullptr), FLAMINGO_ERR_CAPACITY, "no room",
                 "beam search in a full context");
    flamingo_session_free(a);
  }

  // ------------------------------------------------------------------ fork
  {
    // a support set prefilled once; a fork per query equals a fresh session given the whole prompt
    const auto sup = image_rgb8(40, 24, 21), q1 = image_rgb8(32, 32, 22), q2 = image_rgb8(20, 30, 23);
    auto fresh = [&](const std::vector<uint8_t>& q, int w, int h, const char* text) {
      flamingo_session* f = nullptr;
      std::string t;
      flamingo_session_create(m, &f);
      flamingo_session_append_image_rgb8(f, sup.data(), 40, 24);
      flamingo_session_append_text(f, "a red circle.<|endofchunk|>");
      flamingo_session_append_image_rgb8(f, q.data(), w, h);
      flamingo_session_append_text(f, text);
      flamingo_session_generate(f, &gp, collect, &t, nullptr);
      flamingo_session_free(f);
      return t;
    };
    flamingo_session* support = nullptr;
    flamingo_session_create(m, &support);
    flamingo_session_append_image_rgb8(support, sup.data(), 40, 24);
    flamingo_session_append_text(support, "a red circle.<|endofchunk|>");
    const int held = flamingo_session_num_tokens(support);
    check(flamingo_session_prefill(support) == FLAMINGO_OK && flamingo_session_prefill(support) == FLAMINGO_OK &&
              flamingo_session_num_tokens(support) == held,
          "prefill runs the queued tokens (twice: the second has nothing to do)");
    check_status(flamingo_session_prefill(nullptr), FLAMINGO_ERR_INVALID_ARGUMENT, "session", "prefill(NULL)");
    flamingo_session *f1 = nullptr, *f2 = nullptr;
    check_status(flamingo_session_fork(nullptr, &f1), FLAMINGO_ERR_INVALID_ARGUMENT, "session", "fork(NULL)");
    check_status(flamingo_session_fork(support, nullptr), FLAMINGO_ERR_INVALID_ARGUMENT, "out", "fork(out = NULL)");
    check(flamingo_session_fork(support, &f1) == FLAMINGO_OK && flamingo_session_fork(support, &f2) == FLAMINGO_OK &&
              flamingo_session_num_tokens(f1) == held,
          "fork copies the context (" + std::to_string(held) + " tokens)");
    std::string a1, a2;
    flamingo_session_append_image_rgb8(f1, q1.data(), 32, 32);
    flamingo_session_append_text(f1, "a");
    flamingo_session_generate(f1, &gp, collect, &a1, nullptr);
    flamingo_session_append_image_rgb8(f2, q2.data(), 20, 30);
    flamingo_session_append_text(f2, "the");
    flamingo_session_generate(f2, &gp, collect, &a2, nullptr);
    check(a1 == fresh(q1, 32, 32, "a") && a2 == fresh(q2, 20, 30, "the") && a1 != a2,
          "each fork's answer equals a fresh session's: '" + a1 + "', '" + a2 + "'");
    check(flamingo_session_num_tokens(support) == held, "forks leave the original as it was");
    // a fork of a session that has run (its caches hold the context, its logits the last token's)
    flamingo_session* run = nullptr;
    flamingo_session_create(m, &run);
    flamingo_session_append_image_rgb8(run, q1.data(), 32, 32);
    flamingo_session_append_text(run, "a");
    std::string r1, r2, r3;
    flamingo_session_generate(run, &gp, collect, &r1, nullptr);
    flamingo_session* after = nullptr;
    flamingo_session_fork(run, &after);
    flamingo_session_append_text(run, " and");
    flamingo_session_generate(run, &gp, collect, &r2, nullptr);
    flamingo_session_append_text(after, " and");
    flamingo_session_generate(after, &gp, collect, &r3, nullptr);
    check(r2 == r3 && !r1.empty(), "a fork after a turn continues as the original: '" + r3 + "' == '" + r2 + "'");
    for (flamingo_session* x : {support, f1, f2, run, after}) flamingo_session_free(x);
  }

  // ------------------------------------------------------------------ score
  {
    const auto px = image_rgb8(40, 24, 31);
    flamingo_session *a = nullptr, *b = nullptr;
    flamingo_session_create(m, &a);
    flamingo_session_create(m, &b);
    for (flamingo_session* x : {a, b}) {
      flamingo_session_append_image_rgb8(x, px.data(), 40, 24);
      flamingo_session_append_text(x, "a");
    }
    const char* cands[] = {" red circle.", " blue", " red circle."};
    double lp[3] = {1, 1, 1};
    const bool scored = flamingo_session_score(a, cands, 3, lp) == FLAMINGO_OK;
    // (packs of other sizes round differently in the last bits: equal to 1e-4, not bit for bit)
    check(scored && lp[0] < 0 && lp[1] < 0 && std::abs(lp[0] - lp[2]) < 1e-4,
          "score: log-probabilities < 0, the same candidate twice the same: " + std::to_string(lp[0]) + ", " +
              std::to_string(lp[1]));
    const char* two[] = {" red circle.", " blue"};
    double lp2[2] = {0, 0};
    check(flamingo_session_score(a, two, 2, lp2) == FLAMINGO_OK && std::abs(lp2[0] - lp[0]) < 1e-4 &&
              std::abs(lp2[1] - lp[1]) < 1e-4,
          "scoring again gives the same numbers (the context is unchanged)");
    std::string ga, gb;
    flamingo_session_generate(a, &gp, collect, &ga, nullptr);
    flamingo_session_generate(b, &gp, collect, &gb, nullptr);
    check(ga == gb && flamingo_session_num_tokens(a) == flamingo_session_num_tokens(b),
          "after scoring, the session answers as one that never scored: '" + ga + "' == '" + gb + "'");
    const char* empty[] = {""};
    const char* image[] = {"x <image>"};
    const char* null_c[] = {nullptr};
    check_status(flamingo_session_score(a, empty, 1, lp), FLAMINGO_ERR_INVALID_ARGUMENT, "non-empty",
                 "score an empty candidate");
    check_status(flamingo_session_score(a, image, 1, lp), FLAMINGO_ERR_INVALID_ARGUMENT, "<image>",
                 "score a candidate with <image>");
    check_status(flamingo_session_score(a, null_c, 1, lp), FLAMINGO_ERR_INVALID_ARGUMENT, "NULL",
                 "score a NULL candidate");
    check_status(flamingo_session_score(a, cands, 0, lp), FLAMINGO_ERR_INVALID_ARGUMENT, "num_candidates",
                 "score no candidate");
    std::string longer;
    for (int i = 0; i < max_seq; ++i) longer += " a";
    const char* too_long[] = {longer.c_str()};
    const int held = flamingo_session_num_tokens(a);
    check_status(flamingo_session_score(a, too_long, 1, lp), FLAMINGO_ERR_CAPACITY, "nothing was scored",
                 "score a candidate past the context");
    check(flamingo_session_num_tokens(a) == held, "a refused score leaves the session as it was");
    flamingo_session* e = nullptr;
    flamingo_session_create(m, &e);
    check_status(flamingo_session_score(e, cands, 1, lp), FLAMINGO_ERR_INVALID_ARGUMENT, "nothing to score after",
                 "score on an empty session");
    for (flamingo_session* x : {a, b, e}) flamingo_session_free(x);
  }

  // ------------------------------------------------------------------ sessions on threads
  flamingo_generate_params g8 = flamingo_generate_default_params();
  g8.max_new_tokens = 8;
  const char* prompts[4] = {"a", "a red circle.<|endofchunk|>", "the", "two blue"};
  std::vector<std::string> alone(4), together(4);
  for (int k = 0; k < 4; ++k) alone[k] = answer(m, 10 + k, g8, prompts[k]);
  std::vector<std::thread> threads;
  for (int k = 0; k < 4; ++k) threads.emplace_back([&, k] { together[k] = answer(m, 10 + k, g8, prompts[k]); });
  for (auto& t : threads) t.join();
  for (int k = 0; k < 4; ++k) {
    check(together[k] == alone[k] && alone[k].find("<failed") == std::string::npos,
          "session " + std::to_string(k) + " on its own thread: '" + together[k] + "' == '" + alone[k] + "'");
  }
  int distinct = 0;
  for (int k = 0; k < 4; ++k) distinct += std::find(alone.begin(), alone.begin() + k, alone[k]) == alone.begin() + k;
  check(distinct >= 2, "the threads' prompts give different answers (" + std::to_string(distinct) + " distinct of 4)");
  flamingo_model_free(m);
  std::printf("%d failure(s)\n", failures);
  return failures ? 1 : 0;
}
