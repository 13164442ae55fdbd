// The CPU block cache (cpu_block_cache.h) and its torch ops:
//
//   flamingo_rt_C::cpu_block_cache_enter(bool bounded=False) -> ()  # open a scope on this thread
//   flamingo_rt_C::cpu_block_cache_exit() -> ()      # close it (error without one open)
//   flamingo_rt_C::cpu_block_cache_depth() -> int    # scopes open on this thread
//   flamingo_rt_C::cpu_block_cache_stats() -> int[]  # [hits, misses, releases, cached_bytes,
//                                                    #  in_use_bytes, limit_bytes, installed,
//                                                    #  live_bytes, live_peak_bytes]
//   flamingo_rt_C::cpu_block_cache_empty() -> ()
//   flamingo_rt_C::cpu_block_cache_set_limit(int bytes) -> ()
//
// Python: flamingo_rt.runtime.cpu_cache.
#include "cpu_block_cache.h"

#include <torch/library.h>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <pthread.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace flamingo_rt {
namespace {

constexpr int64_t kDefaultLimitBytes = int64_t(2) << 30;
constexpr std::size_t kPage = 4096;

// The open scopes of this thread, innermost last: 1 for a bounded scope, 0 for a plain one.
thread_local std::vector<char> tl_scopes;

int64_t limit_from_env() {
  const char* s = std::getenv("FLAMINGO_RT_CPU_CACHE_MIB");
  if (s == nullptr || *s == '\0') return kDefaultLimitBytes;
  char* end = nullptr;
  const long long mib = std::strtoll(s, &end, 10);
  TORCH_CHECK(end != s && *end == '\0' && mib >= 0,
              "FLAMINGO_RT_CPU_CACHE_MIB: expected a number of MiB >= 0, got '", s, "'");
  return int64_t(mib) << 20;
}

struct Block {
  void* base;            // what c10::alloc_cpu returned
  std::size_t size;      // usable bytes from the data pointer
  std::size_t req = 0;   // bytes the live tensor asked for (0 while on the free list)
};

// Everything the cache owns. Allocated once and never destroyed: tensors may be freed during
// static destruction at exit, after a static object would be gone.
struct State {
  std::mutex mu;
  std::multimap<std::size_t, void*> free_blocks;      // size -> block
  std::unordered_map<void*, Block> owned;              // every block of the cache (by data pointer)
  c10::DeleterFnPtr base_raw_deleter = nullptr;        // the replaced allocator's raw deleter
  CpuBlockCacheStats stats;
};

State& state();

// fork() while another thread holds the lock would leave it locked forever in the child (a
// DataLoader worker freeing its first cached tensor would hang): hold it across fork.
void lock_for_fork() { state().mu.lock(); }
void unlock_after_fork() { state().mu.unlock(); }

State& state() {
  static State* s = [] {
    auto* st = new State();
    st->stats.limit_bytes = limit_from_env();
    return st;
  }();
  return *s;
}

// Called with the lock held: releases blocks from the largest down until the free list
// holds at most `keep` bytes.
void trim_locked(State& s, int64_t keep) {
  while (s.stats.cached_bytes > keep && !s.free_blocks.empty()) {
    auto it = std::prev(s.free_blocks.end());
    s.stats.cached_bytes -= int64_t(it->first);
    auto o = s.owned.find(it->second);
    c10::free_cpu(o->second.base);
    s.owned.erase(o);
    s.free_blocks.erase(it);
    ++s.stats.releases;
  }
}

// A block may serve a request of `size` (page-rounded) bytes: up to twice that in plain
// scopes, an eighth more in bounded ones (whose footprint counts the block's whole size).
bool fits(std::size_t block, std::size_t size, bool bounded) {
  return block <= (bounded ? size + size / 8 : 2 * size);
}

// The deleter of every block the cache hands out (DataPtr's and raw_deallocate's): back on
// the free list, or released when the list is full; pointers the cache does not own go to the
// replaced allocator's deleter.
void free_block(void* p) {
  if (p == nullptr) return;
  State& s = state();
  {
    std::lock_guard<std::mutex> lock(s.mu);
    auto it = s.owned.find(p);
    if (it != s.owned.end()) {
      const std::size_t size = it->second.size;
      s.stats.in_use_bytes -= int64_t(size);
      s.stats.live_bytes -= int64_t(it->second.req);
      it->second.req = 0;
      if (s.stats.cached_bytes + int64_t(size) <= s.stats.limit_bytes) {
        s.free_blocks.emplace(size, p);
        s.stats.cached_bytes += int64_t(size);
      } else {
        c10::free_cpu(it->second.base);
        s.owned.erase(it);
        ++s.stats.releases;
      }
      return;
    }
  }
  TORCH_INTERNAL_ASSERT(s.base_raw_deleter != nullptr, "cpu_block_cache: no deleter for a foreign block");
  s.base_raw_deleter(p);
}

// Called with the lock held: a live tensor of n bytes more.
void add_live_locked(State& s, std::size_t n) {
  s.stats.live_bytes += int64_t(n);
  if (s.stats.live_bytes > s.stats.live_peak_bytes) s.stats.live_peak_bytes = s.stats.live_bytes;
}

void* take_block(std::size_t n, bool bounded) {
  State& s = state();
  const std::size_t size = (n + kPage - 1) / kPage * kPage;
  std::size_t offset;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    auto it = s.free_blocks.lower_bound(size);
    if (it != s.free_blocks.end() && fits(it->first, size, bounded)) {
      void* p = it->second;
      s.stats.cached_bytes -= int64_t(it->first);
      s.stats.in_use_bytes += int64_t(it->first);
      s.free_blocks.erase(it);
      s.owned.at(p).req = n;
      add_live_locked(s, n);
      ++s.stats.hits;
      return p;
    }
    if (bounded) {
      // the new block must not take the footprint (blocks in use + free list) past the peak
      // of live bytes (this request's included): release cached blocks, largest first
      const int64_t peak = std::max(s.stats.live_peak_bytes, s.stats.live_bytes + int64_t(n));
      const int64_t room = peak - s.stats.in_use_bytes - int64_t(size);
      trim_locked(s, room > 0 ? room : 0);
    }
    // A new block starts at a staggered offset within its first page (a multiple of 64
    // bytes, spread over the page): mmap'ed blocks all start at the same page offset, so
    // tensors read and written together would map onto the same cache sets.
    offset = std::size_t((s.stats.misses * 17) % (kPage / 64)) * 64;
  }
  void* base = nullptr;
  try {
    base = c10::alloc_cpu(size + offset);
  } catch (const c10::Error&) {
    cpu_block_cache_empty();  // out of memory: give the free list back and try once more
    base = c10::alloc_cpu(size + offset);
  }
  void* p = static_cast<char*>(base) + offset;
  std::lock_guard<std::mutex> lock(s.mu);
  s.owned.emplace(p, Block{base, size, n});
  s.stats.in_use_bytes += int64_t(size);
  add_live_locked(s, n);
  ++s.stats.misses;
  return p;
}

class BlockCacheAllocator final : public c10::Allocator {
 public:
  explicit BlockCacheAllocator(c10::Allocator* base) : base_(base) {}

  c10::DataPtr allocate(std::size_t n) override {
    if (tl_scopes.empty() || n < kMinBlockBytes) return base_->allocate(n);
    void* p = take_block(n, tl_scopes.back() != 0);
    return {p, p, &free_block, c10::Device(c10::DeviceType::CPU)};
  }

  // raw_deallocate of any CPU block, whichever allocator made it
  c10::DeleterFnPtr raw_deleter() const override { return &free_block; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  c10::Allocator* base_;
};

// Installs the cache as the CPU allocator once; true when it is the CPU allocator.
bool install() {
  static const bool ok = [] {
    State& s = state();
    c10::Allocator* base = c10::GetCPUAllocator();
    s.base_raw_deleter = base->raw_deleter();
    if (s.base_raw_deleter == nullptr) return false;  // cannot forward foreign raw frees
    pthread_atfork(&lock_for_fork, &unlock_after_fork, &unlock_after_fork);
    static auto* cache = new BlockCacheAllocator(base);
    c10::SetCPUAllocator(cache, /*priority=*/0);
    return c10::GetCPUAllocator() == cache;
  }();
  return ok;
}

}  // namespace

bool cpu_block_cache_enabled() {
  // parsed as flamingo_rt.runtime.cpu_cache.enabled() does: surrounding spaces and case ignored
  const char* s = std::getenv("FLAMINGO_RT_CPU_CACHE");
  if (s == nullptr) return true;
  std::string v(s);
  const auto space = [](unsigned char c) { return std::isspace(c) != 0; };
  v.erase(v.begin(), std::find_if_not(v.begin(), v.end(), space));
  v.erase(std::find_if_not(v.rbegin(), v.rend(), space).base(), v.end());
  std::transform(v.begin(), v.end(), v.begin(), [](unsigned char c) { return char(std::tolower(c)); });
  return v != "0" && v != "off";
}

void cpu_block_cache_enter(bool bounded) {
  if (!install()) return;
  tl_scopes.push_back(bounded ? 1 : 0);
}

void cpu_block_cache_exit() {
  if (!install()) return;
  TORCH_CHECK(!tl_scopes.empty(), "cpu_block_cache_exit: expected an open scope on this thread, found none");
  tl_scopes.pop_back();
}

int cpu_block_cache_depth() { return int(tl_scopes.size()); }

CpuBlockCacheScope::CpuBlockCacheScope(bool bounded) : open_(cpu_block_cache_enabled() && install()) {
  if (open_) tl_scopes.push_back(bounded ? 1 : 0);
}
CpuBlockCacheScope::~CpuBlockCacheScope() {
  if (open_ && !tl_scopes.empty()) tl_scopes.pop_back();
}

CpuBlockCacheStats cpu_block_cache_stats() {
  State& s = state();
  const bool inst = install();
  std::lock_guard<std::mutex> lock(s.mu);
  CpuBlockCacheStats out = s.stats;
  out.installed = inst;
  return out;
}

void cpu_block_cache_empty() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  trim_locked(s, 0);
  s.stats.live_peak_bytes = s.stats.live_bytes;
}

void cpu_block_cache_set_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "cpu_block_cache_set_limit: expected a limit of bytes >= 0, got ", bytes);
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  s.stats.limit_bytes = bytes;
  trim_locked(s, bytes);
}

namespace torch_ops {
namespace {

std::vector<int64_t> stats_impl() {
  const CpuBlockCacheStats st = cpu_block_cache_stats();
  return {st.hits,         st.misses,          st.releases,   st.cached_bytes,
          st.in_use_bytes, st.limit_bytes,     st.installed ? 1 : 0, st.live_bytes,
          st.live_peak_bytes};
}

int64_t depth_impl() { return cpu_block_cache_depth(); }

}  // namespace
}  // namespace torch_ops
}  // namespace flamingo_rt

TORCH_LIBRARY_FRAGMENT(flamingo_rt_C, m) {
  m.def("cpu_block_cache_enter(bool bounded=False) -> ()", &flamingo_rt::cpu_block_cache_enter);
  m.def("cpu_block_cache_exit() -> ()", &flamingo_rt::cpu_block_cache_exit);
  m.def("cpu_block_cache_depth() -> int", &flamingo_rt::torch_ops::depth_impl);
  m.def("cpu_block_cache_stats() -> int[]", &flamingo_rt::torch_ops::stats_impl);
  m.def("cpu_block_cache_empty() -> ()", &flamingo_rt::cpu_block_cache_empty);
  m.def("cpu_block_cache_set_limit(int bytes) -> ()", &flamingo_rt::cpu_block_cache_set_limit);
}
