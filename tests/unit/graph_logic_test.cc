// The model's side of decode graphs, on the CPU: a backend that claims graph support (wrapping
// the CPU reference) sees which steps go the graph way, at which padded size, with which
// padding rows; padded decode steps must give exactly the logits of the unpadded step (the CPU
// computes every row on its own, so padding rows cannot change real rows).
#include <gtest/gtest.h>

#include <map>

#include "test_util.h"

namespace ernie {
namespace {

using backend::Backend;
using backend::StepInput;
using backend::Tensor;

// Forwards every op to the CPU backend; "records" a graph by running its body eagerly and
// never replays, so every graph step recomputes (the results are the padded step's).
class GraphSpy final : public Backend {
 public:
  GraphSpy() : in_(backend::make_cpu_backend()) {}
  std::string name() const override { return "graph-spy"; }
  DType activation_dtype() const override { return in_->activation_dtype(); }
  Tensor load_weight(const backend::HostTensor& s) override { return in_->load_weight(s); }
  Tensor random_weight(const backend::Shape& s, DType d, const backend::RandomInit& i,
                       uint64_t seed) override {
    return in_->random_weight(s, d, i, seed);
  }
  int64_t weight_bytes() const override { return in_->weight_bytes(); }
  void configure_attention(const backend::AttentionConfig& c) override {
    in_->configure_attention(c);
  }
  // One spare block past the engine's, as the CUDA backend keeps.
  void allocate_kv_cache(int layers, int64_t blocks, int block_size) override {
    blocks_ = blocks;
    in_->allocate_kv_cache(layers, blocks + 1, block_size);
  }
  DType kv_dtype() const override { return in_->kv_dtype(); }
  int64_t num_kv_blocks() const override { return blocks_; }
  int kv_block_size() const override { return in_->kv_block_size(); }
  void begin_step(const StepInput& s) override {
    ++eager_steps;
    in_->begin_step(s);
  }
  Tensor scratch(const backend::Shape& s, DType d) override { return in_->scratch(s, d); }
  bool enable_graphs(int max_batch, int max_blocks) override {
    max_batch_ = max_batch;
    max_blocks_ = max_blocks;
    return true;
  }
  void begin_graph_step(const StepInput& s) override {
    EXPECT_LE(s.num_seqs(), max_batch_);
    EXPECT_LE(s.max_blocks_per_seq, max_blocks_);
    graph_steps.push_back(s);
    in_->begin_step(s);
  }
  bool replay_graph(int) override { return false; }
  bool capture_graph(int key, const std::function<void()>& body) override {
    ++captures[key];
    body();
    return true;
  }
  void enable_profile(bool on) override { in_->enable_profile(on); }
  void mark(backend::Stage s) override { in_->mark(s); }
  backend::StageProfile take_profile() override { return in_->take_profile(); }
  void embedding(Tensor o, const Tensor& t) override { in_->embedding(o, t); }
  void rms_norm(Tensor o, const Tensor& x, const Tensor& w, float e) override {
    in_->rms_norm(o, x, w, e);
  }
  void add_rms_norm(Tensor o, Tensor r, const Tensor& x, const Tensor& w, float e) override {
    in_->add_rms_norm(o, r, x, w, e);
  }
  void linear(Tensor o, const Tensor& x, const Tensor& w) override { in_->linear(o, x, w); }
  void rope_store_kv(Tensor q, int l) override { in_->rope_store_kv(q, l); }
  void attention(Tensor o, const Tensor& q, int l) override { in_->attention(o, q, l); }
  void silu_mul(Tensor o, const Tensor& g) override { in_->silu_mul(o, g); }
  void moe(Tensor o, const Tensor& x, const backend::MoeWeights& w) override { in_->moe(o, x, w); }
  void gather_logit_rows(Tensor o, const Tensor& x) override { in_->gather_logit_rows(o, x); }
  void to_host(const Tensor& s, float* d) override { in_->to_host(s, d); }
  std::vector<backend::SampledToken> sample(const Tensor& l,
                                            const std::vector<backend::SamplingRow>& r) override {
    return in_->sample(l, r);
  }

  int eager_steps = 0;
  std::vector<StepInput> graph_steps;
  std::map<int, int> captures;

 private:
  std::unique_ptr<Backend> in_;
  int64_t blocks_ = 0;
  int max_batch_ = 0, max_blocks_ = 0;
};

class GraphLogicTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new testing::TempDir();
    model::MakeModelOptions o;
    o.out = dir_->path();
    o.seed = 11;
    model::make_model(o);
  }
  static void TearDownTestSuite() { delete dir_; }
  static testing::TempDir* dir_;
};
testing::TempDir* GraphLogicTest::dir_ = nullptr;

// n sequences with contexts `lens`, one block table of `width` each; step of tokens [from, to).
StepInput make_step(const std::vector<int>& from, const std::vector<int>& to, int width, int block,
                    int64_t vocab) {
  StepInput st;
  st.max_blocks_per_seq = width;
  st.query_start = {0};
  for (size_t q = 0; q < from.size(); ++q) {
    for (int p = from[q]; p < to[q]; ++p) {
      st.token_ids.push_back(static_cast<int32_t>((p * 131 + q * 17 + 5) % vocab));
      st.positions.push_back(p);
      st.slot_mapping.push_back(static_cast<int64_t>(q * width + p / block) * block + p % block);
    }
    st.query_start.push_back(st.num_tokens());
    st.context_lens.push_back(to[q]);
    st.logits_indices.push_back(st.num_tokens() - 1);
    for (int b = 0; b < width; ++b) st.block_tables.push_back(static_cast<int32_t>(q * width + b));
  }
  return st;
}

TEST_F(GraphLogicTest, DecodeStepsArePaddedToGraphSizesAndExact) {
  auto spy_owner = std::make_unique<GraphSpy>();
  GraphSpy* spy = spy_owner.get();
  auto graphed = testing::load_model(dir_->path(), std::move(spy_owner));
  auto plain = testing::load_cpu_model(dir_->path());
  const int64_t vocab = plain.model->config().vocab_size;
  const int layers = static_cast<int>(plain.model->config().num_hidden_layers);
  const int block = 8, width = 6, seqs = 11;
  graphed.model->backend().allocate_kv_cache(layers, seqs * width, block);
  plain.model->backend().allocate_kv_cache(layers, seqs * width, block);

  // Sizes 1, 2, 4, 8, 16 are recorded at once on padding-only steps.
  EXPECT_EQ(graphed.model->enable_graphs(12, width), 5);
  EXPECT_EQ(spy->captures, (std::map<int, int>{{1, 1}, {2, 1}, {4, 1}, {8, 1}, {16, 1}}));
  for (const auto& s : spy->graph_steps) {
    for (int r = 0; r < s.num_seqs(); ++r) {
      EXPECT_EQ(s.block_tables[r * s.max_blocks_per_seq], seqs * width);  // the spare block
    }
  }
  spy->graph_steps.clear();

  // Prefill (mixed lengths: eager), then decodes of 11, 5 and 1 sequences.
  std::vector<int> lens = {3, 9, 17, 1, 30, 6, 12, 2, 25, 8, 4};
  const StepInput prefill = make_step(std::vector<int>(seqs, 0), lens, width, block, vocab);
  const int eager_before = spy->eager_steps;
  EXPECT_EQ(graphed.model->forward(prefill), plain.model->forward(prefill));
  EXPECT_EQ(spy->eager_steps, eager_before + 1);
  EXPECT_TRUE(spy->graph_steps.empty());

  for (int n : {11, 5, 1}) {
    SCOPED_TRACE(::testing::Message() << n << " sequences");
    std::vector<int> from(lens.begin(), lens.begin() + n), to = from;
    for (auto& x : to) ++x;
    const StepInput decode = make_step(from, to, width, block, vocab);
    const auto got = graphed.model->forward(decode);
    EXPECT_EQ(got, plain.model->forward(decode));  // real rows exactly as unpadded
    ASSERT_EQ(spy->graph_steps.size(), 1u);
    const StepInput& p = spy->graph_steps.back();
    const int want_size = n <= 1 ? 1 : n <= 2 ? 2 : n <= 4 ? 4 : n <= 8 ? 8 : 16;
    EXPECT_EQ(p.num_seqs(), want_size);
    for (int r = n; r < p.num_seqs(); ++r) {  // padding rows: token 0 at position 0, spare block
      EXPECT_EQ(p.token_ids[r], 0);
      EXPECT_EQ(p.positions[r], 0);
      EXPECT_EQ(p.context_lens[r], 1);
      EXPECT_EQ(p.slot_mapping[r], static_cast<int64_t>(seqs * width) * block);
    }
    spy->graph_steps.clear();
    for (int q = 0; q < n; ++q) ++lens[q];
  }

  // A decode step that does not want every row's logits, and a step wider than the graph
  // limit, run eagerly; graphs off means eager too.
  {
    std::vector<int> from(lens.begin(), lens.begin() + 3), to = from;
    for (auto& x : to) ++x;
    StepInput partial = make_step(from, to, width, block, vocab);
    partial.logits_indices = {0, 2};
    const int before = spy->eager_steps;
    EXPECT_EQ(graphed.model->forward(partial), plain.model->forward(partial));
    EXPECT_EQ(spy->eager_steps, before + 1);
    EXPECT_TRUE(spy->graph_steps.empty());
    for (int q = 0; q < 3; ++q) ++lens[q];
  }
  // A small batch limit records only the sizes up to it: one sequence runs unpadded.
  spy->captures.clear();
  EXPECT_EQ(graphed.model->enable_graphs(1, width), 1);
  EXPECT_EQ(spy->captures, (std::map<int, int>{{1, 1}}));
  spy->captures.clear();
  EXPECT_EQ(graphed.model->enable_graphs(3, width), 3);
  EXPECT_EQ(spy->captures, (std::map<int, int>{{1, 1}, {2, 1}, {4, 1}}));
  spy->graph_steps.clear();
  EXPECT_EQ(graphed.model->enable_graphs(0, width), 0);
  {
    std::vector<int> from(lens.begin(), lens.begin() + 2), to = from;
    for (auto& x : to) ++x;
    const StepInput decode = make_step(from, to, width, block, vocab);
    const int before = spy->eager_steps;
    EXPECT_EQ(graphed.model->forward(decode), plain.model->forward(decode));
    EXPECT_EQ(spy->eager_steps, before + 1);
    EXPECT_TRUE(spy->graph_steps.empty());
  }
}

// The sizes the engine sets memory aside for are the ones enable_graphs records.
TEST(GraphSizes, AreThoseRecorded) {
  EXPECT_TRUE(model::Ernie45::graph_sizes(0).empty());
  EXPECT_EQ(model::Ernie45::graph_sizes(1), (std::vector<int>{1}));
  EXPECT_EQ(model::Ernie45::graph_sizes(12), (std::vector<int>{1, 2, 4, 8, 16}));
  const std::vector<int> s = model::Ernie45::graph_sizes(256);
  EXPECT_EQ(s.size(), 35u);
  EXPECT_EQ(s.back(), 256);
  const std::vector<int> t = model::Ernie45::graph_sizes(512);  // as vLLM records them
  EXPECT_EQ(t.size(), 51u);
  EXPECT_EQ(std::vector<int>(t.begin(), t.begin() + 35), s);
  for (size_t i = 35; i < t.size(); ++i) EXPECT_EQ(t[i], t[i - 1] + 16);
  EXPECT_EQ(t.back(), 512);
  EXPECT_EQ(model::Ernie45::graph_sizes(257).back(), 272);
  EXPECT_EQ(model::Ernie45::graph_sizes(500).back(), 512);
}

}  // namespace
}  // namespace ernie
