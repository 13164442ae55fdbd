// bfloat16 attention of a block of queries against one image's keys and values on Intel AMX
// tiles (internal; not a public header). Used by the image-causal forward (xattn.cpp) when
// the CPU has AMX-BF16, the kernel grants tile data, and FLAMINGO_RT_CPU_AMX is not "0".
//
//   out = softmax(scale * q k^T) v        q: rows x dh, k, v: N x dh, all bfloat16
//
// The products run on the tiles in bfloat16 with float32 accumulation (q and k exact, the
// probabilities rounded to bfloat16 for P V, as a bfloat16 attention under autocast rounds
// them); the softmax is float32 (AVX-512).
#pragma once

#include <cstdint>
#include <vector>

namespace flamingo_rt {
namespace amx {

// The CPU has AMX-TILE and AMX-BF16, the kernel granted this process tile data
// (arch_prctl ARCH_REQ_XCOMP_PERM, asked once), and FLAMINGO_RT_CPU_AMX is not "0" (read
// at every call, so a test can compare both paths in one process).
bool available();

// Head dims the kernel takes: a multiple of 32 (the bfloat16 depth of one tile product).
inline bool fits(int64_t dh) { return dh > 0 && dh % 32 == 0 && dh <= 256; }

// n rows of dh bfloat16 (unit element stride), row i at p + i * ld.
struct Rows {
  const uint16_t* p = nullptr;
  int64_t ld = 0, n = 0;
};

struct ImageAttention {
  const uint16_t* q = nullptr;  // rows x dh, row stride q_ld (elements), unit element stride
  int64_t q_ld = 0, rows = 0;
  Rows k[2], v[2];              // the N keys / values as up to two runs of rows (k[0] first)
  int64_t N = 0, dh = 0;
  float scale = 1.0f;
  uint16_t* out = nullptr;      // rows x dh, row stride out_ld, unit element stride
  int64_t out_ld = 0;
};

// Per-thread buffers, grown on demand and reused across calls.
struct Scratch {
  std::vector<uint32_t> kw, vp;  // keys as 32-bit words transposed; values as interleaved row pairs
  std::vector<float> s, o;       // a block's scores, its unnormalized output
  std::vector<uint16_t> p, q;    // its probabilities in bfloat16; a partial block's queries, padded
  std::vector<float> sum;
};

// One call: every query row of `a` against its N keys (N >= 1). Requires available() and
// fits(a.dh).
void image_attention_bf16(const ImageAttention& a, Scratch& s);

// The backward of one image for one head: every block of query rows that attends to it
// (its output gradient go, its dq rows to write), and the image's dk, dv (all N rows,
// written; zeros when no query attends to it).
//   P = softmax(scale q k^T), dP = go v^T, dS = P (dP - rowsum(P dP)),
//   dq = scale dS k, dk = scale dS^T q, dv = P^T go
struct QueryBlock {
  const uint16_t* q = nullptr;   // rows x dh, row stride q_ld
  const uint16_t* go = nullptr;  // rows x dh, row stride go_ld
  uint16_t* dq = nullptr;        // rows x dh, row stride dq_ld
  int64_t rows = 0;              // <= kMaxBlockRows
};
constexpr int64_t kMaxBlockRows = 128;

struct OutRows {
  uint16_t* p = nullptr;
  int64_t ld = 0, n = 0;
};

struct ImageAttentionBackward {
  const QueryBlock* blocks = nullptr;
  int64_t nblocks = 0, q_ld = 0, go_ld = 0, dq_ld = 0;
  Rows k[2], v[2];        // as ImageAttention
  OutRows dk[2], dv[2];   // the same split as k / v
  int64_t N = 0, dh = 0;
  float scale = 1.0f;
};

struct BackwardScratch {
  std::vector<uint16_t> kr, vr, kt, pt, dst;
  std::vector<uint32_t> qw, dow, qp, dop, dsp;
  std::vector<float> st, dpt, dk, dv, dqt;
};

void image_attention_backward_bf16(const ImageAttentionBackward& a, BackwardScratch& s);

}  // namespace amx
}  // namespace flamingo_rt
