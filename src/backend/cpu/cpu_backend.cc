// The CPU reference backend: f32 activations, weights widened to f32 at load (bf16 -> f32 is
// exact), f32 KV cache. Exact first; OpenMP over the output dimension for speed.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <deque>
#include <limits>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/ops.h"
#include "backend/cpu/sampler.h"
#include "common/check.h"
#include "common/rng.h"

namespace ernie::backend {
namespace {

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int num_threads) {
    if (num_threads > 0) omp_set_num_threads(num_threads);
  }
  std::string name() const override { return "cpu"; }
  DType activation_dtype() const override { return DType::kF32; }

  Tensor load_weight(const HostTensor& src) override {
    int64_t n = 1;
    for (int64_t d : src.shape) n *= d;
    auto& buf = weights_.emplace_back(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) buf[i] = load_as_float(src.data, src.dtype, i);
    return Tensor{buf.data(), DType::kF32, src.shape};
  }

  Tensor random_weight(const Shape& shape, DType dtype, const RandomInit& init,
                       uint64_t seed) override {
    (void)dtype;  // kept in f32 like every cpu weight, rounded through bf16 like a checkpoint
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    auto& buf = weights_.emplace_back(static_cast<size_t>(n));
    Rng rng(seed);
    for (auto& v : buf) {
      const double x = init.uniform ? rng.uniform(init.a, init.b) : init.a + init.b * rng.normal();
      v = bf16_to_float(float_to_bf16(static_cast<float>(x)));
    }
    return Tensor{buf.data(), DType::kF32, shape};
  }

  int64_t weight_bytes() const override {
    int64_t b = 0;
    for (const auto& w : weights_) b += static_cast<int64_t>(w.size() * sizeof(float));
    return b;
  }

  void configure_attention(const AttentionConfig& cfg) override {
    require(cfg.num_heads > 0 && cfg.num_kv_heads > 0 && cfg.num_heads % cfg.num_kv_heads == 0 &&
                cfg.head_dim > 0 && cfg.head_dim % 2 == 0,
            "invalid attention configuration");
    attn_ = cfg;
  }

  void allocate_kv_cache(int num_layers, int64_t num_blocks, int block_size) override {
    require(attn_.num_heads > 0, "configure_attention must precede allocate_kv_cache");
    require(num_blocks > 0 && block_size > 0, "KV cache needs at least one block");
    num_blocks_ = num_blocks;
    block_size_ = block_size;
    const size_t per_layer =
        static_cast<size_t>(num_blocks) * block_size * attn_.num_kv_heads * attn_.head_dim;
    k_cache_.assign(num_layers,
                    std::vector<float>(per_layer, std::numeric_limits<float>::quiet_NaN()));
    v_cache_.assign(num_layers,
                    std::vector<float>(per_layer, std::numeric_limits<float>::quiet_NaN()));
  }
  int64_t num_kv_blocks() const override { return num_blocks_; }
  DType kv_dtype() const override { return DType::kF32; }
  int kv_block_size() const override { return block_size_; }

  void enable_profile(bool on) override { timer_.enable(on); }
  void mark(Stage s) override { timer_.mark(s); }
  StageProfile take_profile() override { return timer_.take(); }

  void begin_step(const StepInput& step) override {
    timer_.end_step();  // a step that was not sampled
    validate_step(step, num_blocks_, block_size_, std::numeric_limits<int32_t>::max());
    step_ = &step;
    if (!step.token_feed.empty()) {  // ids drawn by the last sample_async
      fed_step_ = step;
      for (const auto& [i, r] : step.token_feed) {
        require_parts(r < static_cast<int32_t>(fed_ids_.size()), "token feed row ", r,
                      " past the last sample's ", fed_ids_.size(), " rows");
        fed_step_.token_ids[i] = fed_ids_[r];
      }
      step_ = &fed_step_;
    }
    scratch_.clear();
  }

  Tensor scratch(const Shape& shape, DType dtype) override {
    check(dtype == DType::kF32, "cpu scratch is f32");
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    // Poisoned so a read of an unwritten element shows up as NaN in tests.
    auto& buf =
        scratch_.emplace_back(static_cast<size_t>(n), std::numeric_limits<float>::quiet_NaN());
    return Tensor{buf.data(), DType::kF32, shape};
  }

  void embedding(Tensor out, const Tensor& table) override {
    const int64_t h = table.dim(1);
    for (int32_t t = 0; t < step_->num_tokens(); ++t) {
      const int32_t id = step_->token_ids[t];
      require_parts(id < table.dim(0), "token id ", id, " outside the embedding table");
      std::memcpy(out.as<float>() + t * h, table.as<float>() + id * h, h * sizeof(float));
    }
  }

  void rms_norm(Tensor out, const Tensor& x, const Tensor& weight, float eps) override {
    cpu::rms_norm(out.as<float>(), x.as<float>(), weight.as<float>(), x.dim(0), x.dim(1), eps);
  }

  void add_rms_norm(Tensor out, Tensor residual, const Tensor& x, const Tensor& weight,
                    float eps) override {
    float* r = residual.as<float>();
    const float* xp = x.as<float>();
    for (int64_t i = 0; i < residual.numel(); ++i) r[i] += xp[i];
    cpu::rms_norm(out.as<float>(), r, weight.as<float>(), residual.dim(0), residual.dim(1), eps);
  }

  void linear(Tensor out, const Tensor& x, const Tensor& w) override {
    check(x.dim(1) == w.dim(1) && out.dim(0) == x.dim(0) && out.dim(1) == w.dim(0),
          "linear shape mismatch");
    cpu::gemm_xwt(out.as<float>(), x.as<float>(), w.as<float>(), x.dim(0), w.dim(0), x.dim(1));
  }

  void rope_store_kv(Tensor qkv, int layer) override {
    const int d = attn_.head_dim, nh = attn_.num_heads, nkv = attn_.num_kv_heads;
    const int64_t row = static_cast<int64_t>(nh + 2 * nkv) * d, kv = static_cast<int64_t>(nkv) * d;
    for (int32_t t = 0; t < step_->num_tokens(); ++t) {
      float* q = qkv.as<float>() + t * row;
      float* k = q + nh * d;
      const float* v = k + kv;
      cpu::rope_interleaved(q, nh, d, step_->positions[t], attn_.rope_theta);
      cpu::rope_interleaved(k, nkv, d, step_->positions[t], attn_.rope_theta);
      const int64_t slot = step_->slot_mapping[t];
      std::memcpy(k_cache_[layer].data() + slot * kv, k, kv * sizeof(float));
      std::memcpy(v_cache_[layer].data() + slot * kv, v, kv * sizeof(float));
    }
  }

  void attention(Tensor out, const Tensor& qkv, int layer) override {
    const int d = attn_.head_dim, nh = attn_.num_heads, nkv = attn_.num_kv_heads;
    const int group = nh / nkv;
    const int64_t row = static_cast<int64_t>(nh + 2 * nkv) * d, kv = static_cast<int64_t>(nkv) * d;
    const StepInput& s = *step_;
    const float* kc = k_cache_[layer].data();
    const float* vc = v_cache_[layer].data();
    // token -> sequence
    std::vector<int32_t> seq_of(s.num_tokens());
    for (int32_t q = 0; q < s.num_seqs(); ++q) {
      for (int32_t i = s.query_start[q]; i < s.query_start[q + 1]; ++i) seq_of[i] = q;
    }
#pragma omp parallel for collapse(2) schedule(dynamic)
    for (int32_t t = 0; t < s.num_tokens(); ++t) {
      for (int h = 0; h < nh; ++h) {
        const int32_t q = seq_of[t];
        const int32_t* table =
            s.block_tables.data() + static_cast<int64_t>(q) * s.max_blocks_per_seq;
        const float* qv = qkv.as<float>() + t * row + static_cast<int64_t>(h) * d;
        const int kvh = h / group;
        const int32_t n_keys = s.positions[t] + 1;  // causal: keys at positions <= this token's
        std::vector<float> scores(n_keys);
        float mx = -std::numeric_limits<float>::infinity();
        for (int32_t j = 0; j < n_keys; ++j) {
          const int64_t slot =
              static_cast<int64_t>(table[j / block_size_]) * block_size_ + j % block_size_;
          const float* kp = kc + slot * kv + static_cast<int64_t>(kvh) * d;
          float dot = 0.0f;
          for (int i = 0; i < d; ++i) dot += qv[i] * kp[i];
          scores[j] = dot * attn_.scale;
          mx = std::max(mx, scores[j]);
        }
        double sum = 0.0;
        for (int32_t j = 0; j < n_keys; ++j) {
          scores[j] = std::exp(scores[j] - mx);
          sum += scores[j];
        }
        std::vector<double> acc(d, 0.0);
        for (int32_t j = 0; j < n_keys; ++j) {
          const int64_t slot =
              static_cast<int64_t>(table[j / block_size_]) * block_size_ + j % block_size_;
          const float* vp = vc + slot * kv + static_cast<int64_t>(kvh) * d;
          for (int i = 0; i < d; ++i) acc[i] += static_cast<double>(scores[j]) * vp[i];
        }
        float* o = out.as<float>() + static_cast<int64_t>(t) * nh * d + static_cast<int64_t>(h) * d;
        for (int i = 0; i < d; ++i) o[i] = static_cast<float>(acc[i] / sum);
      }
    }
  }

  void silu_mul(Tensor out, const Tensor& gate_up) override {
    cpu::silu_mul(out.as<float>(), gate_up.as<float>(), gate_up.dim(0), gate_up.dim(1) / 2);
  }

  void moe(Tensor out, const Tensor& x, const MoeWeights& w) override {
    const int64_t tokens = x.dim(0), hidden = x.dim(1);
    const int num_experts = static_cast<int>(w.router.dim(0));
    const int64_t inter = w.experts_down.dim(2);
    const int k = w.top_k;
    // 1. router in f32, then routing per token.
    std::vector<float> logits(tokens * num_experts);
    cpu::gemm_xwt(logits.data(), x.as<float>(), w.router.as<float>(), tokens, num_experts, hidden);
    std::vector<int32_t> ids(tokens * k);
    std::vector<float> wts(tokens * k);
    for (int64_t t = 0; t < tokens; ++t) {
      cpu::route_token(logits.data() + t * num_experts, w.router_bias.as<float>(), num_experts, k,
                       w.norm_min, ids.data() + t * k, wts.data() + t * k);
    }
    // 2. per expert: gather its tokens, SwiGLU, scatter-add weighted rows.
    timer_.mark(Stage::kMoeExperts);
    float* o = out.as<float>();
    std::fill(o, o + tokens * hidden, 0.0f);
    std::vector<float> xg, gu, act, y;
    for (int e = 0; e < num_experts; ++e) {
      std::vector<int64_t> rows;
      std::vector<float> rw;
      for (int64_t i = 0; i < tokens * k; ++i) {
        if (ids[i] == e) {
          rows.push_back(i / k);
          rw.push_back(wts[i]);
        }
      }
      if (rows.empty()) continue;
      const int64_t m = static_cast<int64_t>(rows.size());
      xg.resize(m * hidden);
      for (int64_t r = 0; r < m; ++r) {
        std::memcpy(xg.data() + r * hidden, x.as<float>() + rows[r] * hidden,
                    hidden * sizeof(float));
      }
      gu.resize(m * 2 * inter);
      act.resize(m * inter);
      y.resize(m * hidden);
      cpu::gemm_xwt(gu.data(), xg.data(), w.experts_gate_up.as<float>() + e * 2 * inter * hidden, m,
                    2 * inter, hidden);
      cpu::silu_mul(act.data(), gu.data(), m, inter);
      cpu::gemm_xwt(y.data(), act.data(), w.experts_down.as<float>() + e * hidden * inter, m,
                    hidden, inter);
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t i = 0; i < hidden; ++i) o[rows[r] * hidden + i] += rw[r] * y[r * hidden + i];
      }
    }
    // 3. shared experts on every token.
    if (!w.shared_gate_up.empty()) {
      timer_.mark(Stage::kMoeShared);
      const int64_t si = w.shared_down.dim(1);
      gu.resize(tokens * 2 * si);
      act.resize(tokens * si);
      y.resize(tokens * hidden);
      cpu::gemm_xwt(gu.data(), x.as<float>(), w.shared_gate_up.as<float>(), tokens, 2 * si, hidden);
      cpu::silu_mul(act.data(), gu.data(), tokens, si);
      cpu::gemm_xwt(y.data(), act.data(), w.shared_down.as<float>(), tokens, hidden, si);
      for (int64_t i = 0; i < tokens * hidden; ++i) o[i] += y[i];
    }
  }

  void gather_logit_rows(Tensor out, const Tensor& x) override {
    const int64_t cols = x.dim(1);
    for (size_t r = 0; r < step_->logits_indices.size(); ++r) {
      std::memcpy(out.as<float>() + r * cols, x.as<float>() + step_->logits_indices[r] * cols,
                  cols * sizeof(float));
    }
  }

  void to_host(const Tensor& src, float* dst) override {
    std::memcpy(dst, src.data, src.numel() * sizeof(float));
  }

  std::vector<SampledToken> sample(const Tensor& logits,
                                   const std::vector<SamplingRow>& rows) override {
    check(logits.dim(0) == static_cast<int64_t>(rows.size()), "one sampling row per logits row");
    timer_.mark(Stage::kSampling);
    const int64_t vocab = logits.dim(1);
    std::vector<SampledToken> out(rows.size());
#pragma omp parallel for schedule(dynamic) if (rows.size() > 1)
    for (size_t r = 0; r < rows.size(); ++r) {
      out[r] =
          cpu::sample_row({logits.as<float>() + r * vocab, static_cast<size_t>(vocab)}, rows[r]);
    }
    timer_.end_step();
    return out;
  }

 private:
  AttentionConfig attn_;
  int64_t num_blocks_ = 0;
  int block_size_ = 0;
  std::vector<std::vector<float>> k_cache_, v_cache_;
  std::deque<std::vector<float>> weights_;
  std::deque<std::vector<float>> scratch_;
  const StepInput* step_ = nullptr;
  StepInput fed_step_;  // the step with its fed ids filled in, when it has a token feed
  HostStageTimer timer_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int num_threads) {
  return std::make_unique<CpuBackend>(num_threads);
}

}  // namespace ernie::backend
