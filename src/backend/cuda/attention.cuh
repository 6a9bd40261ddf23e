// Paged attention over the bf16 KV cache for any mix of prefill chunks and decodes.
//
// The query rows of one KV head are (token, head-in-group) pairs, so the query heads that share
// a KV head form the M side of one tensor-core tile and every K/V byte is loaded once per tile.
// Long contexts with few tiles are split over the key range (flash-decoding): each split writes
// a partial output and its log-sum-exp, and a combine kernel merges them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace ernie::cuda {

// Query rows per tile: decode-shaped steps (every sequence <= 16 rows) and the rest.
constexpr int kAttentionDecodeRows = 16, kAttentionPrefillRows = 64;

// Host-side partition of a step's attention work; computed before the step.
struct AttentionPlan {
  std::vector<int32_t> tile_seq;   // sequence of each query tile
  std::vector<int32_t> tile_row0;  // first query row ((token - first) * group + head) of the tile
  int splits = 1;                  // key-range splits per tile
  int split_keys = 0;              // keys per split (multiple of 64; all keys when splits == 1)
  bool decode_shape = false;       // every sequence has <= 16 query rows: 16-row tiles
  bool paired = false;             // prefill tiles in pairs of one sequence (see plan_attention)
};

// query_start [S+1], context_lens [S] as in the step; `sms` = multiprocessor count.
// fixed_splits: the split count depends only on the number of tiles (a graph replays it for
// any context lengths; only split_keys changes, and it is read from device memory).
// pair_prefill (see prefill_tiles_paired): a prefill-shaped step gives every sequence an even
// number of tiles (the last one may hold no rows), and tiles 2i and 2i + 1 go to one CTA.
// Without fixed_splits the CTAs (tiles, or pairs) are listed by the keys they read, most first.
// min_split_keys (rounded up to whole 64-key tiles): the fewest keys a split takes; a graph plan
// keeps its split count, so fewer of its splits then hold keys (the others leave at once).
AttentionPlan plan_attention(const std::vector<int32_t>& query_start,
                             const std::vector<int32_t>& context_lens, int heads, int kv_heads,
                             int sms, bool fixed_splits = false, bool pair_prefill = false,
                             int min_split_keys = 64);

// Whether prefill tiles of this head size and cache block size run two to a CTA (the TMA kernel
// for head_dim 128 and power-of-two blocks of 8-64 keys): plan them with pair_prefill.
bool prefill_tiles_paired(int head_dim, int block_size);

struct PagedAttentionArgs {
  const __nv_bfloat16* qkv = nullptr;      // [T, (H + 2 KV) * D]; q already rotated
  __nv_bfloat16* out = nullptr;            // [T, H * D]
  const __nv_bfloat16* k_cache = nullptr;  // [slots, KV, D]
  const __nv_bfloat16* v_cache = nullptr;  // [slots, KV, D]
  const int32_t* positions = nullptr;      // [T]: key j is visible to a token iff j <= position
  const int32_t* query_start = nullptr;    // [S + 1]
  const int32_t* context_lens = nullptr;   // [S]
  const int32_t* block_tables = nullptr;   // [S, dims[1]]
  const int32_t* dims = nullptr;           // device {split_keys, block table row stride}
  const int32_t* tile_seq = nullptr;       // [num_tiles]
  const int32_t* tile_row0 = nullptr;      // [num_tiles]
  float* partial_o = nullptr;              // [splits, T, H, D] when splits > 1
  float* partial_lse = nullptr;            // [splits, T, H] when splits > 1
  int num_tiles = 0, tokens = 0, heads = 0, kv_heads = 0, head_dim = 0;
  int block_size = 0;
  int block_shift = -1;     // log2(block_size) when it is a power of two (set by paged_attention)
  int64_t cache_slots = 0;  // rows of k_cache / v_cache (lets prefill tiles load by TMA)
  int splits = 1;
  bool decode_shape = false;
  bool paired = false;  // AttentionPlan::paired
  // Decode kernel only: the grid is (kv_heads, num_tiles, splits) instead of (num_tiles,
  // kv_heads, splits), a tile's KV heads in consecutive CTAs (set by paged_attention).
  bool heads_inner = false;
  float scale = 1.0f;
};

// head_dim in {32, 48, 64, 128}.
void paged_attention(const PagedAttentionArgs& args, cudaStream_t stream);

}  // namespace ernie::cuda
