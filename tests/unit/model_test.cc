#include <gtest/gtest.h>

#include <cmath>
#include <fstream>

#include <nlohmann/json.hpp>

#include "common/check.h"
#include "common/rng.h"
#include "test_util.h"

namespace ernie {
namespace {

using testing::TempDir;

// One small model for the whole suite.
class ModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir;
    model::MakeModelOptions o;
    o.out = dir_->path();
    o.seed = 3;
    o.sets = {"num_hidden_layers=3", "max_position_embeddings=256"};
    model::make_model(o);
  }
  static void TearDownTestSuite() { delete dir_; }
  static TempDir* dir_;
};
TempDir* ModelTest::dir_ = nullptr;

// A one-sequence step over positions [start, start + ids.size()) with blocks 0.. in order.
backend::StepInput single_seq_step(const std::vector<int32_t>& ids, int32_t start, int block_size,
                                   int blocks, bool all_logits) {
  backend::StepInput s;
  s.token_ids = ids;
  s.max_blocks_per_seq = blocks;
  for (int b = 0; b < blocks; ++b) s.block_tables.push_back(b);
  s.query_start = {0, static_cast<int32_t>(ids.size())};
  s.context_lens = {start + static_cast<int32_t>(ids.size())};
  for (size_t i = 0; i < ids.size(); ++i) {
    s.positions.push_back(start + static_cast<int32_t>(i));
    s.slot_mapping.push_back(start + static_cast<int64_t>(i));
    if (all_logits || i + 1 == ids.size()) s.logits_indices.push_back(static_cast<int32_t>(i));
  }
  return s;
}

// Causality: the logits of every prefill row equal those of decoding token by token.
TEST_F(ModelTest, PrefillRowsEqualIncrementalDecode) {
  auto m = testing::load_cpu_model(dir_->path());
  const int64_t v = m.model->config().vocab_size;
  Rng rng(std::random_device{}());
  std::vector<int32_t> ids;
  for (int i = 0; i < 11; ++i) ids.push_back(static_cast<int32_t>(3 + rng.below(v - 3)));
  m.be->allocate_kv_cache(3, 4, 4);
  const auto all = m.model->forward(single_seq_step(ids, 0, 4, 4, true));
  ASSERT_EQ(all.size(), ids.size() * v);
  for (size_t i = 0; i < ids.size(); ++i) {
    const auto one =
        m.model->forward(single_seq_step({ids[i]}, static_cast<int32_t>(i), 4, 4, false));
    double worst = 0;
    for (int64_t j = 0; j < v; ++j)
      worst = std::max(worst, double(std::abs(one[j] - all[i * v + j])));
    EXPECT_LT(worst, 1e-4) << "row " << i;
  }
}

TEST_F(ModelTest, InconsistentStepsAreRejected) {
  auto m = testing::load_cpu_model(dir_->path());
  m.be->allocate_kv_cache(3, 4, 4);
  auto bad = single_seq_step({5, 6, 7}, 0, 4, 4, false);
  bad.slot_mapping[1] = 9;
  EXPECT_THROW(m.model->forward(bad), Error);
  bad = single_seq_step({5, 6, 7}, 0, 4, 4, false);
  bad.token_ids[0] = -1;
  EXPECT_THROW(m.model->forward(bad), Error);
  bad = single_seq_step({5, 6, 7}, 0, 4, 4, false);
  bad.block_tables[0] = 99;
  EXPECT_THROW(m.model->forward(bad), Error);
  bad = single_seq_step({5, 6, 7}, 0, 4, 4, false);
  bad.logits_indices = {3};
  EXPECT_THROW(m.model->forward(bad), Error);
  bad = single_seq_step({5, 6, 7}, 14, 4, 4, false);  // runs past the 16 slots of its table
  EXPECT_THROW(m.model->forward(bad), Error);
}

TEST_F(ModelTest, LoadErrorsNameTheTensor) {
  // Drop a tensor from the index: loading must name it.
  TempDir copy;
  for (const auto& e : std::filesystem::directory_iterator(dir_->path())) {
    std::filesystem::copy(e.path(), copy.path() / e.path().filename());
  }
  auto idx =
      nlohmann::json::parse(testing::read_file(copy.path() / "model.safetensors.index.json"));
  idx["weight_map"].erase("model.layers.2.mlp.experts.3.up_proj.weight");
  testing::write_file(copy.path() / "model.safetensors.index.json", idx.dump());
  try {
    testing::load_cpu_model(copy.path());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.2.mlp.experts.3.up_proj.weight"),
              std::string::npos);
  }
  // A config that disagrees with the tensors: a shape error naming file and tensor.
  auto cfg = nlohmann::json::parse(testing::read_file(copy.path() / "config.json"));
  cfg["moe_intermediate_size"] = 32;
  testing::write_file(copy.path() / "config.json", cfg.dump());
  try {
    testing::load_cpu_model(copy.path());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(".safetensors: tensor 'model.layers.1.mlp.experts.0"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace ernie
