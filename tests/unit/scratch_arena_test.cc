// The device backends' scratch arena, on host memory: its peak is what one chunk needs for the
// step (the KV cache is sized from it), growth within a step merges into one chunk, and a step
// that fitted before never allocates again.
#include "backend/scratch_arena.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <random>
#include <set>
#include <vector>

namespace ernie::backend {
namespace {

struct HostChunks {
  std::set<void*>* live;
  int* allocations;
  void* allocate(size_t bytes) {
    void* p = std::malloc(bytes);
    live->insert(p);
    ++*allocations;
    return p;
  }
  void release(void* p) {
    live->erase(p);
    std::free(p);
  }
};

constexpr size_t kGrowth = 4096;

// One step as the backends take scratch: allocations, nested marks handed back part-way.
struct Op {
  enum Kind { kAlloc, kMark, kRewind } kind;
  size_t bytes;
};

std::vector<Op> random_step(std::mt19937_64& rng) {
  std::vector<Op> ops;
  int depth = 0;
  for (int i = 0; i < 200; ++i) {
    const int r = static_cast<int>(rng() % 10);
    if (r < 6) {
      ops.push_back({Op::kAlloc, 1 + rng() % 20000});
    } else if (r < 8) {
      ops.push_back({Op::kMark, 0});
      ++depth;
    } else if (depth > 0) {
      ops.push_back({Op::kRewind, 0});
      --depth;
    }
  }
  return ops;
}

// Runs a step; returns what a single chunk must hold for it (the bump offset's high water,
// with the arena's rounding), computed on its own.
size_t run_step(ScratchArena<HostChunks>& arena, const std::vector<Op>& ops) {
  std::vector<ScratchArena<HostChunks>::Mark> marks;
  std::vector<size_t> offsets;
  size_t offset = 0, high = 0;
  for (const Op& op : ops) {
    if (op.kind == Op::kAlloc) {
      auto* p = static_cast<unsigned char*>(arena.alloc(op.bytes));
      p[0] = 0x5a;  // the memory is there
      p[op.bytes - 1] = 0xa5;
      offset += (op.bytes + 255) / 256 * 256;
      high = std::max(high, offset);
    } else if (op.kind == Op::kMark) {
      marks.push_back(arena.mark());
      offsets.push_back(offset);
    } else {
      arena.rewind(marks.back());
      offset = offsets.back();
      marks.pop_back();
      offsets.pop_back();
    }
  }
  return high;
}

TEST(ScratchArenaTest, PeakIsWhatOneChunkNeedsEvenWhenTheFirstStepGrows) {
  std::mt19937_64 rng(std::random_device{}());
  for (int trial = 0; trial < 50; ++trial) {
    std::set<void*> live;
    int allocations = 0;
    {
      ScratchArena<HostChunks> arena(HostChunks{&live, &allocations}, kGrowth);
      const auto step = random_step(rng);
      const size_t need = run_step(arena, step);
      ASSERT_GT(arena.chunk_count(), 1u) << "the first step should have grown the arena";
      EXPECT_EQ(arena.peak(), need);
      EXPECT_GE(arena.capacity(), need);

      bool waited = false;
      arena.reset([&] { waited = true; });
      EXPECT_TRUE(waited) << "merging frees chunks: the device must be idle first";
      ASSERT_EQ(arena.chunk_count(), 1u);
      EXPECT_GE(arena.capacity(), need);
      EXPECT_LE(arena.capacity(), need + need / 8 + (size_t{1} << 20));
      EXPECT_EQ(live.size(), 1u);
      const uint64_t generation = arena.generation();

      // The same step again, and smaller ones, fit without allocating.
      const int before = allocations;
      for (int again = 0; again < 3; ++again) {
        EXPECT_EQ(run_step(arena, step), need);
        arena.reset([&] { ADD_FAILURE() << "nothing to merge: no wait"; });
      }
      std::vector<Op> half(step.begin(), step.begin() + step.size() / 2);
      run_step(arena, half);
      arena.reset([] {});
      EXPECT_EQ(allocations, before);
      EXPECT_EQ(arena.chunk_count(), 1u);
      EXPECT_EQ(arena.generation(), generation);
      EXPECT_EQ(arena.peak(), need);
    }
    EXPECT_TRUE(live.empty()) << "chunks leaked";
  }
}

TEST(ScratchArenaTest, RewindAcrossAGrowthDoesNotInflateThePeak) {
  std::set<void*> live;
  int allocations = 0;
  ScratchArena<HostChunks> arena(HostChunks{&live, &allocations}, kGrowth);
  const auto outer = arena.mark();
  arena.alloc(3000);  // 3072 with rounding: a first chunk of 4096
  arena.alloc(3000);  // does not fit: a second chunk (8192)
  arena.rewind(outer);
  arena.alloc(3000);  // the second chunk's rest
  arena.alloc(3000);  // a third chunk
  // Never more than two pieces were held at once: one chunk of 6144 bytes runs this step.
  EXPECT_EQ(arena.peak(), 2u * 3072);
  EXPECT_EQ(arena.chunk_count(), 3u);
  arena.reset([] {});
  EXPECT_EQ(arena.capacity(), size_t{1} << 20);  // 6144 + 1/8, rounded to a whole MiB
}

}  // namespace
}  // namespace ernie::backend
