// A cache of large CPU memory blocks for the tensors that flamingo_rt's hot paths allocate.
//
// PyTorch allocates CPU tensors with the C library's malloc, and glibc serves each large
// block (above its mmap threshold: 128 KiB to start, at most 32 MiB) with a fresh mmap that
// it unmaps again on free. Every large tensor then takes one page fault per 4 KiB on first
// touch: a frozen NFNet-F0 forward at batch 4 faults 12-14 thousand pages (~50 MiB) per call
// and runs 9-13% slower than it does on memory that stays mapped (bench/results/MEASUREMENTS.md,
// 2026-12-05 (r)). The CUDA caching allocator solves this on GPUs; this is the same idea for
// the CPU, scoped so that it changes nothing for code outside flamingo_rt:
//
//   * On first use, an at::Allocator is installed as the process's CPU allocator. Outside a
//     scope it forwards every call to the allocator it replaced (same blocks, same deleters).
//   * Inside a CpuBlockCacheScope (thread-local, nestable), blocks of at least kMinBlockBytes
//     come from a free list of blocks that stay mapped (best fit, at most twice the size
//     asked), else from c10::alloc_cpu (64-byte aligned, at staggered offsets within the
//     first page). Freeing such a block -- on any thread, in or out of a scope -- puts it back
//     on the free list, or releases it when the free list would exceed the limit (default
//     2 GiB; FLAMINGO_RT_CPU_CACHE_MIB).
//   * In a bounded scope (the innermost scope decides) a new block is mapped only after
//     releasing cached blocks (largest first) so that the cache's footprint -- blocks in use
//     plus the free list -- stays within the peak of live bytes its tensors have asked for
//     (since the last cpu_block_cache_empty()), and a cached block serves requests at most an
//     eighth smaller than itself: the cache then holds about what plain malloc would at its
//     peak, and only blocks that fit within that are kept for reuse (a training step's
//     first-touch page faults, without raising its peak).
//   * raw_allocate / raw_deallocate (oneDNN's scratchpads go through them) work for blocks of
//     either origin: a pointer the cache does not own goes to the replaced allocator's deleter.
//
// Memory held on the free list stays with the process until cpu_block_cache_empty(). Cached
// blocks are not reported to the profiler's memory tracking (profile_memory=True). All
// functions are thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>

namespace flamingo_rt {

// Blocks smaller than this come from malloc as usual (glibc's initial mmap threshold: its heap
// serves them without page faults once warm).
constexpr std::size_t kMinBlockBytes = std::size_t(128) << 10;

struct CpuBlockCacheStats {
  int64_t hits = 0;          // allocations served from the free list
  int64_t misses = 0;        // allocations that mapped a new block
  int64_t releases = 0;      // freed blocks released because the free list was full
  int64_t cached_bytes = 0;  // bytes on the free list
  int64_t in_use_bytes = 0;  // bytes of the cache's blocks held by live tensors
  int64_t limit_bytes = 0;   // the free list's limit
  bool installed = false;    // the cache is the process's CPU allocator
  int64_t live_bytes = 0;       // bytes live tensors asked of the cache's blocks
  int64_t live_peak_bytes = 0;  // the peak of live_bytes since the last cpu_block_cache_empty()
};

// While an object of this class lives, large CPU allocations of this thread come from the
// cache (installing it on first use). Without effect where another allocator of higher
// priority is installed (stats().installed says so) or FLAMINGO_RT_CPU_CACHE is 0 / off.
class CpuBlockCacheScope {
 public:
  explicit CpuBlockCacheScope(bool bounded = false);
  ~CpuBlockCacheScope();
  CpuBlockCacheScope(const CpuBlockCacheScope&) = delete;
  CpuBlockCacheScope& operator=(const CpuBlockCacheScope&) = delete;

 private:
  bool open_;
};

// FLAMINGO_RT_CPU_CACHE is not 0 / off (what CpuBlockCacheScope checks; the explicit
// enter / exit below do not).
bool cpu_block_cache_enabled();

// Enter / leave a scope explicitly (what CpuBlockCacheScope does); exit without a matching
// enter throws.
void cpu_block_cache_enter(bool bounded = false);
void cpu_block_cache_exit();
// Scopes open on the calling thread.
int cpu_block_cache_depth();
CpuBlockCacheStats cpu_block_cache_stats();
// Releases every block on the free list (blocks held by live tensors return to the free
// list when freed, as usual) and restarts the peak of live bytes from the bytes live now.
void cpu_block_cache_empty();
// Sets the free list's limit in bytes (>= 0; 0 keeps nothing), releasing blocks above it.
void cpu_block_cache_set_limit(int64_t bytes);

}  // namespace flamingo_rt
