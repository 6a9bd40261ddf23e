// Host-side planning for the CUDA kernels (runs without a GPU): the attention tile plan covers
// every query row once (paired prefill tiles: each sequence's tiles padded to an even count),
// key splits cover every key, a graph plan depends only on the batch shape; the MoE layout has
// room for any routing.
#include <gtest/gtest.h>

#include <algorithm>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "backend/cuda/attention.cuh"
#include "backend/cuda/moe.cuh"
#include "common/rng.h"

namespace ernie::cuda {
namespace {

TEST(AttentionPlan, TilesCoverRowsAndSplitsCoverKeys) {
  Rng rng(std::random_device{}());
  for (int trial = 0; trial < 500; ++trial) {
    const int kv = 1 << rng.below(4), group = 1 + static_cast<int>(rng.below(16));
    const int heads = kv * group, sms = 132;
    const int seqs = 1 + static_cast<int>(rng.below(300));
    const bool decode = rng.below(2) == 0, fixed = decode && rng.below(2) == 0;
    const bool pair = rng.below(2) == 0;
    std::vector<int32_t> qs = {0}, ctx;
    int max_ctx = 0;
    for (int s = 0; s < seqs; ++s) {
      const int q = decode ? 1 : 1 + static_cast<int>(rng.below(200));
      const int c = q + static_cast<int>(rng.below(rng.below(2) ? 20000 : 300));
      qs.push_back(qs.back() + q);
      ctx.push_back(c);
      max_ctx = std::max(max_ctx, c);
    }
    SCOPED_TRACE(::testing::Message()
                 << seqs << " seqs, " << heads << "/" << kv << " heads, "
                 << (fixed ? "fixed" : "eager") << (pair ? ", paired" : "") << " trial " << trial);
    const AttentionPlan p = plan_attention(qs, ctx, heads, kv, sms, fixed, pair);
    bool small = true;
    for (int s = 0; s < seqs; ++s) small &= (qs[s + 1] - qs[s]) * group <= 16;
    EXPECT_EQ(p.decode_shape, small);
    EXPECT_EQ(p.paired, pair && !small);
    const int bm = p.decode_shape ? kAttentionDecodeRows : kAttentionPrefillRows;
    // Tiles: for each sequence, rows 0, bm, 2 bm, ... (paired: one more past the rows when the
    // count is odd), nothing else. Graph plans list them in that order; the others list the
    // CTAs (a tile, or a pair of tiles 2 bm i, 2 bm i + bm of one sequence) by the keys they
    // read, most first.
    std::vector<std::pair<int32_t, int32_t>> want, got;
    for (int s = 0; s < seqs; ++s) {
      const int rows = (qs[s + 1] - qs[s]) * group;
      int n = (rows + bm - 1) / bm;
      if (p.paired) n += n % 2;
      for (int i = 0; i < n; ++i) want.emplace_back(s, i * bm);
    }
    ASSERT_EQ(p.tile_seq.size(), p.tile_row0.size());
    for (size_t t = 0; t < p.tile_seq.size(); ++t) got.emplace_back(p.tile_seq[t], p.tile_row0[t]);
    if (fixed) {
      ASSERT_EQ(got, want);
    } else {
      const int unit = p.paired ? 2 : 1;
      ASSERT_EQ(got.size() % unit, 0u);
      int prev_keys = std::numeric_limits<int>::max();
      for (size_t t = 0; t < got.size(); t += unit) {
        const auto [s, r] = got[t];
        if (p.paired) {
          ASSERT_EQ(r % (2 * bm), 0);
          ASSERT_EQ(got[t + 1], std::make_pair(s, r + bm));
        }
        const int q = qs[s + 1] - qs[s];
        const int last_row = std::min(r + unit * bm, q * group) - 1;
        const int keys = ctx[s] - q + last_row / group + 1;
        ASSERT_LE(keys, prev_keys) << "CTA " << t / unit;
        prev_keys = keys;
      }
      std::sort(got.begin(), got.end());
      ASSERT_EQ(got, want);
    }
    ASSERT_GE(p.splits, 1);
    EXPECT_LE(p.splits, 64);
    EXPECT_EQ(p.split_keys % 64, 0);
    if (p.splits > 1) {
      EXPECT_GE(static_cast<int64_t>(p.splits) * p.split_keys, max_ctx);
      // Only when the tiles (CTAs) leave the GPU idle.
      EXPECT_LT(static_cast<int64_t>(p.tile_seq.size()) / (p.paired ? 2 : 1) * kv, sms);
      if (!fixed) {
        EXPECT_LT(static_cast<int64_t>(p.splits - 1) * p.split_keys, max_ctx);
      }
    }
    if (fixed) {  // the same shape with other contexts keeps the split count
      std::vector<int32_t> other = ctx;
      for (auto& c : other) c = 1 + static_cast<int>(rng.below(30000));
      const AttentionPlan o = plan_attention(qs, other, heads, kv, sms, true);
      EXPECT_EQ(o.splits, p.splits);
      EXPECT_EQ(o.tile_seq, p.tile_seq);
      const int other_max = *std::max_element(other.begin(), other.end());
      EXPECT_GE(static_cast<int64_t>(o.splits) * o.split_keys, other_max);
    }
  }
}

TEST(MoeLayout, CapacityHoldsAnyRouting) {
  Rng rng(17);
  for (int block_m : {kMoeBlockSmall, kMoeBlockMid, kMoeBlockWgmma}) {
    for (int64_t pairs : {1, 2, 6, 7, 96, 161, 1000, 49152}) {
      for (int experts : {8, 64, 160}) {
        const int64_t cap = moe_capacity(pairs, experts, block_m);
        EXPECT_EQ(cap % block_m, 0);
        // Rows the align kernel lays out: each expert's count rounded up to whole blocks, for
        // random routings and for the worst one (the pairs spread so every expert pads).
        for (int trial = 0; trial < 20; ++trial) {
          std::vector<int64_t> count(experts, 0);
          for (int64_t p = 0; p < pairs; ++p) {
            ++count[trial == 0 ? p % experts : static_cast<int>(rng.below(experts))];
          }
          int64_t rows = 0;
          for (int64_t n : count) rows += (n + block_m - 1) / block_m * block_m;
          EXPECT_LE(rows, cap) << pairs << " pairs, " << experts << " experts, block " << block_m;
        }
      }
    }
  }
  // One token of the 21B model (top-6 of 64): at most six experts pad, six 16-row blocks.
  EXPECT_EQ(moe_capacity(6, 64, kMoeBlockSmall), 6 * kMoeBlockSmall);
  // Decode batches of the 21B model (64 experts, top-6) up to ~85 sequences take the 16-row
  // blocks, up to ~340 the 32-row blocks, larger batches and prefill chunks the wgmma tiles.
  EXPECT_EQ(moe_block_m(16 * 6, 64), kMoeBlockSmall);
  EXPECT_EQ(moe_block_m(64 * 6, 64), kMoeBlockSmall);
  EXPECT_EQ(moe_block_m(128 * 6, 64), kMoeBlockMid);
  EXPECT_EQ(moe_block_m(256 * 6, 64), kMoeBlockMid);
  EXPECT_EQ(moe_block_m(512 * 6, 64), kMoeBlockWgmma);
  EXPECT_EQ(moe_block_m(8192 * 6, 64), kMoeBlockWgmma);
}

}  // namespace
}  // namespace ernie::cuda
