// The engine end to end on a small synthetic model with its tokenizer.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <random>

#include "common/check.h"
#include "common/rng.h"
#include "runtime/engine.h"
#include "server/async_engine.h"
#include "server/metrics.h"
#include "test_util.h"
#include "tokenizer/synthetic.h"

namespace ernie::runtime {
namespace {

using testing::TempDir;

class EngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir;
    model::MakeModelOptions o;
    o.out = dir_->path();
    o.seed = 9;
    o.sets = {"num_hidden_layers=2", "max_position_embeddings=512"};
    model::make_model(o);
    tokenizer::write_synthetic_tokenizer(dir_->path());
    m_ = new testing::LoadedModel(testing::load_cpu_model(dir_->path()));
    tok_ = tokenizer::Tokenizer::load(dir_->path());
  }
  static void TearDownTestSuite() {
    delete m_;
    delete dir_;
    tok_.reset();
  }
  static EngineConfig small_config() {
    EngineConfig c;
    c.max_model_len = 256;
    c.max_num_seqs = 16;
    return c;
  }
  // A cache with room for the longest request (at c.block_size) and three blocks more:
  // requests admitted together run out of blocks whatever lengths were drawn.
  static void use_small_cache(EngineConfig& c, const std::vector<std::vector<int32_t>>& prompts,
                              const std::vector<SamplingParams>& params) {
    int64_t longest = 0;
    for (size_t i = 0; i < prompts.size(); ++i) {
      longest = std::max<int64_t>(longest, (static_cast<int64_t>(prompts[i].size()) +
                                            params[i].max_tokens + c.block_size - 1) /
                                               c.block_size);
    }
    c.num_blocks_override = longest + 3;
    c.max_model_len = c.num_blocks_override * c.block_size;
  }
  static std::vector<std::vector<int32_t>> random_prompts(Rng& rng, int n) {
    std::vector<std::vector<int32_t>> out;
    std::vector<int32_t> shared;
    for (int i = 0; i < 40; ++i) shared.push_back(static_cast<int32_t>(3 + rng.below(4000)));
    for (int i = 0; i < n; ++i) {
      std::vector<int32_t> p;
      if (i % 3 == 0)
        p.assign(shared.begin(),
                 shared.begin() + 17 + static_cast<long>(rng.below(23)));  // shared prefixes
      const int len = 1 + static_cast<int>(rng.below(60));
      for (int k = 0; k < len; ++k) p.push_back(static_cast<int32_t>(3 + rng.below(4000)));
      out.push_back(p);
    }
    return out;
  }
  static TempDir* dir_;
  static testing::LoadedModel* m_;
  static std::shared_ptr<const tokenizer::Tokenizer> tok_;
};
TempDir* EngineTest::dir_ = nullptr;
testing::LoadedModel* EngineTest::m_ = nullptr;
std::shared_ptr<const tokenizer::Tokenizer> EngineTest::tok_;

SamplingParams greedy(int max_tokens) {
  SamplingParams p;
  p.temperature = 0.0f;
  p.max_tokens = max_tokens;
  p.ignore_eos = true;
  p.logprobs = 3;
  return p;
}

// N concurrent requests give what each gives alone: with and without prefix caching, with
// chunk budgets that split prompts at odd places, odd block sizes, and a cache small enough
// to force preemption.
TEST_F(EngineTest, ConcurrentEqualsAlone) {
  Rng rng(std::random_device{}());
  const auto prompts = random_prompts(rng, 10);
  const SamplingParams p = greedy(12);
  std::vector<GenerateResult> alone;
  {
    Engine e(*m_->model, nullptr, small_config());
    for (const auto& pr : prompts) alone.push_back(generate(e, {pr}, {p})[0][0]);
  }
  struct Mode {
    int block_size, budget;
    bool caching;
    int64_t blocks;  // non-zero: a cache too small for all requests at once
  };
  const Mode modes[] = {{16, 8192, true, 0}, {16, 8192, false, 0}, {5, 7, true, 0},
                        {3, 64, false, 0},   {4, 33, true, 1},     {7, 19, false, 1}};
  for (const Mode& mode : modes) {
    SCOPED_TRACE(::testing::Message() << "block " << mode.block_size << " budget " << mode.budget
                                      << " caching " << mode.caching << " blocks " << mode.blocks);
    EngineConfig c = small_config();
    c.block_size = mode.block_size;
    c.max_num_batched_tokens = mode.budget;
    c.enable_prefix_caching = mode.caching;
    if (mode.blocks) {
      // Room for the longest request and little more: requests admitted together run out of
      // blocks whatever lengths were drawn.
      int64_t longest = 0;
      for (const auto& pr : prompts) {
        const int64_t need =
            (static_cast<int64_t>(pr.size()) + p.max_tokens + mode.block_size - 1) /
            mode.block_size;
        longest = std::max(longest, need);
      }
      c.num_blocks_override = longest + 2;
      c.max_model_len = c.num_blocks_override * mode.block_size;
    }
    Engine e(*m_->model, nullptr, c);
    // Twice: the second round meets a warm prefix cache.
    for (int round = 0; round < 2; ++round) {
      const auto res = generate(e, prompts, std::vector<SamplingParams>(prompts.size(), p));
      for (size_t i = 0; i < prompts.size(); ++i) {
        ASSERT_EQ(res[i][0].tokens, alone[i].tokens) << "prompt " << i << " round " << round;
        for (size_t k = 0; k < alone[i].logprobs.size(); ++k) {
          EXPECT_NEAR(res[i][0].logprobs[k].logprob, alone[i].logprobs[k].logprob, 1e-4);
        }
      }
    }
    const auto st = e.stats();
    if (mode.blocks) {
      EXPECT_GT(st.preemptions, 0) << "the small cache did not force preemption";
    }
    if (mode.caching) {
      EXPECT_GT(st.prefix_hits, 0);
    } else {
      EXPECT_EQ(st.prefix_hits, 0);
    }
    EXPECT_EQ(st.running + st.waiting, 0u);
    EXPECT_EQ(st.kv_usage, 0.0);
  }
}

// Asynchronous scheduling gives exactly what synchronous scheduling gives: greedy, seeded
// draws, penalties (their history includes the token in flight), logprobs, max_tokens of 1,
// n > 1, prefix caching, chunked prompts and a cache small enough to preempt sequences whose
// next token is still in flight; stop strings and ids with a tokenizer.
TEST_F(EngineTest, AsyncSchedulingGivesWhatSyncGives) {
  Rng rng(std::random_device{}());
  const auto prompts = random_prompts(rng, 12);
  std::vector<SamplingParams> params;
  for (size_t i = 0; i < prompts.size(); ++i) {
    SamplingParams p = greedy(1 + static_cast<int>(rng.below(16)));
    switch (i % 4) {
      case 1:  // seeded draws
        p.temperature = 0.9f;
        p.top_p = 0.95f;
        p.seed = 100 + i;
        p.logprobs.reset();
        break;
      case 2:  // penalties
        p.presence_penalty = 0.7f;
        p.frequency_penalty = 0.4f;
        p.repetition_penalty = 1.3f;
        break;
      case 3:  // several outputs
        p.temperature = 1.0f;
        p.seed = 7 + i;
        p.n = 2;
        break;
      default:
        break;
    }
    params.push_back(p);
  }
  struct Mode {
    int block_size, budget;
    bool caching;
    bool small_cache;
  };
  for (const Mode& mode :
       {Mode{16, 8192, true, false}, Mode{4, 19, true, true}, Mode{5, 7, false, true}}) {
    SCOPED_TRACE(::testing::Message() << "block " << mode.block_size << " budget " << mode.budget
                                      << " small cache " << mode.small_cache);
    EngineConfig c = small_config();
    c.block_size = mode.block_size;
    c.max_num_batched_tokens = mode.budget;
    c.enable_prefix_caching = mode.caching;
    if (mode.small_cache) use_small_cache(c, prompts, params);
    c.async_scheduling = false;
    Engine sync(*m_->model, nullptr, c);
    const auto want = generate(sync, prompts, params);
    c.async_scheduling = true;
    Engine async(*m_->model, nullptr, c);
    const auto got = generate(async, prompts, params);
    for (size_t i = 0; i < prompts.size(); ++i) {
      ASSERT_EQ(got[i].size(), want[i].size());
      for (size_t k = 0; k < want[i].size(); ++k) {
        EXPECT_EQ(got[i][k].tokens, want[i][k].tokens) << "prompt " << i << " output " << k;
        EXPECT_EQ(got[i][k].finish_reason, want[i][k].finish_reason) << "prompt " << i;
        ASSERT_EQ(got[i][k].logprobs.size(), want[i][k].logprobs.size());
        for (size_t t = 0; t < want[i][k].logprobs.size(); ++t) {
          EXPECT_EQ(got[i][k].logprobs[t].logprob, want[i][k].logprobs[t].logprob);
        }
      }
    }
    if (mode.small_cache) {
      EXPECT_GT(async.stats().preemptions, 0);
    }
    EXPECT_FALSE(async.has_unfinished());
    EXPECT_EQ(async.stats().kv_usage, 0.0);
  }
  // Stops found on the host one step late: stop ids, EOS, stop strings.
  EngineConfig c = small_config();
  Engine sync(*m_->model, tok_, c);
  c.async_scheduling = true;
  Engine async(*m_->model, tok_, c);
  SamplingParams p = greedy(24);
  p.logprobs.reset();
  const std::vector<int32_t> prompt = tok_->encode("The engine serves");
  const auto full = generate(sync, {prompt}, {p})[0][0];
  ASSERT_GE(full.tokens.size(), 6u);
  std::vector<SamplingParams> stops(3, p);
  stops[0].stop_token_ids = {full.tokens[3]};
  stops[1].stop = {full.text.substr(full.text.size() / 2, 2)};
  stops[2].ignore_eos = false;
  stops[2].min_tokens = 2;
  const std::vector<std::vector<int32_t>> three(3, prompt);
  const auto want = generate(sync, three, stops);
  const auto got = generate(async, three, stops);
  for (size_t i = 0; i < stops.size(); ++i) {
    EXPECT_EQ(got[i][0].tokens, want[i][0].tokens) << i;
    EXPECT_EQ(got[i][0].text, want[i][0].text) << i;
    EXPECT_EQ(got[i][0].finish_reason, want[i][0].finish_reason) << i;
  }
  EXPECT_EQ(want[0][0].finish_reason, "stop");
  EXPECT_EQ(want[1][0].finish_reason, "stop");
}

// Prompt logprobs: every prompt token after the first scored from the logits at the position
// before it, equal to a reference computed here from one forward pass over the whole prompt
// (log-softmax in double, rank and top k by sorting), however the engine splits, caps, batches,
// preempts and recomputes the prompt, and whether or not its blocks are in the prefix cache.
TEST_F(EngineTest, PromptLogprobsMatchOneForwardPass) {
  Rng rng(std::random_device{}());
  auto prompts = random_prompts(rng, 9);
  prompts.push_back({77});        // one token: nothing to score
  prompts.push_back(prompts[0]);  // the same prompt again (prefix cache)
  std::vector<int32_t> longp;     // longer than the rows a capped step takes
  for (int i = 0; i < 90; ++i) longp.push_back(static_cast<int32_t>(3 + rng.below(4000)));
  prompts.push_back(longp);
  constexpr int kTop = 4;
  // The reference, before any engine takes the backend's cache.
  std::vector<std::vector<backend::SampledToken>> want;
  const int64_t vocab = m_->model->config().vocab_size;
  for (const auto& pr : prompts) {
    const int32_t n = static_cast<int32_t>(pr.size());
    std::vector<backend::SampledToken> rows;
    if (n > 1) {
      const int32_t blocks = (n + 15) / 16;
      m_->be->allocate_kv_cache(static_cast<int>(m_->model->config().num_hidden_layers), blocks,
                                16);
      backend::StepInput st;
      st.token_ids = pr;
      for (int32_t i = 0; i < n; ++i) {
        st.positions.push_back(i);
        st.slot_mapping.push_back(i);
      }
      st.query_start = {0, n};
      st.context_lens = {n};
      st.max_blocks_per_seq = blocks;
      for (int32_t b = 0; b < blocks; ++b) st.block_tables.push_back(b);
      for (int32_t i = 0; i + 1 < n; ++i) st.logits_indices.push_back(i);
      const std::vector<float> logits = m_->model->forward(st);
      for (int32_t i = 0; i + 1 < n; ++i) {
        const float* row = logits.data() + static_cast<int64_t>(i) * vocab;
        double mx = row[0], sum = 0.0;
        for (int64_t t = 0; t < vocab; ++t) mx = std::max<double>(mx, row[t]);
        for (int64_t t = 0; t < vocab; ++t) sum += std::exp(row[t] - mx);
        const double lse = mx + std::log(sum);
        std::vector<int32_t> order(static_cast<size_t>(vocab));
        for (int32_t t = 0; t < vocab; ++t) order[t] = t;
        std::stable_sort(order.begin(), order.end(),
                         [&](int32_t a, int32_t b) { return row[a] > row[b]; });
        backend::SampledToken r;
        r.id = pr[i + 1];
        r.logprob = static_cast<float>(row[r.id] - lse);
        r.rank = 1 + static_cast<int32_t>(
                         std::count_if(row, row + vocab, [&](float l) { return l > row[r.id]; }));
        for (int k = 0; k < kTop; ++k)
          r.top.push_back({order[k], static_cast<float>(row[order[k]] - lse)});
        rows.push_back(r);
      }
    }
    want.push_back(rows);
  }
  std::vector<SamplingParams> params;
  for (size_t i = 0; i < prompts.size(); ++i) {
    SamplingParams p = greedy(1 + static_cast<int>(rng.below(4)));
    p.prompt_logprobs = kTop;
    if (i == 3) p.n = 2;                    // only the request's first sequence scores its prompt
    if (i == 4) p.prompt_logprobs.reset();  // and a request that did not ask has none
    params.push_back(p);
  }
  struct Mode {
    int block_size, budget, max_seqs;
    bool caching, async, small_cache;
  };
  const Mode modes[] = {{16, 8192, 16, true, true, false},
                        {5, 7, 16, true, false, false},
                        {4, 8192, 2, true, true, false},
                        {4, 23, 16, false, true, true},
                        {3, 31, 3, true, false, true}};
  for (const Mode& mode : modes) {
    SCOPED_TRACE(::testing::Message()
                 << "block " << mode.block_size << " budget " << mode.budget << " seqs "
                 << mode.max_seqs << " async " << mode.async << " small " << mode.small_cache);
    EngineConfig c = small_config();
    c.block_size = mode.block_size;
    c.max_num_batched_tokens = mode.budget;
    c.max_num_seqs = mode.max_seqs;
    c.enable_prefix_caching = mode.caching;
    c.async_scheduling = mode.async;
    if (mode.small_cache) use_small_cache(c, prompts, params);
    Engine e(*m_->model, nullptr, c);
    for (int round = 0; round < 2; ++round) {  // the second meets a warm prefix cache
      const auto got = generate(e, prompts, params);
      for (size_t i = 0; i < prompts.size(); ++i) {
        SCOPED_TRACE(::testing::Message() << "round " << round << " prompt " << i);
        for (size_t k = 1; k < got[i].size(); ++k) EXPECT_TRUE(got[i][k].prompt_logprobs.empty());
        const auto& lp = got[i][0].prompt_logprobs;
        if (!params[i].prompt_logprobs) {
          EXPECT_TRUE(lp.empty());
          continue;
        }
        ASSERT_EQ(lp.size(), want[i].size());
        for (size_t t = 0; t < lp.size(); ++t) {
          const auto& w = want[i][t];
          EXPECT_EQ(lp[t].id, w.id) << "token " << t;
          EXPECT_NEAR(lp[t].logprob, w.logprob, 1e-4) << "token " << t;
          EXPECT_EQ(lp[t].rank, w.rank) << "token " << t;
          ASSERT_EQ(lp[t].top.size(), static_cast<size_t>(kTop));
          for (int k = 0; k < kTop; ++k) {
            EXPECT_NEAR(lp[t].top[k].logprob, w.top[k].logprob, 1e-4) << "token " << t;
            // Ids may swap only within a near-tie.
            if (lp[t].top[k].id != w.top[k].id) {
              EXPECT_NEAR(lp[t].top[k].logprob, w.top[k].logprob, 1e-5) << "token " << t;
            }
          }
        }
      }
    }
    // (Three sequences at a time do not always fill the small cache.)
    if (mode.small_cache && mode.max_seqs > 3) EXPECT_GT(e.stats().preemptions, 0);
    EXPECT_FALSE(e.has_unfinished());
    EXPECT_EQ(e.stats().kv_usage, 0.0);
  }
}

TEST_F(EngineTest, SeededSamplingIsReproducibleWhateverTheBatch) {
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_p = 0.9f;
  p.max_tokens = 16;
  p.seed = 4242;
  p.ignore_eos = true;
  const std::vector<int32_t> prompt = {11, 12, 13, 14};
  EngineConfig c = small_config();
  Engine a(*m_->model, nullptr, c);
  const auto alone = generate(a, {prompt}, {p})[0][0].tokens;
  SamplingParams other = p;
  other.seed = 7;
  c.num_blocks_override = 12;  // preemption in the mix
  c.block_size = 4;
  c.max_model_len = 48;
  c.max_num_batched_tokens = 9;
  Engine b(*m_->model, nullptr, c);
  const auto mixed = generate(b, {{40, 41, 42, 43, 44}, prompt, {7, 8}}, {other, p, other});
  EXPECT_EQ(mixed[1][0].tokens, alone);
  SamplingParams n3 = p;
  n3.n = 3;
  const auto three = generate(b, {prompt}, {n3})[0];
  ASSERT_EQ(three.size(), 3u);
  EXPECT_EQ(three[0].tokens, alone);  // index 0 uses the request's seed
  EXPECT_NE(three[1].tokens, three[2].tokens);
}

TEST_F(EngineTest, StopStringsAcrossTokenBoundaries) {
  Engine e(*m_->model, tok_, small_config());
  SamplingParams p = greedy(24);
  p.logprobs.reset();
  const std::vector<int32_t> prompt = tok_->encode("The engine serves");
  const auto full = generate(e, {prompt}, {p})[0][0];
  ASSERT_GE(full.tokens.size(), 6u);
  // A stop string that starts inside token 3's text and ends inside token 4's.
  const std::string t3 =
      tok_->decode(std::vector<int32_t>(full.tokens.begin(), full.tokens.begin() + 3));
  const std::string t5 =
      tok_->decode(std::vector<int32_t>(full.tokens.begin(), full.tokens.begin() + 5));
  ASSERT_GT(t5.size(), t3.size() + 1);
  const std::string stop = full.text.substr(t3.size() - 1, 2);
  const size_t at = full.text.find(stop);
  for (bool include : {false, true}) {
    SamplingParams ps = p;
    ps.stop = {"never-appears-zzz", stop};
    ps.include_stop_str_in_output = include;
    e.add_request("s", prompt, ps);
    std::string streamed;
    RequestOutput last;
    while (e.has_unfinished()) {
      for (auto& o : e.step()) {
        for (auto& d : o.outputs) streamed += d.text;
        last = o;
      }
    }
    const std::string want = full.text.substr(0, include ? at + stop.size() : at);
    EXPECT_EQ(streamed, want);
    ASSERT_TRUE(last.finished);
    EXPECT_EQ(last.outputs[0].finish_reason, "stop");
    EXPECT_EQ(std::get<std::string>(last.outputs[0].stop_reason), stop);
  }
}

TEST_F(EngineTest, StopTokenIdsMinTokensAndEos) {
  Engine e(*m_->model, tok_, small_config());
  SamplingParams p = greedy(10);
  const std::vector<int32_t> prompt = {100, 200, 300};
  const auto full = generate(e, {prompt}, {p})[0][0].tokens;
  ASSERT_EQ(full.size(), 10u);
  SamplingParams s = p;
  s.stop_token_ids = {full[2]};
  auto r = generate(e, {prompt}, {s})[0][0];
  const size_t first = std::find(full.begin(), full.end(), full[2]) - full.begin();
  EXPECT_EQ(r.tokens, std::vector<int32_t>(full.begin(), full.begin() + first + 1));
  EXPECT_EQ(r.finish_reason, "stop");
  // min_tokens bans the stop id until enough tokens exist.
  s.min_tokens = static_cast<int>(first) + 2;
  r = generate(e, {prompt}, {s})[0][0];
  EXPECT_GE(r.tokens.size(), first + 2);
  for (size_t i = 0; i + 1 < std::min<size_t>(r.tokens.size(), first + 2); ++i)
    EXPECT_NE(r.tokens[i], full[2]);
}

TEST_F(EngineTest, BadRequestsAreRefusedBeforeAnyWork) {
  Engine e(*m_->model, tok_, small_config());
  SamplingParams p;
  p.max_tokens = 250;
  try {
    e.add_request("a", std::vector<int32_t>(10, 5), p);  // 10 + 250 > 256
    FAIL();
  } catch (const ParamError& err) {
    EXPECT_EQ(err.param(), "max_tokens");
    EXPECT_NE(std::string(err.what()).find("maximum context length is 256"), std::string::npos);
  }
  p.max_tokens = 4;
  EXPECT_THROW(e.add_request("b", std::vector<int32_t>(256, 5), p), ParamError);
  EXPECT_THROW(e.add_request("c", {}, p), ParamError);
  EXPECT_THROW(e.add_request("d", {1, 999999}, p), ParamError);
  SamplingParams bad = p;
  bad.temperature = -1.0f;
  try {
    e.add_request("e", {1, 2}, bad);
    FAIL();
  } catch (const ParamError& err) {
    EXPECT_EQ(err.param(), "temperature");
  }
  bad = p;
  bad.top_p = 0.0f;
  EXPECT_THROW(e.add_request("f", {1, 2}, bad), ParamError);
  bad = p;
  bad.stop = {""};
  EXPECT_THROW(e.add_request("g", {1, 2}, bad), ParamError);
  bad = p;
  bad.logprobs = 21;
  EXPECT_THROW(e.add_request("h", {1, 2}, bad), ParamError);
  for (int k : {21, -2, -1}) {  // -1: the whole vocabulary, over the 20 allowed
    bad = p;
    bad.prompt_logprobs = k;
    try {
      e.add_request("i", {1, 2}, bad);
      FAIL() << k;
    } catch (const ParamError& err) {
      EXPECT_EQ(err.param(), "prompt_logprobs");
    }
  }
  e.add_request("ok", {1, 2}, p);
  EXPECT_THROW(e.add_request("ok", {1, 2}, p), Error);  // duplicate id
  EXPECT_FALSE(e.step().empty() && e.stats().running == 0);
}

TEST_F(EngineTest, AbortFreesBlocksAndReportsAbort) {
  Engine e(*m_->model, nullptr, small_config());
  SamplingParams p = greedy(50);
  e.add_request("x", std::vector<int32_t>(30, 7), p);
  e.add_request("y", std::vector<int32_t>(20, 9), p);
  e.step();
  e.step();
  EXPECT_GT(e.stats().kv_usage, 0.0);
  e.abort_request("x");
  bool saw = false;
  for (auto& o : e.step()) {
    if (o.request_id == "x") {
      saw = true;
      EXPECT_TRUE(o.finished);
      EXPECT_EQ(o.outputs[0].finish_reason, "abort");
    }
  }
  EXPECT_TRUE(saw);
  e.abort_request("y");
  e.abort_request("not-a-request");  // ignored
  e.step();
  EXPECT_FALSE(e.has_unfinished());
  EXPECT_EQ(e.stats().kv_usage, 0.0);
}

TEST_F(EngineTest, KvCapacityBelowMaxModelLenIsRefused) {
  EngineConfig c = small_config();
  c.num_blocks_override = 4;
  c.block_size = 16;
  EXPECT_THROW(Engine(*m_->model, nullptr, c), Error);  // 64 tokens < 256
}

}  // namespace
}  // namespace ernie::runtime

namespace ernie::runtime {
namespace {

// The stage profile: off, nothing is counted; on, every step is counted once and the stages
// that ran have time.
TEST_F(EngineTest, StageProfileCountsEveryStep) {
  Rng rng(std::random_device{}());
  const auto prompts = random_prompts(rng, 4);
  {
    Engine e(*m_->model, nullptr, small_config());
    generate(e, prompts, std::vector<SamplingParams>(prompts.size(), greedy(5)));
    EXPECT_EQ(e.take_stage_profile().steps, 0);
  }
  EngineConfig c = small_config();
  c.profile_stages = true;
  Engine e(*m_->model, nullptr, c);
  e.take_stage_profile();
  int steps = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    e.add_request(cat("r", i), prompts[i], greedy(5));
  }
  while (e.has_unfinished()) {
    e.step();
    ++steps;
  }
  const backend::StageProfile p = e.take_stage_profile();
  EXPECT_EQ(p.steps, steps);
  using backend::Stage;
  for (Stage s :
       {Stage::kEmbedding, Stage::kNorm, Stage::kQkvProj, Stage::kAttention, Stage::kOProj,
        Stage::kMoeRouter, Stage::kMoeExperts, Stage::kLmHead, Stage::kSampling}) {
    EXPECT_GT(p.ms[static_cast<int>(s)], 0.0) << backend::stage_name(s);
  }
  EXPECT_EQ(e.take_stage_profile().steps, 0);  // taken: reset
  m_->model->backend().enable_profile(false);
}

}  // namespace
}  // namespace ernie::runtime

namespace ernie::runtime {
namespace {

using server::AsyncEngine;
using server::Metrics;
using server::RequestStream;

// What one stream received, waited for until finished (or failed).
struct Received {
  std::vector<int32_t> tokens;
  bool finished = false;
  std::optional<std::string> error;
  std::string finish_reason;
};

// Streams whose notifications wake the test thread.
struct Mailboxes {
  std::mutex mu;
  std::condition_variable cv;

  std::shared_ptr<RequestStream> open() {
    return std::make_shared<RequestStream>([this] {
      std::lock_guard lock(mu);
      cv.notify_all();
    });
  }
  // Waits for the next notification, up to `until`; false at the deadline.
  bool wait(std::chrono::steady_clock::time_point until) {
    std::unique_lock lock(mu);
    return cv.wait_until(lock, until) != std::cv_status::timeout;
  }
  // Everything `s` receives until it finishes (or fails).
  Received drain_all(RequestStream& s) {
    Received r;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    while (true) {
      bool finished = false;
      for (RequestOutput& o : s.drain(&finished)) {
        for (auto& d : o.outputs) {
          r.tokens.insert(r.tokens.end(), d.token_ids.begin(), d.token_ids.end());
          if (d.finish_reason) r.finish_reason = *d.finish_reason;
        }
        r.finished |= o.finished;
      }
      r.error = s.error();
      if (finished) return r;
      if (!wait(deadline)) {
        ADD_FAILURE() << "a stream never finished";
        return r;
      }
    }
  }
};

// Requests through the engine thread and the delivery thread: each stream receives, in order,
// exactly what the engine gives the same request alone, ends with its finished output, and the
// latency histograms count every request once.
TEST_F(EngineTest, AsyncEngineDeliversEveryOutputInOrder) {
  Rng rng(std::random_device{}());
  const auto prompts = random_prompts(rng, 12);
  std::vector<SamplingParams> params;
  for (size_t i = 0; i < prompts.size(); ++i)
    params.push_back(greedy(3 + static_cast<int>(rng.below(20))));
  std::vector<std::vector<int32_t>> alone;
  {
    Engine e(*m_->model, nullptr, small_config());
    for (size_t i = 0; i < prompts.size(); ++i)
      alone.push_back(generate(e, {prompts[i]}, {params[i]})[0][0].tokens);
  }
  Engine e(*m_->model, nullptr, small_config());
  Metrics metrics("m");
  Mailboxes boxes;
  std::vector<std::shared_ptr<RequestStream>> streams;
  {
    AsyncEngine ae(e, metrics, 0.05);
    for (size_t i = 0; i < prompts.size(); ++i) {
      streams.push_back(boxes.open());
      ae.submit("r" + std::to_string(i), prompts[i], params[i], streams.back());
    }
    for (size_t i = 0; i < prompts.size(); ++i) {
      const Received r = boxes.drain_all(*streams[i]);
      EXPECT_TRUE(r.finished) << i;
      EXPECT_FALSE(r.error) << i;
      EXPECT_EQ(r.finish_reason, "length") << i;
      EXPECT_EQ(r.tokens, alone[i]) << i;
    }
  }
  const std::string text = metrics.render();
  EXPECT_NE(text.find("vllm:time_to_first_token_seconds_count{model_name=\"m\"} " +
                      std::to_string(prompts.size())),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("vllm:e2e_request_latency_seconds_count{model_name=\"m\"} " +
                      std::to_string(prompts.size())),
            std::string::npos)
      << text;
}

// Shutting down with requests still running: every stream ends (an abort output or a failure),
// none is left waiting, and a request submitted after shutdown fails at once.
TEST_F(EngineTest, AsyncEngineShutdownEndsEveryStream) {
  Rng rng(std::random_device{}());
  const auto prompts = random_prompts(rng, 6);
  Engine e(*m_->model, nullptr, small_config());
  Metrics metrics("m");
  Mailboxes boxes;
  std::vector<std::shared_ptr<RequestStream>> streams;
  AsyncEngine ae(e, metrics, 0.05);
  for (size_t i = 0; i < prompts.size(); ++i) {
    streams.push_back(boxes.open());
    ae.submit("r" + std::to_string(i), prompts[i], greedy(200), streams.back());
  }
  // Wait for the first tokens of the first request, then stop.
  while (true) {
    bool finished = false;
    std::vector<RequestOutput> got = streams[0]->drain(&finished);
    if (!got.empty() || finished) break;
    boxes.wait(std::chrono::steady_clock::now() + std::chrono::milliseconds(10));
  }
  ae.shutdown();
  for (size_t i = 0; i < streams.size(); ++i) {
    EXPECT_TRUE(streams[i]->finished()) << i;
    const Received r = boxes.drain_all(*streams[i]);
    EXPECT_TRUE(r.finish_reason == "abort" || r.error) << i;
  }
  auto late = boxes.open();
  ae.submit("late", prompts[0], greedy(5), late);
  EXPECT_TRUE(late->finished());
  EXPECT_TRUE(late->error());
}

// vLLM's serving defaults by device (EngineArgs' defaults for its OpenAI server).
TEST(ServingDefaults, FollowVllmByDevice) {
  auto limits = [](const std::string& name, double gib) {
    const runtime::SchedulingLimits l =
        runtime::serving_defaults({name, static_cast<int64_t>(gib * (1ll << 30))});
    return std::pair{l.max_num_seqs, l.max_num_batched_tokens};
  };
  EXPECT_EQ(limits("NVIDIA H100 80GB HBM3", 79.2), (std::pair{1024, 8192}));
  EXPECT_EQ(limits("NVIDIA H200", 139.8), (std::pair{1024, 8192}));
  EXPECT_EQ(limits("NVIDIA GH200 96GB", 95.0), (std::pair{1024, 8192}));
  EXPECT_EQ(limits("NVIDIA A100-SXM4-80GB", 79.3), (std::pair{256, 2048}));
  EXPECT_EQ(limits("a GPU just short of 70 GiB", 69.9), (std::pair{256, 2048}));
  EXPECT_EQ(limits("NVIDIA L40S", 44.4), (std::pair{256, 2048}));
  EXPECT_EQ(limits("", 0), (std::pair{256, 8192}));  // the host
}

}  // namespace
}  // namespace ernie::runtime
