// Host time per engine step (scheduling, building the step, the model's host-side work,
// sampling rows, stop checks, detokenizing, outputs) with a backend whose ops do nothing: the
// time a GPU would sit idle between steps if none of it overlapped. 21B config, decode batches
// of 1 to 256 after prompts of 1000 tokens, and the seed benchmark's 16 x 8000.
// Usage: ernie_engine_bench TOKENIZER_MODEL_DIR
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <exception>
#include <vector>

#include "backend/backend.h"
#include "model/ernie45.h"
#include "model/synthetic.h"
#include "runtime/engine.h"
#include "tokenizer/tokenizer.h"

namespace ernie {
namespace {

using backend::Tensor;

// Every op is a no-op on shape-only tensors; sampling answers token 100 for every row.
class NullBackend final : public backend::Backend {
 public:
  std::string name() const override { return "null"; }
  DType activation_dtype() const override { return DType::kBF16; }
  Tensor load_weight(const backend::HostTensor& s) override { return {dummy(), s.dtype, s.shape}; }
  Tensor random_weight(const backend::Shape& s, DType d, const backend::RandomInit&,
                       uint64_t) override {
    return {dummy(), d, s};
  }
  int64_t weight_bytes() const override { return 0; }
  void configure_attention(const backend::AttentionConfig&) override {}
  void allocate_kv_cache(int, int64_t blocks, int block) override {
    blocks_ = blocks;
    block_ = block;
  }
  DType kv_dtype() const override { return DType::kBF16; }
  int64_t num_kv_blocks() const override { return blocks_; }
  int kv_block_size() const override { return block_; }
  void begin_step(const backend::StepInput& s) override {
    backend::validate_step(s, blocks_, block_, INT32_MAX);  // as the real backends do
  }
  Tensor scratch(const backend::Shape& s, DType d) override { return {dummy(), d, s}; }
  void enable_profile(bool) override {}
  void mark(backend::Stage) override {}
  backend::StageProfile take_profile() override { return {}; }
  void embedding(Tensor, const Tensor&) override {}
  void rms_norm(Tensor, const Tensor&, const Tensor&, float) override {}
  void add_rms_norm(Tensor, Tensor, const Tensor&, const Tensor&, float) override {}
  void linear(Tensor, const Tensor&, const Tensor&) override {}
  void rope_store_kv(Tensor, int) override {}
  void attention(Tensor, const Tensor&, int) override {}
  void silu_mul(Tensor, const Tensor&) override {}
  void moe(Tensor, const Tensor&, const backend::MoeWeights&) override {}
  void gather_logit_rows(Tensor, const Tensor&) override {}
  void to_host(const Tensor&, float*) override {}
  std::vector<backend::SampledToken> sample(
      const Tensor&, const std::vector<backend::SamplingRow>& rows) override {
    std::vector<backend::SampledToken> out(rows.size());
    for (auto& t : out) t.id = 100;
    return out;
  }

 private:
  static void* dummy() {
    static char byte;
    return &byte;
  }
  int64_t blocks_ = 0;
  int block_ = 16;
};

int run(const char* tokenizer_dir) {
  const model::ModelConfig cfg = model::parse_config(model::preset_config("21b-a3b"));
  NullBackend be;
  model::Ernie45 m(cfg, model::dummy_weights(cfg, be), be);
  std::shared_ptr<const tokenizer::Tokenizer> tok = tokenizer::Tokenizer::load(tokenizer_dir);
  std::printf("%8s %8s %14s %14s %14s\n", "batch", "prompt", "median us", "p90 us", "max us");
  for (auto [batch, prompt_len] :
       {std::pair{1, 1000}, {16, 1000}, {64, 1000}, {256, 1000}, {16, 8000}}) {
    runtime::EngineConfig ec;
    ec.kv_cache_memory = 40ll << 30;
    ec.max_model_len = 9216;
    runtime::Engine engine(m, tok, ec);
    runtime::SamplingParams p;
    p.max_tokens = 200;
    p.ignore_eos = true;
    p.temperature = 0.8f;
    for (int r = 0; r < batch; ++r) {
      std::vector<int32_t> prompt(prompt_len);
      for (int i = 0; i < prompt_len; ++i) prompt[i] = 3 + (r * 131 + i * 7) % 4000;
      engine.add_request(std::to_string(r), prompt, p);
    }
    // Prefill takes the first ceil(prompt tokens / 8192) steps (+1 for a chunk boundary);
    // the rest are decode steps of the whole batch.
    const int prefill_steps =
        (1000 * batch + ec.max_num_batched_tokens - 1) / ec.max_num_batched_tokens + 1;
    std::vector<double> decode_us;
    for (int step = 0; engine.has_unfinished(); ++step) {
      const auto t0 = std::chrono::steady_clock::now();
      engine.step();
      const double us =
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
      if (step >= prefill_steps) decode_us.push_back(us);
    }
    std::sort(decode_us.begin(), decode_us.end());
    const size_t n = decode_us.size();
    std::printf("%8d %8d %14.1f %14.1f %14.1f\n", batch, prompt_len, decode_us[n / 2],
                decode_us[n * 9 / 10], decode_us.back());
  }
  return 0;
}

}  // namespace
}  // namespace ernie

int main(int argc, char** argv) {
  if (argc != 2 || argv[1][0] == '-') {
    std::fprintf(stderr,
                 "usage: ernie_engine_bench TOKENIZER_MODEL_DIR\n"
                 "  (a model directory with a tokenizer, e.g. from `ernie make-model --preset "
                 "tiny`)\n");
    return 2;
  }
  try {
    return ernie::run(argv[1]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ernie_engine_bench: %s\n", e.what());
    return 1;
  }
}
