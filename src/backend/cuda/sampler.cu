#include <algorithm>
#include <cfloat>
#include <climits>

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/sampler.cuh"
#include "common/rng.h"

namespace ernie::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;

struct ArgMax {
  float v;
  int i;
};
// Larger value first; the lower index wins ties (std::max_element's rule).
__device__ __forceinline__ bool better(ArgMax a, ArgMax b) {
  return a.v > b.v || (a.v == b.v && a.i < b.i);
}

struct Shared {
  double d[kWarps];
  float f[kWarps];
  ArgMax am[kWarps];
  int hist[256];
  double mass[256];
  int pick;
  int count_above;
  double mass_above;
  int found;
};

__device__ double block_sum(double v, Shared& sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if (threadIdx.x % 32 == 0) sh.d[threadIdx.x / 32] = v;
  __syncthreads();
  v = sh.d[threadIdx.x % 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ float block_max(float v, Shared& sh) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if (threadIdx.x % 32 == 0) sh.f[threadIdx.x / 32] = v;
  __syncthreads();
  v = sh.f[threadIdx.x % 32];
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ ArgMax block_argmax(ArgMax v, Shared& sh) {
  auto warp_reduce = [](ArgMax x) {
    for (int o = 16; o > 0; o >>= 1) {
      const ArgMax y{__shfl_xor_sync(0xffffffffu, x.v, o), __shfl_xor_sync(0xffffffffu, x.i, o)};
      if (better(y, x)) x = y;
    }
    return x;
  };
  v = warp_reduce(v);
  __syncthreads();
  if (threadIdx.x % 32 == 0) sh.am[threadIdx.x / 32] = v;
  __syncthreads();
  return warp_reduce(sh.am[threadIdx.x % 32]);
}

// Exclusive prefix over threads in thread order; `total` gets the sum of all.
__device__ double block_exclusive_scan(double v, Shared& sh, double& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  double x = v;
  for (int o = 1; o < 32; o <<= 1) {
    const double y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  __syncthreads();
  if (lane == 31) sh.d[warp] = x;
  __syncthreads();
  double w = sh.d[lane];
  for (int o = 1; o < 32; o <<= 1) {
    const double y = __shfl_up_sync(0xffffffffu, w, o);
    if (lane >= o) w += y;
  }
  total = __shfl_sync(0xffffffffu, w, 31);
  const double before = warp > 0 ? __shfl_sync(0xffffffffu, w, warp - 1) : 0.0;
  return before + x - v;
}

__device__ __forceinline__ unsigned key_of(float q) {
  return __float_as_uint(q);
}  // q >= 0

// The index of the n-th (1-based) element equal to `bits`, in index order. Threads own
// contiguous chunks so a scan over thread order is an index-order scan.
__device__ int nth_occurrence(const float* q, int vocab, unsigned bits, int n, Shared& sh) {
  const int chunk = (vocab + kThreads - 1) / kThreads;
  const int lo = threadIdx.x * chunk, hi = min(vocab, lo + chunk);
  int cnt = 0;
  for (int i = lo; i < hi; ++i) cnt += key_of(q[i]) == bits;
  double total;
  const int before = static_cast<int>(block_exclusive_scan(cnt, sh, total));
  if (threadIdx.x == 0) sh.found = vocab - 1;
  __syncthreads();
  if (before < n && n <= before + cnt) {
    int seen = before;
    for (int i = lo; i < hi; ++i) {
      if (key_of(q[i]) == bits && ++seen == n) {
        sh.found = i;
        break;
      }
    }
  }
  __syncthreads();
  return sh.found;
}

// Keeps the first n elements of q in (value desc, index asc) order and zeroes the rest.
__device__ void keep_first(float* q, int vocab, int n, Shared& sh) {
  unsigned prefix = 0, mask = 0;
  int remaining = n;
  for (int shift = 24; shift >= 0; shift -= 8) {
    if (threadIdx.x < 256) sh.hist[threadIdx.x] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
      const unsigned k = key_of(q[i]);
      if ((k & mask) == prefix) atomicAdd(&sh.hist[(k >> shift) & 255], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int b = 255;
      for (; b > 0; --b) {
        if (remaining <= sh.hist[b]) break;
        remaining -= sh.hist[b];
      }
      sh.pick = b;
      sh.count_above = remaining;
    }
    __syncthreads();
    prefix |= static_cast<unsigned>(sh.pick) << shift;
    mask |= 255u << shift;
    remaining = sh.count_above;
    __syncthreads();
  }
  const int cut = nth_occurrence(q, vocab, prefix, remaining, sh);
  for (int i = threadIdx.x; i < vocab; i += kThreads) {
    const unsigned k = key_of(q[i]);
    if (!(k > prefix || (k == prefix && i <= cut))) q[i] = 0.0f;
  }
  __syncthreads();
}

// The smallest n such that the first n elements (value desc, index asc) hold >= target mass.
__device__ int count_for_mass(const float* q, int vocab, double target, Shared& sh) {
  unsigned prefix = 0, mask = 0;
  double mass_above = 0.0;
  int count_above = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    if (threadIdx.x < 256) {
      sh.hist[threadIdx.x] = 0;
      sh.mass[threadIdx.x] = 0.0;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
      const unsigned k = key_of(q[i]);
      if ((k & mask) == prefix) {
        atomicAdd(&sh.hist[(k >> shift) & 255], 1);
        atomicAdd(&sh.mass[(k >> shift) & 255], static_cast<double>(q[i]));
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int b = 255;
      for (; b > 0; --b) {
        if (sh.hist[b] > 0 && mass_above + sh.mass[b] >= target) break;
        mass_above += sh.mass[b];
        count_above += sh.hist[b];
      }
      sh.pick = b;
      sh.mass_above = mass_above;
      sh.count_above = count_above;
    }
    __syncthreads();
    prefix |= static_cast<unsigned>(sh.pick) << shift;
    mask |= 255u << shift;
    mass_above = sh.mass_above;
    count_above = sh.count_above;
    __syncthreads();
  }
  // Every element equal to `prefix` weighs v: take just enough of them.
  const double v = __uint_as_float(prefix);
  const int ties = sh.hist[prefix & 255];
  int m = v > 0.0 ? static_cast<int>(ceil((target - mass_above) / v)) : ties;
  m = max(1, min(m, ties));
  return count_above + m;
}

// x[lo, hi) = raw[lo, hi) with the row's edits whose ids fall there, in the CPU reference's
// order: logit bias (in order: an id may be biased more than once), penalties, bans. Every
// thread of the CTA calls it.
__device__ void edited_logits(const float* raw, float* x, int lo, int hi,
                              const DeviceSamplingRow& p, const SamplingTables& tab) {
  for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) x[i] = raw[i];
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int b = p.bias_begin; b < p.bias_end; ++b) {
      const int id = tab.bias_ids[b];
      if (id >= lo && id < hi) x[id] += tab.bias_values[b];
    }
  }
  __syncthreads();
  for (int e = p.pen_begin + threadIdx.x; e < p.pen_end; e += blockDim.x) {
    const int id = tab.pen_ids[e], count = tab.pen_counts[e];
    if (id < lo || id >= hi) continue;
    float v = x[id];
    if (p.repetition_penalty != 1.0f)
      v = v > 0 ? v / p.repetition_penalty : v * p.repetition_penalty;
    if (count > 0) v -= p.frequency_penalty * static_cast<float>(count) + p.presence_penalty;
    x[id] = v;
  }
  __syncthreads();
  for (int b = p.ban_begin + threadIdx.x; b < p.ban_end; b += blockDim.x) {
    const int id = tab.ban_ids[b];
    if (id >= lo && id < hi) x[id] = -INFINITY;
  }
  __syncthreads();
}

// q, the unnormalised probability of one element: exp((v - max) / T) in double, 0 under min_p
// (which keeps q >= min_p * max q = min_p).
__device__ __forceinline__ float probability(float v, float mx, const DeviceSamplingRow& p) {
  double q = v == -INFINITY ? 0.0 : exp((static_cast<double>(v) - mx) / p.temperature);
  if (p.min_p > 0.0f && q < static_cast<double>(p.min_p)) q = 0.0;
  return static_cast<float>(q);
}

__global__ void __launch_bounds__(kThreads)
    sample_kernel(const float* logits, float* work, int vocab, const DeviceSamplingRow* params,
                  SamplingTables tab, SamplingOutput out) {
  __shared__ Shared sh;
  const int row = blockIdx.x;
  const DeviceSamplingRow p = params[row];
  const float* raw = logits + static_cast<size_t>(row) * vocab;
  float* x = work + static_cast<size_t>(row) * vocab;

  edited_logits(raw, x, 0, vocab, p, tab);

  ArgMax best{-INFINITY, INT_MAX};
  for (int i = threadIdx.x; i < vocab; i += kThreads) {
    const ArgMax c{x[i], i};
    if (better(c, best)) best = c;
  }
  const ArgMax top = block_argmax(best, sh);
  int chosen = top.i;

  if (p.temperature >= 1e-5f) {
    const float mx = top.v;
    for (int i = threadIdx.x; i < vocab; i += kThreads) x[i] = probability(x[i], mx, p);
    __syncthreads();
    if (p.top_k > 0 && p.top_k < vocab) keep_first(x, vocab, p.top_k, sh);
    if (p.top_p < 1.0f) {
      double kept = 0.0;
      for (int i = threadIdx.x; i < vocab; i += kThreads) kept += x[i];
      kept = block_sum(kept, sh);
      const int n = count_for_mass(x, vocab, static_cast<double>(p.top_p) * kept, sh);
      keep_first(x, vocab, max(n, 1), sh);
    }
    // The draw, in index order, keyed by (seed, position) as on the CPU.
    const int chunk = (vocab + kThreads - 1) / kThreads;
    const int lo = threadIdx.x * chunk, hi = min(vocab, lo + chunk);
    double part = 0.0;
    for (int i = lo; i < hi; ++i) part += x[i];
    double total;
    const double before = block_exclusive_scan(part, sh, total);
    Rng rng(p.seed ^ (0x9e3779b97f4a7c15ull * static_cast<uint64_t>(p.position + 1)));
    const double u = rng.uniform() * total;
    if (threadIdx.x == 0) sh.found = -1;
    __syncthreads();
    if (total > 0.0 && before <= u && u < before + part) {
      double acc = before;
      for (int i = lo; i < hi; ++i) {
        if (x[i] <= 0.0f) continue;
        acc += x[i];
        if (acc > u) {
          sh.found = i;
          break;
        }
      }
    }
    __syncthreads();
    if (sh.found < 0 && total > 0.0) {  // rounding left u past the end: the last kept token
      int last = -1;
      for (int i = threadIdx.x; i < vocab; i += kThreads) {
        if (x[i] > 0.0f) last = max(last, i);
      }
      for (int o = 16; o > 0; o >>= 1) last = max(last, __shfl_xor_sync(0xffffffffu, last, o));
      __syncthreads();
      if (threadIdx.x % 32 == 0) atomicMax(&sh.found, last);
      __syncthreads();
    }
    if (sh.found >= 0) chosen = sh.found;
  }

  if (threadIdx.x == 0) out.ids[row] = chosen;
  if (p.num_logprobs < 0) return;
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += kThreads) mx = fmaxf(mx, raw[i]);
  mx = block_max(mx, sh);
  double sum = 0.0;
  int higher = 0;
  const float chosen_v = raw[chosen];
  for (int i = threadIdx.x; i < vocab; i += kThreads) {
    sum += exp(static_cast<double>(raw[i]) - mx);
    higher += raw[i] > chosen_v;
  }
  sum = block_sum(sum, sh);
  const double h = block_sum(static_cast<double>(higher), sh);
  const double lse = mx + log(sum);
  if (threadIdx.x == 0) {
    out.logprobs[row] = static_cast<float>(chosen_v - lse);
    out.ranks[row] = 1 + static_cast<int>(h);
  }
  // The top k of the raw logits: k rounds, each the best element after the previous pick.
  ArgMax prev{INFINITY, -1};
  const int k = min(p.num_logprobs, min(out.max_top, vocab));
  for (int r = 0; r < k; ++r) {
    ArgMax b{-INFINITY, INT_MAX};
    for (int i = threadIdx.x; i < vocab; i += kThreads) {
      const ArgMax c{raw[i], i};
      if (better(prev, c) && better(c, b)) b = c;
    }
    b = block_argmax(b, sh);
    if (threadIdx.x == 0) {
      out.top_ids[static_cast<size_t>(row) * out.max_top + r] = b.i;
      out.top_logprobs[static_cast<size_t>(row) * out.max_top + r] = static_cast<float>(b.v - lse);
    }
    prev = b;
  }
}

// ---- The split path: rows spread over several CTAs each ----
//
// For rows without top-k, top-p or logprobs (the defaults of an OpenAI request), where one CTA
// per row leaves the GPU idle and spends most of its time on the double-precision
// probabilities: three kernels, each a row's vocabulary in `chunks` contiguous chunks
// (kMaxSplitChunks at most). prep: the edited logits (bias, penalties, bans, in that order,
// each chunk applying the entries in its range) and each chunk's argmax; probs: the row's max
// from the chunks', then q = exp((v - max) / T) (min_p applied) and each chunk's sum in double;
// draw: the draw keyed by (seed, position) as on the CPU, located first among the chunks' sums,
// then inside the chunk. The same arithmetic as sample_kernel per element; only the order of
// the double sums differs (a draw changes only if it falls within ~1e-16 of a token's edge).
// Lean launches (`lean`) store nothing per element for rows without edits (they read the
// logits themselves) and never store q: the draw recomputes it for its one chunk, so a plain
// row costs two reads of its logits instead of two reads, two writes and two more reads.
constexpr int kMaxSplitChunks = 64, kSplitThreads = 256;

struct SplitScratch {
  ArgMax* am;    // [rows][chunks]
  double* mass;  // [rows][chunks]
  int chunks;
  bool lean;
};

__device__ __forceinline__ void chunk_range(int vocab, int chunks, int c, int& lo, int& hi) {
  const int len = (vocab + chunks - 1) / chunks;
  lo = min(vocab, c * len);
  hi = min(vocab, lo + len);
}

__device__ __forceinline__ bool has_edits(const DeviceSamplingRow& p) {
  return p.bias_end > p.bias_begin || p.pen_end > p.pen_begin || p.ban_end > p.ban_begin;
}

// The row's values after its edits: the logits themselves when a lean launch left them alone.
__device__ __forceinline__ const float* edited_row(const float* logits, const float* work, int row,
                                                   int vocab, const DeviceSamplingRow& p,
                                                   bool lean) {
  return (lean && !has_edits(p) ? logits : work) + static_cast<size_t>(row) * vocab;
}

// A CTA-wide argmax for kSplitThreads threads.
__device__ ArgMax split_argmax(ArgMax v, ArgMax* warps) {
  auto warp_reduce = [](ArgMax x) {
    for (int o = 16; o > 0; o >>= 1) {
      const ArgMax y{__shfl_xor_sync(0xffffffffu, x.v, o), __shfl_xor_sync(0xffffffffu, x.i, o)};
      if (better(y, x)) x = y;
    }
    return x;
  };
  v = warp_reduce(v);
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = v;
  __syncthreads();
  ArgMax r =
      threadIdx.x % 32 < kSplitThreads / 32 ? warps[threadIdx.x % 32] : ArgMax{-INFINITY, INT_MAX};
  r = warp_reduce(r);
  __syncthreads();
  return r;
}

__device__ double split_sum(double v, double* warps) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = v;
  __syncthreads();
  double r = threadIdx.x % 32 < kSplitThreads / 32 ? warps[threadIdx.x % 32] : 0.0;
  for (int o = 16; o > 0; o >>= 1) r += __shfl_xor_sync(0xffffffffu, r, o);
  __syncthreads();
  return r;
}

// Chunk c of a row (values v[lo, hi)): its argmax, stored for the row's later reduction.
__device__ void store_chunk_argmax(const float* v, int lo, int hi, const SplitScratch& scratch,
                                   int row, int c, ArgMax* warps) {
  ArgMax best{-INFINITY, INT_MAX};
  for (int i = lo + threadIdx.x; i < hi; i += kSplitThreads) {
    const ArgMax e{v[i], i};
    if (better(e, best)) best = e;
  }
  best = split_argmax(best, warps);
  if (threadIdx.x == 0) scratch.am[row * scratch.chunks + c] = best;
}

__global__ void __launch_bounds__(kSplitThreads)
    sample_split_prep_kernel(const float* logits, float* work, int vocab,
                             const DeviceSamplingRow* params, SamplingTables tab,
                             SplitScratch scratch) {
  __shared__ ArgMax warps[kSplitThreads / 32];
  const int c = blockIdx.x, row = blockIdx.y;
  const DeviceSamplingRow p = params[row];
  const float* raw = logits + static_cast<size_t>(row) * vocab;
  float* x = work + static_cast<size_t>(row) * vocab;
  int lo, hi;
  chunk_range(vocab, scratch.chunks, c, lo, hi);
  if (!scratch.lean || has_edits(p)) edited_logits(raw, x, lo, hi, p, tab);
  const float* v = edited_row(logits, work, row, vocab, p, scratch.lean);
  store_chunk_argmax(v, lo, hi, scratch, row, c, warps);
}

// The row's argmax from its chunks' (every thread gets it).
__device__ ArgMax row_argmax(const SplitScratch& scratch, int row, ArgMax* warps) {
  ArgMax v{-INFINITY, INT_MAX};
  for (int c = threadIdx.x; c < scratch.chunks; c += kSplitThreads) {
    if (better(scratch.am[row * scratch.chunks + c], v)) v = scratch.am[row * scratch.chunks + c];
  }
  return split_argmax(v, warps);
}

__global__ void __launch_bounds__(kSplitThreads)
    sample_split_probs_kernel(const float* logits, float* work, int vocab,
                              const DeviceSamplingRow* params, SplitScratch scratch) {
  pdl_begin();
  __shared__ ArgMax warps[kSplitThreads / 32];
  __shared__ double dwarps[kSplitThreads / 32];
  const int c = blockIdx.x, row = blockIdx.y;
  const DeviceSamplingRow p = params[row];
  if (p.temperature < 1e-5f) return;  // greedy: the argmax is the token
  const float mx = row_argmax(scratch, row, warps).v;
  const float* v = edited_row(logits, work, row, vocab, p, scratch.lean);
  float* x = work + static_cast<size_t>(row) * vocab;
  int lo, hi;
  chunk_range(vocab, scratch.chunks, c, lo, hi);
  double part = 0.0;
  for (int i = lo + threadIdx.x; i < hi; i += kSplitThreads) {
    const float qf = probability(v[i], mx, p);
    if (!scratch.lean) x[i] = qf;
    part += qf;
  }
  part = split_sum(part, dwarps);
  if (threadIdx.x == 0) scratch.mass[row * scratch.chunks + c] = part;
}

// One CTA per row.
__global__ void __launch_bounds__(kSplitThreads)
    sample_split_draw_kernel(const float* logits, const float* work, int vocab,
                             const DeviceSamplingRow* params, SplitScratch scratch,
                             SamplingOutput out) {
  pdl_begin();
  __shared__ ArgMax warps[kSplitThreads / 32];
  __shared__ double before_chunk[kMaxSplitChunks + 1];
  __shared__ double dw[kSplitThreads / 32];
  __shared__ int found;
  const int row = blockIdx.x, chunks = scratch.chunks;
  const DeviceSamplingRow p = params[row];
  const ArgMax top = row_argmax(scratch, row, warps);
  if (p.temperature < 1e-5f) {
    if (threadIdx.x == 0) out.ids[row] = top.i;
    return;
  }
  if (threadIdx.x == 0) {  // the chunks' masses in order
    double acc = 0.0;
    for (int c = 0; c < chunks; ++c) {
      before_chunk[c] = acc;
      acc += scratch.mass[row * chunks + c];
    }
    before_chunk[chunks] = acc;
    found = -1;
  }
  __syncthreads();
  const double total = before_chunk[chunks];
  Rng rng(p.seed ^ (0x9e3779b97f4a7c15ull * static_cast<uint64_t>(p.position + 1)));
  const double u = rng.uniform() * total;
  // q of element i: stored by a full launch, recomputed from the edited row by a lean one.
  const float* v = scratch.lean ? edited_row(logits, work, row, vocab, p, true)
                                : work + static_cast<size_t>(row) * vocab;
  const float mx = top.v;
  auto q_at = [&](int i) { return scratch.lean ? probability(v[i], mx, p) : v[i]; };
  // The chunk holding u, then the element: each thread a contiguous piece of the chunk.
  int chunk = -1;
  for (int c = 0; c < chunks; ++c) {
    if (total > 0.0 && before_chunk[c] <= u && u < before_chunk[c + 1]) chunk = c;
  }
  if (chunk >= 0) {
    int lo, hi;
    chunk_range(vocab, chunks, chunk, lo, hi);
    const int per = (hi - lo + kSplitThreads - 1) / kSplitThreads;
    const int a = min(hi, lo + static_cast<int>(threadIdx.x) * per), b = min(hi, a + per);
    double part = 0.0;
    for (int i = a; i < b; ++i) part += q_at(i);
    // Exclusive scan of the pieces in thread order.
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    double incl = part;
    for (int o = 1; o < 32; o <<= 1) {
      const double y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    if (lane == 31) dw[warp] = incl;
    __syncthreads();
    double before = before_chunk[chunk] + incl - part;
    for (int w = 0; w < warp; ++w) before += dw[w];
    if (before <= u && u < before + part) {
      double acc = before;
      for (int i = a; i < b; ++i) {
        const float q = q_at(i);
        if (q <= 0.0f) continue;
        acc += q;
        if (acc > u) {
          found = i;
          break;
        }
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    int chosen = found;
    if (chosen < 0 && total > 0.0) {  // rounding left u past the end: the last kept token
      for (int i = vocab - 1; i >= 0 && chosen < 0; --i) {
        if (q_at(i) > 0.0f) chosen = i;
      }
    }
    out.ids[row] = chosen >= 0 ? chosen : top.i;
  }
}

// Greedy rows without edits (greedy_rows): the argmax of one chunk of a row, as
// sample_split_prep_kernel finds it for such a row of a lean launch.
__global__ void __launch_bounds__(kSplitThreads)
    greedy_chunks_kernel(const float* logits, int vocab, SplitScratch scratch) {
  __shared__ ArgMax warps[kSplitThreads / 32];
  const int c = blockIdx.x, row = blockIdx.y;
  const float* v = logits + static_cast<size_t>(row) * vocab;
  int lo, hi;
  chunk_range(vocab, scratch.chunks, c, lo, hi);
  store_chunk_argmax(v, lo, hi, scratch, row, c, warps);
}

// One CTA per row: the best of the row's chunks is its token (sample_split_draw_kernel's
// greedy branch).
__global__ void __launch_bounds__(kSplitThreads)
    greedy_pick_kernel(SplitScratch scratch, int32_t* ids) {
  pdl_begin();
  __shared__ ArgMax warps[kSplitThreads / 32];
  const ArgMax top = row_argmax(scratch, blockIdx.x, warps);
  if (threadIdx.x == 0) ids[blockIdx.x] = top.i;
}

}  // namespace

void greedy_rows(const float* logits, int rows, int vocab, int32_t* ids, void* scratch,
                 cudaStream_t stream) {
  if (rows == 0) return;
  require(vocab > 0, "greedy_rows: empty vocabulary");
  SplitScratch s;
  s.chunks = sample_split_chunks(rows, true);
  s.lean = true;
  s.mass = nullptr;
  s.am = static_cast<ArgMax*>(scratch);
  greedy_chunks_kernel<<<dim3(s.chunks, rows), kSplitThreads, 0, stream>>>(logits, vocab, s);
  launch_pdl(greedy_pick_kernel, rows, kSplitThreads, 0, stream, s, ids);
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

size_t sample_split_scratch_bytes(int rows) {
  return static_cast<size_t>(rows) * kMaxSplitChunks * (sizeof(ArgMax) + sizeof(double));
}

int sample_split_chunks(int rows, bool lean) {
  if (!lean) return kMaxSplitChunks;
  // About 1024 CTAs (a wave of 256-thread CTAs on a large GPU), at least 4 chunks a row.
  return std::clamp(1024 / std::max(rows, 1), 4, kMaxSplitChunks);
}

void sample_rows_split(const float* logits, float* work, int rows, int vocab,
                       const DeviceSamplingRow* params, const SamplingTables& tables,
                       const SamplingOutput& out, void* scratch, bool lean, cudaStream_t stream) {
  if (rows == 0) return;
  require(vocab > 0, "sample_rows_split: empty vocabulary");
  SplitScratch s;
  s.chunks = sample_split_chunks(rows, lean);
  s.lean = lean;
  s.mass = static_cast<double*>(scratch);
  s.am = reinterpret_cast<ArgMax*>(s.mass + static_cast<size_t>(rows) * s.chunks);
  const dim3 grid(s.chunks, rows);
  sample_split_prep_kernel<<<grid, kSplitThreads, 0, stream>>>(logits, work, vocab, params, tables,
                                                               s);
  launch_pdl(sample_split_probs_kernel, grid, kSplitThreads, 0, stream, logits, work, vocab, params,
             s);
  launch_pdl(sample_split_draw_kernel, rows, kSplitThreads, 0, stream, logits,
             static_cast<const float*>(work), vocab, params, s, out);
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

void sample_rows(const float* logits, float* work, int rows, int vocab,
                 const DeviceSamplingRow* params, const SamplingTables& tables,
                 const SamplingOutput& out, cudaStream_t stream) {
  if (rows == 0) return;
  require(vocab > 0, "sample_rows: empty vocabulary");
  sample_kernel<<<rows, kThreads, 0, stream>>>(logits, work, vocab, params, tables, out);
  ERNIE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace ernie::cuda
