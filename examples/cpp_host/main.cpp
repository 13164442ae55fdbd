// A C++ host of flamingo_rt: loads an exported model (flamingo-rt export), builds a few-shot
// prompt from the command line, streams the answer to stdout. No Python anywhere.
//
//   cpp_host EXPORT_DIR [--image FILE.ppm | --clip N FILE.ppm... | --text TEXT | --generate]... \
//            [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop STR] [--no-stop]
//            [--stop-after-pieces N] [--score TEXT]... [--num-beams K] [--length-penalty X]
//            [--early-stopping false|true|never] [--no-warmup]
//
// Items are appended in the order given. `--generate` answers there (a turn of a conversation:
// the answer stays in the context and later items follow it); the host answers once more at the
// end when something was appended after the last turn (or when no turn was asked for). Each
// answer is streamed to stdout and ends with a newline. Options apply to the turns after them.
// With --score (repeatable), the host ranks candidate continuations instead of the final answer:
// one line per candidate, "LOGPROB<TAB>TEXT" (flamingo_session_score).
// Images are binary PPM (P6, maxval 255). Exit status: 0 on success, else the flamingo_status
// of the failing call (its message on stderr).
// With FLAMINGO_RT_CHECK_NO_PYTHON=1 the host also fails (status 90) if a libpython is mapped.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "flamingo_rt/flamingo_rt.h"

namespace {

bool read_ppm(const std::string& path, std::vector<uint8_t>* rgb, int* w, int* h) {
  std::ifstream f(path, std::ios::binary);
  std::string magic;
  int maxval = 0;
  if (!(f >> magic >> *w >> *h >> maxval) || magic != "P6" || maxval != 255 || *w < 1 || *h < 1) return false;
  f.get();  // the single whitespace after the header
  rgb->resize(static_cast<size_t>(*w) * *h * 3);
  return static_cast<bool>(f.read(reinterpret_cast<char*>(rgb->data()), static_cast<std::streamsize>(rgb->size())));
}

// user_data: pieces left before the callback asks to stop (-1: never)
int on_piece(const char* piece, size_t len, void* user_data) {
  std::fwrite(piece, 1, len, stdout);
  std::fflush(stdout);
  int* left = static_cast<int*>(user_data);
  return (*left >= 0 && --*left <= 0) ? 1 : 0;
}

int fail(flamingo_status st) {
  std::fprintf(stderr, "cpp_host: %s: %s\n", flamingo_status_string(st), flamingo_last_error());
  return static_cast<int>(st);
}

// Every exit path frees the session and the model (the model's packages are extracted to a
// temporary folder that its free removes).
struct SessionFree {
  void operator()(flamingo_session* s) const { flamingo_session_free(s); }
};
struct ModelFree {
  void operator()(flamingo_model* m) const { flamingo_model_free(m); }
};
struct MissingValue {};  // an option without its value (exit status 2)

bool python_mapped() {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line))
    if (line.find("libpython") != std::string::npos) return true;
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s EXPORT_DIR [--image F.ppm | --clip N F.ppm... | --text T]... [options]\n", argv[0]);
    return 2;
  }
  flamingo_model_params mp = flamingo_model_default_params();
  flamingo_model* model = nullptr;
  for (int i = 2; i < argc; ++i)  // (a load option: parsed before the load)
    if (std::strcmp(argv[i], "--no-warmup") == 0) mp.warmup = 0;
  const auto t_load = std::chrono::steady_clock::now();
  flamingo_status st = flamingo_model_load(argv[1], &mp, &model);
  if (st != FLAMINGO_OK) return fail(st);
  std::fprintf(stderr, "cpp_host: model loaded in %.3f s%s\n",
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count(),
               mp.warmup ? " (packages warmed up)" : "");
  std::unique_ptr<flamingo_model, ModelFree> model_owner(model);
  flamingo_session* s = nullptr;
  if ((st = flamingo_session_create(model, &s)) != FLAMINGO_OK) return fail(st);
  std::unique_ptr<flamingo_session, SessionFree> session_owner(s);
  flamingo_generate_params gp = flamingo_generate_default_params();
  std::vector<std::string> stops;
  int stop_after = -1;
  double read_s = 0;  // PPM reading, not the library's work
  auto t_prompt = std::chrono::steady_clock::now();  // the appends (preprocessing) count toward the first token
  int turns = 0;
  bool appended = false;  // since the last turn
  std::vector<std::string> scores;  // candidates to score at the end
  // One answer: streamed to stdout, then a newline and the turn's timings on stderr.
  auto turn = [&]() -> flamingo_status {
    std::vector<const char*> stop_ptrs;
    for (const std::string& x : stops) stop_ptrs.push_back(x.c_str());
    gp.stop_strings = stop_ptrs.empty() ? nullptr : stop_ptrs.data();
    gp.num_stop_strings = static_cast<int>(stop_ptrs.size());
    const auto t_gen = std::chrono::steady_clock::now();
    flamingo_generate_result r{};
    const flamingo_status gs = flamingo_session_generate(s, &gp, on_piece, &stop_after, &r);
    gp.stop_strings = nullptr;
    gp.num_stop_strings = 0;
    if (gs != FLAMINGO_OK) return gs;
    if (r.stopped_by_callback) std::fprintf(stderr, "cpp_host: stopped by the callback\n");
    std::printf("\n");
    std::fflush(stdout);
    const double append_s = std::chrono::duration<double>(t_gen - t_prompt).count() - read_s;
    std::fprintf(stderr, "cpp_host: %d tokens, first token after %.4f s (appends %.4f s + media and prefill %.4f s), "
                 "%.1f tokens/s\n", r.num_tokens, append_s + r.prefill_seconds, append_s, r.prefill_seconds,
                 r.num_tokens > 1 ? (r.num_tokens - 1) / (r.decode_seconds > 0 ? r.decode_seconds : 1e-9) : 0.0);
    std::fprintf(stderr, "cpp_host: stats tokens=%d ttft_s=%.6f decode_s=%.6f\n", r.num_tokens,
                 append_s + r.prefill_seconds, r.decode_seconds);
    ++turns;
    appended = false;
    read_s = 0;
    t_prompt = std::chrono::steady_clock::now();
    return FLAMINGO_OK;
  };
  for (int i = 2; i < argc; ++i) try {
    std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "cpp_host: %s needs a value\n", a.c_str());
        throw MissingValue{};
      }
      return argv[++i];
    };
    if (a == "--text") {
      st = flamingo_session_append_text(s, next());
      appended = true;
    } else if (a == "--generate") {
      st = turn();
    } else if (a == "--image") {
      std::vector<uint8_t> rgb;
      int w = 0, h = 0;
      std::string path = next();
      const auto t_read = std::chrono::steady_clock::now();
      const bool ok = read_ppm(path, &rgb, &w, &h);
      read_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t_read).count();
      if (!ok) {
        std::fprintf(stderr, "cpp_host: %s: expected a binary PPM (P6, maxval 255)\n", path.c_str());
        return 2;
      }
      st = flamingo_session_append_image_rgb8(s, rgb.data(), w, h);
      appended = true;
    } else if (a == "--clip") {
      int n = std::atoi(next());
      std::vector<uint8_t> all, rgb;
      int w = 0, h = 0;
      for (int k = 0; k < n; ++k) {
        std::string path = next();
        int fw = 0, fh = 0;
        if (!read_ppm(path, &rgb, &fw, &fh) || (k > 0 && (fw != w || fh != h))) {
          std::fprintf(stderr, "cpp_host: %s: expected a P6 PPM frame of the clip's size\n", path.c_str());
          return 2;
        }
        w = fw, h = fh;
        all.insert(all.end(), rgb.begin(), rgb.end());
      }
      st = flamingo_session_append_clip_rgb8(s, all.data(), n, w, h);
      appended = true;
    } else if (a == "--max-new-tokens") {
      gp.max_new_tokens = std::atoi(next());
    } else if (a == "--temperature") {
      gp.temperature = static_cast<float>(std::atof(next()));
    } else if (a == "--top-k") {
      gp.top_k = std::atoi(next());
    } else if (a == "--top-p") {
      gp.top_p = static_cast<float>(std::atof(next()));
    } else if (a == "--seed") {
      gp.seed = std::strtoull(next(), nullptr, 10);
    } else if (a == "--stop-after-pieces") {  // the callback stops the generation after N pieces
      stop_after = std::atoi(next());
    } else if (a == "--no-stop") {  // only max_new_tokens ends the answer (benchmarks)
      gp.stop_at_endofchunk = 0;
      gp.stop_at_endoftext = 0;
    } else if (a == "--no-warmup") {  // handled before the load
    } else if (a == "--num-beams") {  // beam search (the answer comes whole at the end)
      gp.num_beams = std::atoi(next());
    } else if (a == "--length-penalty") {
      gp.length_penalty = static_cast<float>(std::atof(next()));
    } else if (a == "--early-stopping") {  // false (default), true or never
      const std::string v = next();
      gp.early_stopping = v == "true" ? 1 : v == "never" ? 2 : v == "false" ? 0 : -1;
    } else if (a == "--stop") {
      stops.emplace_back(next());
    } else if (a == "--score") {
      scores.emplace_back(next());
    } else {
      std::fprintf(stderr, "cpp_host: unknown argument %s\n", a.c_str());
      return 2;
    }
    if (st != FLAMINGO_OK) return fail(st);
  } catch (const MissingValue&) {
    return 2;
  }
  if (!scores.empty()) {
    std::vector<const char*> cands;
    for (const std::string& c : scores) cands.push_back(c.c_str());
    std::vector<double> lp(cands.size());
    if ((st = flamingo_session_score(s, cands.data(), static_cast<int>(cands.size()), lp.data())) != FLAMINGO_OK)
      return fail(st);
    for (size_t i = 0; i < cands.size(); ++i) std::printf("%.6f\t%s\n", lp[i], cands[i]);
  } else if ((turns == 0 || appended) && (st = turn()) != FLAMINGO_OK) {
    return fail(st);
  }
  session_owner.reset();
  model_owner.reset();
  const char* check = std::getenv("FLAMINGO_RT_CHECK_NO_PYTHON");
  if (check != nullptr && std::strcmp(check, "1") == 0 && python_mapped()) {
    std::fprintf(stderr, "cpp_host: a libpython is mapped into this process\n");
    return 90;
  }
  return 0;
}
