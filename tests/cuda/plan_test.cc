// Host-side planning for the CUDA kernels (runs without a GPU): the attention tile plan covers
// every query row once (paired prefill tiles: each sequence's tiles padded to an even count),
// key splits cover every key, a graph plan depends only on the batch shape; the MoE layout has
// room for any routing; the tiled expert weight layout is what the MoE kernels' copies assume.
#include <gtest/gtest.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "backend/cuda/attention.cuh"
#include "backend/cuda/expert_layout.h"
#include "backend/cuda/moe.cuh"
#include "backend/cuda/switches.h"
#include "common/check.h"
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
    const int min_keys = rng.below(2) ? 64 : static_cast<int>(1 + rng.below(1000));
    SCOPED_TRACE(::testing::Message() << seqs << " seqs, " << heads << "/" << kv << " heads, "
                                      << (fixed ? "fixed" : "eager") << (pair ? ", paired" : "")
                                      << ", splits of >= " << min_keys << " keys, trial " << trial);
    const AttentionPlan p = plan_attention(qs, ctx, heads, kv, sms, fixed, pair, min_keys);
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
    EXPECT_GE(p.split_keys, min_keys);
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
      const AttentionPlan o = plan_attention(qs, other, heads, kv, sms, true, false, min_keys);
      EXPECT_EQ(o.splits, p.splits);
      EXPECT_EQ(o.tile_seq, p.tile_seq);
      const int other_max = *std::max_element(other.begin(), other.end());
      EXPECT_GE(static_cast<int64_t>(o.splits) * o.split_keys, other_max);
    }
  }
}

TEST(MoeLayout, CapacityHoldsAnyRouting) {
  Rng rng(17);
  for (int block_m : {kMoeBlockSmall, kMoeBlockMid, kMoeBlockWide, kMoeBlockWgmma, kMoeBlockTall}) {
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
  // blocks, up to ~340 the 32-row blocks, up to ~680 the 64-row ones (the wgmma tiles with
  // ERNIE_MOE_WIDE_SWAP=0), larger batches and prefill chunks the wgmma tiles (256-row blocks
  // with ERNIE_WG_TALL=1).
  const int wgmma = moe_tall_enabled() ? kMoeBlockTall : kMoeBlockWgmma;
  EXPECT_EQ(moe_block_m(16 * 6, 64), kMoeBlockSmall);
  EXPECT_EQ(moe_block_m(64 * 6, 64), kMoeBlockSmall);
  EXPECT_EQ(moe_block_m(128 * 6, 64), kMoeBlockMid);
  EXPECT_EQ(moe_block_m(256 * 6, 64), kMoeBlockMid);
  EXPECT_EQ(moe_block_m(512 * 6, 64), moe_wide_swap_enabled() ? kMoeBlockWide : wgmma);
  EXPECT_EQ(moe_block_m(683 * 6, 64), wgmma);
  EXPECT_EQ(moe_block_m(8192 * 6, 64), wgmma);
  for (int block_m : {kMoeBlockWgmma, kMoeBlockTall}) EXPECT_TRUE(moe_wgmma_block(block_m));
  for (int block_m : {kMoeBlockSmall, kMoeBlockMid, kMoeBlockWide}) {
    EXPECT_FALSE(moe_wgmma_block(block_m));
  }
}

// Paired 32-row blocks (ERNIE_MOE_PAIR_BLOCKS): over layouts of contiguous runs of each
// expert's blocks, in any expert order and with padding blocks after them, pair_role has every
// used block computed exactly once (alone, or by the lead of its pair), no padding block
// computed, and a lead exactly for each expert of two blocks (33-64 pairs).
TEST(MoeLayout, PairedBlocksComputeEveryBlockOnce) {
  Rng rng(std::random_device{}());
  for (int trial = 0; trial < 2000; ++trial) {
    const int experts = std::vector<int>{1, 2, 3, 8, 64, 160}[rng.below(6)];
    // Pairs an expert: around a random mean, every one 33-64 in some trials, skewed in others.
    const int mean = static_cast<int>(rng.below(80));
    std::vector<int> count(experts);
    for (int& n : count) {
      switch (trial % 4) {
        case 0:
          n = 33 + static_cast<int>(rng.below(32));
          break;
        case 1:
          n = static_cast<int>(rng.below(2 * mean + 1));
          break;
        case 2:
          n = rng.below(4) == 0 ? static_cast<int>(rng.below(200)) : mean;
          break;
        default:
          n = std::vector<int>{0, 20, 40, 70, 100}[rng.below(5)];
          break;
      }
    }
    std::vector<int> order(experts);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), std::mt19937(static_cast<unsigned>(rng.next())));
    std::vector<int> block_expert;
    int64_t pairs = 0;
    int two_block_experts = 0;
    for (int e : order) {
      const int blocks = (count[e] + kMoeBlockMid - 1) / kMoeBlockMid;
      block_expert.insert(block_expert.end(), blocks, e);
      pairs += count[e];
      two_block_experts += blocks == 2;
    }
    const size_t used = block_expert.size();
    const int64_t cap = moe_capacity(pairs, experts, kMoeBlockMid);
    ASSERT_LE(static_cast<int64_t>(used) * kMoeBlockMid, cap);
    block_expert.resize(static_cast<size_t>(cap / kMoeBlockMid), -1);
    const int n = static_cast<int>(block_expert.size());
    const auto at = [&](int b) { return b >= 0 && b < n ? block_expert[b] : -1; };
    std::vector<int> computed(n, 0);
    int leads = 0;
    for (int b = 0; b < n; ++b) {
      const PairRole role = pair_role(at(b - 2), at(b - 1), at(b), at(b + 1), at(b + 2));
      if (at(b) < 0) {
        ASSERT_EQ(role, kPairAlone) << "padding block " << b;
        continue;  // the kernel leaves
      }
      if (role == kPairFollower) continue;
      ++computed[b];
      if (role == kPairLead) {
        ASSERT_LT(b + 1, n);
        ASSERT_EQ(at(b + 1), at(b)) << "lead block " << b;
        ++computed[b + 1];
        ++leads;
      }
    }
    for (int b = 0; b < n; ++b) {
      ASSERT_EQ(computed[b], static_cast<size_t>(b) < used ? 1 : 0) << "block " << b;
    }
    ASSERT_EQ(leads, two_block_experts) << "trial " << trial;
  }
}

// Paired blocks where they pay (moe_pair_blocks): the 32-row blocks from kMoePairMinAverage
// pairs an expert on average, for the 21B model (64 experts, top-6) from 214 tokens to the
// 32-row blocks' last size; never other block sizes, nor with the switches off.
TEST(MoeLayout, PairedBlocksFromTwentyPairsAnExpert) {
  const bool on = path_enabled("ERNIE_MOE_PAIR_BLOCKS") && path_enabled("ERNIE_MOE_SWAP_AB");
  const auto paired = [](int tokens) {
    const int64_t pairs = int64_t{tokens} * 6;
    return moe_pair_blocks(pairs, 64, moe_block_m(pairs, 64));
  };
  for (int tokens : {1, 8, 86, 128, 192, 213, 342, 512, 8192}) {
    EXPECT_FALSE(paired(tokens)) << tokens << " tokens";
  }
  for (int tokens : {214, 256, 320, 341}) EXPECT_EQ(paired(tokens), on) << tokens << " tokens";
  for (int block_m : {kMoeBlockSmall, kMoeBlockWide, kMoeBlockWgmma, kMoeBlockTall}) {
    EXPECT_FALSE(moe_pair_blocks(300 * 6, 64, block_m)) << "blocks of " << block_m;
  }
}

// Paired blocks asked of the GEMMs for blocks other than 32 rows are refused with an error
// that says so, before anything runs on a device. It runs where there is no device (CI): there
// a call that slipped through fails at its first CUDA call instead of launching on null
// pointers.
TEST(MoeLayout, PairedBlocksOfOtherSizesAreRefused) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0) {
    GTEST_SKIP() << "checked on machines without a device";
  }
  const int tokens = 300, k = 6, hidden = 256, inter = 128, experts = 8;
  for (int block_m : {kMoeBlockSmall, kMoeBlockWide, kMoeBlockWgmma, kMoeBlockTall}) {
    const int64_t cap = moe_capacity(int64_t{tokens} * k, experts, block_m);
    for (bool gate_up : {true, false}) {
      SCOPED_TRACE(::testing::Message()
                   << "blocks of " << block_m << (gate_up ? ", gate/up" : ", down"));
      try {
        if (gate_up) {
          moe_gate_up(nullptr, nullptr, nullptr, nullptr, nullptr, cap, block_m, k, hidden, inter,
                      experts, nullptr, SharedFold{}, nullptr, MoeSwapForm{.pair_blocks = true});
        } else {
          moe_down(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, cap, block_m, hidden,
                   inter, experts, nullptr, SharedFold{}, nullptr,
                   MoeSwapForm{.pair_blocks = true});
        }
        ADD_FAILURE() << "not refused";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("paired blocks"), std::string::npos) << e.what();
      }
    }
  }
}

// Every (row, col) of a tiled matrix has its own element, the padding columns included, and
// nothing lies outside rows x tiled_cols(K).
TEST(ExpertLayout, EveryElementHasOnePlace) {
  for (const int64_t k : {8, 96, 104, 128, 160, 1536, 2560}) {
    const int64_t rows = 48, kp = tiled_cols(k);
    ASSERT_EQ(kp % 128, 0);
    ASSERT_GE(kp, k);
    ASSERT_LT(kp - k, 128);
    std::vector<int> hits(static_cast<size_t>(rows * kp), 0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < kp; ++c) {
        const int64_t o = tiled_offset(r, c, kp);
        ASSERT_GE(o, 0);
        ASSERT_LT(o, rows * kp);
        ++hits[static_cast<size_t>(o)];
      }
    }
    EXPECT_EQ(std::count(hits.begin(), hits.end(), 1), rows * kp) << "K " << k;
  }
}

// What a decode stage copies: 128 columns (stage kt) of a 16-row group are the 2048 elements
// from group * 16 * kp + kt * 2048 on, and land in shared memory as two 64-column chunks of 16
// rows x 128 bytes with the 16-byte pieces of row r at p ^ (r % 8), which is where the decode
// kernel reads them.
TEST(ExpertLayout, DecodeStageIsOneContiguousCopy) {
  for (const int64_t k : {160, 1536, 2560}) {
    const int64_t kp = tiled_cols(k);
    for (int64_t group = 0; group < 3; ++group) {
      for (int64_t kt = 0; kt < kp / 128; ++kt) {
        const int64_t base = group * 16 * kp + kt * 2048;
        for (int64_t r = 0; r < 16; ++r) {
          for (int64_t c = 0; c < 128; ++c) {
            const int64_t at = tiled_offset(group * 16 + r, kt * 128 + c, kp) - base;
            const int64_t chunk = c / 64, piece = (c % 64) / 8;
            ASSERT_EQ(at, chunk * 1024 + r * 64 + ((piece ^ (r % 8)) * 8) + c % 8)
                << "K " << k << " group " << group << " stage " << kt << " (" << r << ", " << c
                << ")";
          }
        }
      }
    }
  }
}

// What a prefill box copies: the 4-D tensor map (column, row in group, chunk, group) over the
// packed layout with a box of 64 columns x 16 rows x 1 chunk x G groups puts element (row, col)
// of chunk col / 64 at box position ((group - group0) * 16 + row % 16) * 64 + column, where
// "column" is the element's place inside its 64-column row of the layout. That must be the
// position TMA's 128-byte swizzle gives row R = row - 16 group0 of a row-major box, which the
// wgmma descriptors read.
// Boxes of 4 groups (the 128-row GEMMs), 6 (the tall form's gate and up rows) and 12 (its down
// rows).
TEST(ExpertLayout, PrefillBoxIsASwizzledTile) {
  const int64_t k = 2560, kp = tiled_cols(k), chunks = kp / 64;
  for (const int64_t groups : {4, 6, 12}) {
    for (const int64_t group0 : {0, 4, 9, 102}) {
      for (int64_t chunk = 0; chunk < chunks; chunk += 7) {
        for (int64_t row = group0 * 16; row < (group0 + groups) * 16; ++row) {
          for (int64_t c = 0; c < 64; ++c) {
            const int64_t o = tiled_offset(row, chunk * 64 + c, kp);
            // The packed 4-D coordinates of offset o.
            const int64_t col_in = o % 64, r_in = (o / 64) % 16, ch = (o / 1024) % chunks,
                          grp = o / (1024 * chunks);
            ASSERT_EQ(ch, chunk);
            const int64_t box_pos = ((grp - group0) * 16 + r_in) * 64 + col_in;
            const int64_t R = row - group0 * 16;
            ASSERT_EQ(box_pos, R * 64 + (((c / 8) ^ (R % 8)) * 8) + c % 8)
                << groups << " groups from " << group0 << ", chunk " << chunk << " row " << row
                << " col " << c;
            // The activation stages the GEMMs gather or load by TMA use the same places.
            ASSERT_EQ(
                2 * box_pos,
                stage_piece_offset(static_cast<int>(R), static_cast<int>(c / 8)) + 2 * (c % 8));
          }
        }
      }
    }
  }
}

// The gate/up producer's copies of a stage (stage_gather_row, stage_first_piece) for the
// 128-row GEMMs (one piece a row and thread) and the tall form (256 rows, two pieces): every
// piece of every row of the stage is copied exactly once, and a thread's second piece of a row
// lies at its first one's offset ^ 16, as gather_producer stores it.
TEST(ExpertLayout, GatherCopiesEveryPieceOfAStageOnce) {
  for (const auto [bm, pieces] : {std::pair{128, 1}, std::pair{256, 2}}) {
    std::vector<int> hits(static_cast<size_t>(bm) * 8, 0), bytes(static_cast<size_t>(bm) * 8, 0);
    for (int warp = 0; warp < 4; ++warp) {
      for (int lane = 0; lane < 32; ++lane) {
        const int p0 = stage_first_piece(pieces, lane);
        for (int i = 0; i < bm / 16 / pieces; ++i) {
          const int r = stage_gather_row(bm, pieces, warp, lane, i);
          ASSERT_GE(r, 0);
          ASSERT_LT(r, bm);
          for (int j = 0; j < pieces; ++j) {
            ++hits[static_cast<size_t>(r) * 8 + p0 + j];
            ASSERT_EQ(stage_piece_offset(r, p0 + j), stage_piece_offset(r, p0) ^ (j << 4))
                << "row " << r << " piece " << p0 + j;
            const int o = stage_piece_offset(r, p0 + j);
            ASSERT_EQ(o % 16, 0);
            ASSERT_LT(o, bm * 128);
            ++bytes[static_cast<size_t>(o / 16)];
          }
        }
      }
    }
    EXPECT_EQ(std::count(hits.begin(), hits.end(), 1), bm * 8) << bm << " rows";
    EXPECT_EQ(std::count(bytes.begin(), bytes.end(), 1), bm * 8) << bm << " rows";
  }
}

}  // namespace
}  // namespace ernie::cuda
