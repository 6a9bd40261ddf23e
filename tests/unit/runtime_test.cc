// Block pool, prefix cache and scheduler invariants under random workloads.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>
#include <set>

#include "common/check.h"
#include "common/rng.h"
#include "runtime/kv_cache.h"
#include "runtime/scheduler.h"

namespace ernie::runtime {
namespace {

TEST(BlockPool, RandomOperationsKeepInvariants) {
  Rng rng(std::random_device{}());
  BlockPool pool(64, true);
  std::vector<std::vector<int32_t>> owners;
  std::map<int32_t, std::vector<int32_t>> contents;
  for (int iter = 0; iter < 5000; ++iter) {
    const uint64_t op = rng.below(4);
    if (op == 0 && pool.num_free() > 0) {
      owners.push_back(pool.allocate(
          1 + static_cast<int64_t>(rng.below(std::min<int64_t>(8, pool.num_free())))));
    } else if (op == 1 && !owners.empty()) {
      const size_t k = rng.below(owners.size());
      std::reverse(owners[k].begin(), owners[k].end());
      pool.release(owners[k]);
      owners.erase(owners.begin() + static_cast<long>(k));
    } else if (op == 2 && !owners.empty()) {
      auto& o = owners[rng.below(owners.size())];
      const int32_t b = o[rng.below(o.size())];
      std::vector<int32_t> toks(4);
      for (auto& t : toks) t = static_cast<int32_t>(rng.below(5));
      pool.cache(b, hash_block(0, toks), 0, toks);
    } else if (op == 3) {
      std::vector<int32_t> toks(4);
      for (auto& t : toks) t = static_cast<int32_t>(rng.below(5));
      if (auto b = pool.lookup(hash_block(0, toks), 0, toks)) {
        pool.take(*b);
        owners.push_back({*b});
      }
    }
    pool.check_invariants();
  }
  for (auto& o : owners) pool.release(o);
  pool.check_invariants();
  EXPECT_EQ(pool.num_free(), 64);
  EXPECT_THROW(pool.release(std::vector<int32_t>{0}), Error);  // double free is caught
}

TEST(KvCacheManager, PrefixHitsAreConfirmedAndEvictedLeastRecentlyUsed) {
  KvCacheManager kv(8, 4, true);
  std::vector<int32_t> a = {1, 2, 3, 4, 5, 6, 7, 8, 9};  // 2 full blocks + 1 token
  BlockTable ta;
  ASSERT_TRUE(kv.allocate(ta, 9, {}));
  kv.cache_full_blocks(ta, a, 9);
  EXPECT_EQ(ta.hashes.size(), 2u);
  kv.free(ta);
  // Same first block, different second block: one block hits.
  std::vector<int32_t> b = {1, 2, 3, 4, 5, 6, 7, 0, 9};
  EXPECT_EQ(kv.cached_prefix(b).size(), 1u);
  // Full match, but the last token is always recomputed: at most (9-1)/4 = 2 blocks.
  EXPECT_EQ(kv.cached_prefix(a).size(), 2u);
  std::vector<int32_t> exact = {1, 2, 3, 4, 5, 6, 7, 8};
  EXPECT_EQ(kv.cached_prefix(exact).size(), 1u);
  EXPECT_EQ(kv.queries(), 9 + 9 + 8);
  EXPECT_EQ(kv.hits(), 4 + 8 + 4);
  // Filling the pool evicts the cached blocks (they were freed first, so they go first).
  BlockTable big;
  ASSERT_TRUE(kv.allocate(big, 32, {}));
  EXPECT_EQ(kv.cached_prefix(a).size(), 0u);
  EXPECT_FALSE(kv.allocate(ta, 4, {}));  // nothing left
  kv.free(big);
  kv.pool().check_invariants();
}

TEST(KvCacheManager, DisabledCachingNeverHits) {
  KvCacheManager kv(8, 4, false);
  std::vector<int32_t> a = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  BlockTable t;
  ASSERT_TRUE(kv.allocate(t, 9, {}));
  kv.cache_full_blocks(t, a, 9);
  kv.free(t);
  EXPECT_TRUE(kv.cached_prefix(a).empty());
}

// A random workload through the scheduler with a fake model: budgets hold, blocks are never
// leaked or shared wrongly, and every request finishes (no starvation or deadlock), with
// preemption forced by a small cache. A third of the sequences ask for prompt logprobs: their
// logits rows stay within their bound and each prompt position is scored once, in order.
TEST(Scheduler, RandomWorkloadsFinishWithinBudgets) {
  int64_t total_preemptions = 0, total_steps = 0;
  for (int trial = 0; trial < 40; ++trial) {
    Rng rng(std::random_device{}());
    const int bs = 1 + static_cast<int>(rng.below(8));
    const int64_t num_blocks = 8 + static_cast<int64_t>(rng.below(40));
    const bool caching = rng.below(2) == 0;
    KvCacheManager kv(num_blocks, bs, caching);
    SchedulerConfig cfg;
    cfg.max_num_seqs = 1 + static_cast<int>(rng.below(6));
    cfg.max_num_batched_tokens = 1 + static_cast<int>(rng.below(40));
    Scheduler sched(cfg, kv);
    std::vector<std::unique_ptr<Sequence>> seqs;
    std::vector<int> targets;
    const int n = 5 + static_cast<int>(rng.below(20));
    const int64_t capacity = num_blocks * bs;
    for (int i = 0; i < n; ++i) {
      auto s = std::make_unique<Sequence>();
      s->arrival = i;
      const bool scored = rng.below(3) == 0;
      const int64_t len =
          1 + static_cast<int64_t>(rng.below(std::min<int64_t>(scored ? 60 : 30, capacity - 1)));
      for (int64_t t = 0; t < len; ++t)
        s->tokens.push_back(static_cast<int32_t>(rng.below(3)));  // shared prefixes likely
      auto params = std::make_shared<SamplingParams>();
      if (scored) params->prompt_logprobs = 1;
      s->params = params;
      s->scores_prompt = scored;
      s->prompt = std::make_shared<const std::vector<int32_t>>(s->tokens);
      targets.push_back(1 + static_cast<int>(rng.below(
                                std::max<int64_t>(1, std::min<int64_t>(20, capacity - len)))));
      sched.add(s.get());
      seqs.push_back(std::move(s));
    }
    int steps = 0;
    size_t done = 0;
    while (done < seqs.size()) {
      ASSERT_LT(++steps, 100000) << "no progress: deadlock or starvation";
      const auto out = sched.schedule();
      ASSERT_FALSE(out.seqs.empty()) << "nothing scheduled while work remains";
      ASSERT_LE(out.num_tokens, cfg.max_num_batched_tokens);
      ASSERT_LE(static_cast<int>(sched.num_running()), cfg.max_num_seqs);
      ASSERT_LE(out.num_prompt_rows, kPromptLogprobRows);
      ASSERT_LE(static_cast<int64_t>(out.seqs.size()) + out.num_prompt_rows,
                cfg.max_num_seqs + kPromptLogprobSlack);
      std::map<int32_t, const Sequence*> writer;
      for (const auto& sc : out.seqs) {
        const Sequence& s = *sc.seq;
        ASSERT_GE(static_cast<int64_t>(s.table.blocks.size()) * bs, sc.start + sc.num_tokens);
        // Blocks written this step belong to exactly one sequence.
        for (int64_t pos = sc.start; pos < sc.start + sc.num_tokens; ++pos) {
          const int32_t b = s.table.blocks[pos / bs];
          auto [it, fresh] = writer.emplace(b, &s);
          ASSERT_TRUE(fresh || it->second == &s) << "two sequences write block " << b;
          ASSERT_EQ(kv.pool().ref_count(b), 1) << "writing a shared block";
        }
      }
      sched.update(out);
      for (const auto& sc : out.seqs) {
        Sequence& s = *sc.seq;
        if (sc.prompt_rows.count > 0) {
          ASSERT_EQ(sc.prompt_rows.first, static_cast<int64_t>(s.prompt_logprobs.size()));
          ASSERT_GE(sc.prompt_rows.first, sc.start);
          ASSERT_LE(sc.prompt_rows.first + sc.prompt_rows.count, sc.start + sc.num_tokens);
          s.prompt_logprobs.resize(s.prompt_logprobs.size() + sc.prompt_rows.count);
        }
        if (!sc.samples) continue;
        // The first token is drawn only once every prompt position was scored.
        ASSERT_FALSE(s.needs_prompt_logprobs());
        const int32_t t = static_cast<int32_t>(rng.below(3));
        s.output.push_back(t);
        s.tokens.push_back(t);
        if (static_cast<int>(s.output.size()) >= targets[s.arrival]) {
          s.finish = FinishReason::kLength;
          sched.remove(&s);
          ++done;
        }
      }
      kv.pool().check_invariants();
    }
    EXPECT_EQ(kv.pool().num_free(), num_blocks) << "blocks leaked";
    EXPECT_EQ(sched.num_running() + sched.num_waiting(), 0u);
    total_preemptions += sched.num_preemptions();
    total_steps += steps;
  }
  // The workloads must actually exercise preemption.
  EXPECT_GT(total_preemptions, 0);
  std::printf("scheduler workloads: %lld steps, %lld preemptions\n",
              static_cast<long long>(total_steps), static_cast<long long>(total_preemptions));
}

}  // namespace
}  // namespace ernie::runtime
