#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <set>

#include "backend/cpu/ops.h"
#include "common/check.h"
#include "common/rng.h"
#include "model/synthetic.h"
#include "test_util.h"

namespace ernie::model {
namespace {

using testing::TempDir;

// The shard file names listed in a checkpoint's index.
std::vector<std::string> shard_files(const std::filesystem::path& dir) {
  auto idx = nlohmann::json::parse(testing::read_file(dir / "model.safetensors.index.json"));
  std::set<std::string> files;
  for (auto& [name, file] : idx["weight_map"].items()) files.insert(file.get<std::string>());
  return {files.begin(), files.end()};
}

MakeModelOptions tiny(const std::filesystem::path& out, uint64_t seed) {
  MakeModelOptions o;
  o.out = out;
  o.seed = seed;
  return o;
}

TEST(MakeModel, ReleasedLayoutAndDtypes) {
  TempDir d;
  const ModelConfig c = make_model(tiny(d.path(), 5));
  Checkpoint ck(d.path());
  EXPECT_TRUE(std::filesystem::exists(d.path() / "model.safetensors.index.json"));
  EXPECT_GE(shard_files(d.path()).size(), 2u);  // always sharded
  const int64_t e = c.moe_num_experts, h = c.hidden_size;
  EXPECT_EQ(ck.get("model.layers.1.mlp.gate.weight", {e, h}).dtype(), DType::kF32);
  EXPECT_EQ(ck.get("model.layers.1.mlp.moe_statics.e_score_correction_bias", {1, e}).dtype(),
            DType::kF32);
  EXPECT_EQ(ck.get("model.layers.1.mlp.experts.15.down_proj.weight", {h, c.moe_intermediate_size})
                .dtype(),
            DType::kBF16);
  EXPECT_TRUE(ck.has("model.layers.1.mlp.shared_experts.up_proj.weight"));
  EXPECT_TRUE(ck.has("model.layers.0.mlp.gate_proj.weight"));  // layer 0 is dense
  EXPECT_FALSE(ck.has("lm_head.weight"));                      // tied
  EXPECT_EQ(ck.get("model.mtp_linear_proj.0.weight").shape(), (Shape{h, 2 * h}));
  EXPECT_TRUE(ck.has("model.mtp_block.0.mlp.down_proj.weight"));
  EXPECT_TRUE(ck.has("model.mtp_emb_norm.0.weight"));
  EXPECT_TRUE(ck.has("model.mtp_hidden_norm.0.weight"));
  // Exactly the declared tensors, nothing else.
  EXPECT_EQ(ck.names().size(), checkpoint_tensors(c, false).size());
}

TEST(MakeModel, DeterministicPerSeed) {
  TempDir a, b, c;
  make_model(tiny(a.path(), 7));
  make_model(tiny(b.path(), 7));
  make_model(tiny(c.path(), 8));
  for (const std::string& f : shard_files(a.path())) {
    EXPECT_EQ(testing::read_file(a.path() / f), testing::read_file(b.path() / f)) << f;
    EXPECT_NE(testing::read_file(a.path() / f), testing::read_file(c.path() / f)) << f;
  }
}

TEST(MakeModel, OverridesNoWeightsAndBadInput) {
  TempDir d;
  MakeModelOptions o = tiny(d.path(), 1);
  o.sets = {"tie_word_embeddings=false", "moe_num_shared_experts=0", "num_hidden_layers=3",
            "some_unknown_key=hello"};
  const ModelConfig c = make_model(o);
  EXPECT_FALSE(c.tie_word_embeddings);
  Checkpoint ck(d.path());
  EXPECT_TRUE(ck.has("lm_head.weight"));
  EXPECT_FALSE(ck.has("model.layers.1.mlp.shared_experts.up_proj.weight"));
  EXPECT_FALSE(ck.has("model.layers.3.input_layernorm.weight"));

  TempDir n;
  MakeModelOptions nw = tiny(n.path(), 1);
  nw.preset = "21b-a3b";
  nw.no_weights = true;
  EXPECT_EQ(make_model(nw).hidden_size, 2560);
  EXPECT_TRUE(std::filesystem::exists(n.path() / "config.json"));
  EXPECT_THROW(Checkpoint{n.path()}, Error);  // no tensors at all

  MakeModelOptions bad = tiny(d.path(), 1);
  bad.sets = {"moe_k=99"};
  EXPECT_THROW(make_model(bad), Error);
  bad.sets = {"noequals"};
  EXPECT_THROW(make_model(bad), Error);
}

TEST(MakeModel, ReleasedShapesOf300B) {
  const ModelConfig c = parse_config(preset_config("300b-a47b"));
  const auto specs = checkpoint_tensors(c, true);
  uint64_t bytes = 0;
  bool found_proj = false, found_head = false;
  for (const auto& s : specs) {
    bytes += s.nbytes();
    if (s.name == "model.mtp_linear_proj.0.weight") {
      found_proj = true;
      EXPECT_EQ(s.shape, (Shape{2 * 8192, 8192}));  // stored transposed in the release
    }
    found_head |= s.name == "lm_head.weight";
  }
  EXPECT_TRUE(found_proj);
  EXPECT_TRUE(found_head);
  // About 300B parameters (plus the MTP layer) in bf16.
  EXPECT_GT(bytes, 580e9);
  EXPECT_LT(bytes, 620e9);
}

TEST(MakeModel, Preset21BParameterCount) {
  const ModelConfig c = parse_config(preset_config("21b-a3b"));
  uint64_t params = 0;
  for (const auto& s : checkpoint_tensors(c, false)) {
    if (s.name.find("mtp") == std::string::npos) params += shape_numel(s.shape);
  }
  EXPECT_NEAR(static_cast<double>(params), 21.83e9, 0.05e9);
}

// The correction bias must be large enough to change which experts win, and the router must
// spread tokens over experts.
TEST(MakeModel, CorrectionBiasChangesSelection) {
  TempDir d;
  const ModelConfig c = make_model(tiny(d.path(), std::random_device{}()));
  Checkpoint ck(d.path());
  const int e = static_cast<int>(c.moe_num_experts), k = static_cast<int>(c.moe_k);
  const int64_t h = c.hidden_size;
  auto gate = ck.get("model.layers.1.mlp.gate.weight");
  auto biasv = ck.get("model.layers.1.mlp.moe_statics.e_score_correction_bias");
  std::vector<float> w(e * h), bias(e), zero(e, 0.0f);
  for (int64_t i = 0; i < e * h; ++i) w[i] = gate.at(i);
  for (int i = 0; i < e; ++i) bias[i] = biasv.at(i);
  Rng rng(std::random_device{}());
  int changed = 0;
  std::set<int> used;
  const int tokens = 400;
  for (int t = 0; t < tokens; ++t) {
    std::vector<float> x(h), logits(e);
    for (auto& v : x) v = static_cast<float>(rng.normal());  // unit RMS, like a normed input
    backend::cpu::gemm_xwt(logits.data(), x.data(), w.data(), 1, e, h);
    std::vector<int32_t> ids_b(k), ids_u(k);
    std::vector<float> wb(k), wu(k);
    backend::cpu::route_token(logits.data(), bias.data(), e, k, 1e-12f, ids_b.data(), wb.data());
    backend::cpu::route_token(logits.data(), zero.data(), e, k, 1e-12f, ids_u.data(), wu.data());
    std::set<int> sb(ids_b.begin(), ids_b.end()), su(ids_u.begin(), ids_u.end());
    changed += sb != su;
    used.insert(ids_b.begin(), ids_b.end());
  }
  std::printf("bias changed the selection of %d of %d tokens\n", changed, tokens);
  EXPECT_GT(changed, tokens / 10) << "bias changed the selection of only " << changed << " tokens";
  EXPECT_LT(changed, tokens * 95 / 100) << "the bias alone decides the routing";
  EXPECT_EQ(static_cast<int>(used.size()), e);
}

}  // namespace
}  // namespace ernie::model
