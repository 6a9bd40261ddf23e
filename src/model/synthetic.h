// Synthetic checkpoints in the released ERNIE-4.5 layout (`ernie make-model`): config.json and
// sharded safetensors with the released tensor names and dtypes, MTP tensors included, filled
// with deterministic random values (same bytes on every machine for a given seed).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "model/config.h"
#include "model/safetensors.h"

namespace ernie::model {

// The config.json of a preset: "tiny", "21b-a3b" or "300b-a47b".
nlohmann::json preset_config(const std::string& preset);

// Applies "key=value" overrides; value is parsed as JSON when it is valid JSON, else taken as
// a string. Throws naming the override when malformed.
void apply_overrides(nlohmann::json& config, const std::vector<std::string>& sets);

// Every tensor of a released checkpoint of this config, in file order. The 300B release stores
// mtp_linear_proj transposed ([2H, H]); `mtp_proj_transposed` reproduces that.
std::vector<TensorSpec> checkpoint_tensors(const ModelConfig& c, bool mtp_proj_transposed);

struct MakeModelOptions {
  std::string preset = "tiny";
  std::filesystem::path out;
  uint64_t seed = 0;
  bool no_weights = false;
  std::vector<std::string> sets;
  uint64_t max_shard_bytes = 5ull << 30;
};

// Writes the checkpoint; logs progress. Returns the validated config.
ModelConfig make_model(const MakeModelOptions& opts);

// How make-model draws tensor `name` (also used by `--load-format dummy`): scales chosen so a
// random model behaves like a trained one where tests need it (unit-RMS activations, peaked
// next-token distributions, a correction bias that changes which experts win).
backend::RandomInit synthetic_init(const std::string& name, const Shape& shape,
                                   const ModelConfig& c);

// Fills `out` with tensor `spec`'s synthetic values for `seed` (exposed for tests).
void fill_synthetic(const TensorSpec& spec, const ModelConfig& c, uint64_t seed,
                    std::span<std::byte> out);

}  // namespace ernie::model
