// The CUDA backend's ops against the CPU reference backend through the Backend interface:
// paged attention (prefill, chunked prefill over cached context, decode with and without key
// splits, GQA/MQA/MHA), the MoE block, and sampling with every parameter. Fresh random inputs
// each run; device outputs are poisoned first.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>

#include "../unit/test_util.h"
#include "backend/backend.h"
#include "backend/cpu/sampler.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_check.h"
#include "backend/cuda/device.h"
#include "backend/cuda/expert_layout.h"
#include "common/dtype.h"
#include "common/rng.h"
#include "runtime/engine.h"

namespace ernie::backend {
namespace {

struct HostData {
  std::vector<uint16_t> bf16;
  std::vector<float> f32;
  Shape shape;
  DType dtype;
  HostTensor host() const {
    return HostTensor{dtype == DType::kBF16 ? static_cast<const void*>(bf16.data())
                                            : static_cast<const void*>(f32.data()),
                      dtype, shape};
  }
};

HostData random_bf16(Rng& rng, Shape shape, double scale) {
  HostData d{{}, {}, shape, DType::kBF16};
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  d.bf16.resize(n);
  for (auto& v : d.bf16) v = float_to_bf16(static_cast<float>(scale * rng.normal()));
  return d;
}
HostData random_f32(Rng& rng, Shape shape, double lo, double hi) {
  HostData d{{}, {}, shape, DType::kF32};
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  d.f32.resize(n);
  for (auto& v : d.f32) v = static_cast<float>(rng.uniform(lo, hi));
  return d;
}

// A device tensor full of NaN (bf16 0xffff).
Tensor poisoned_gpu(Backend& gpu, Shape shape) {
  std::vector<uint16_t> nan(static_cast<size_t>(std::accumulate(shape.begin(), shape.end(),
                                                                int64_t{1}, std::multiplies<>())),
                            0xffff);
  return gpu.load_weight(HostTensor{nan.data(), DType::kBF16, shape});
}

// Random repetition, frequency and presence penalties over 300 prompt and 50 output tokens.
void add_random_penalties(Rng& rng, SamplingRow& p, int vocab, std::vector<int32_t>& prompt,
                          std::vector<int32_t>& output) {
  p.repetition_penalty = static_cast<float>(rng.uniform(0.8, 1.6));
  p.frequency_penalty = static_cast<float>(rng.uniform(-1, 1));
  p.presence_penalty = static_cast<float>(rng.uniform(-1, 1));
  for (int i = 0; i < 300; ++i) prompt.push_back(static_cast<int32_t>(rng.below(vocab)));
  for (int i = 0; i < 50; ++i) output.push_back(static_cast<int32_t>(rng.below(200)));
  p.prompt_tokens = &prompt;
  p.output_tokens = &output;
}

// Five random logit biases (into `bias`, which the row then points at) and 20 banned ids.
void add_random_bias_and_bans(Rng& rng, SamplingRow& p, int vocab,
                              std::vector<std::pair<int32_t, float>>& bias) {
  for (int i = 0; i < 5; ++i) {
    bias.push_back(
        {static_cast<int32_t>(rng.below(vocab)), static_cast<float>(rng.uniform(-5, 8))});
  }
  p.logit_bias = &bias;
  for (int i = 0; i < 20; ++i) p.banned.push_back(static_cast<int32_t>(rng.below(vocab)));
}

std::vector<float> gpu_values(const Tensor& t) {
  std::vector<float> out(t.numel());
  if (t.dtype == DType::kF32) {
    ERNIE_CUDA_CHECK(cudaMemcpy(out.data(), t.data, out.size() * 4, cudaMemcpyDeviceToHost));
  } else {
    std::vector<uint16_t> raw(t.numel());
    ERNIE_CUDA_CHECK(cudaMemcpy(raw.data(), t.data, raw.size() * 2, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < raw.size(); ++i) out[i] = bf16_to_float(raw[i]);
  }
  return out;
}
std::vector<float> cpu_values(const Tensor& t) {
  return std::vector<float>(t.as<float>(), t.as<float>() + t.numel());
}

// Errors of `got` against `ref`: the largest |a - b| relative to the RMS of the reference, and
// the relative L2 norm of the difference. NaN anywhere counts as infinite.
struct Error {
  double max_rel = 0.0, l2_rel = 0.0;
};
Error compare(const std::vector<float>& got, const std::vector<float>& ref, const char* what) {
  EXPECT_EQ(got.size(), ref.size());
  double ss = 0.0, diff = 0.0, worst = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(got[i])) {
      return {std::numeric_limits<double>::infinity(), std::numeric_limits<double>::infinity()};
    }
    const double d = static_cast<double>(got[i]) - ref[i];
    ss += static_cast<double>(ref[i]) * ref[i];
    diff += d * d;
    worst = std::max(worst, std::abs(d));
  }
  const double rms = std::sqrt(ss / std::max<size_t>(ref.size(), 1)) + 1e-30;
  Error e{worst / rms, std::sqrt(diff / (ss + 1e-30))};
  std::printf("[ compare  ] %s: max |diff| / rms %.4f, relative L2 %.5f\n", what, e.max_rel,
              e.l2_rel);
  return e;
}

// bf16 activations against an f32 reference: about 2^-8 relative per rounding.
void expect_bf16_close(const std::vector<float>& got, const std::vector<float>& ref,
                       const char* what, double l2 = 0.01, double max_rel = 0.08) {
  const Error e = compare(got, ref, what);
  EXPECT_LT(e.l2_rel, l2) << what;
  EXPECT_LT(e.max_rel, max_rel) << what;
}

class CudaBackendTest : public ::testing::Test {
 public:
  // A tiny synthetic checkpoint with a fresh seed in `dir`.
  void make_tiny_model(const ernie::testing::TempDir& dir) {
    model::MakeModelOptions o;
    o.out = dir.path();
    o.seed = rng.below(1000);
    model::make_model(o);
  }
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << "no CUDA device";
    cpu = make_cpu_backend();
    gpu = make_cuda_backend(0);
  }
  std::unique_ptr<Backend> cpu, gpu;
  Rng rng{std::random_device{}()};
};

struct SeqSpec {
  int cached;  // tokens already in the cache
  int fresh;   // tokens of this step
};

// Fills both caches with `cached` tokens per sequence (random q/k/v through rope_store_kv), then
// runs a step of the fresh tokens and compares the attention outputs.
void run_attention_case(CudaBackendTest& t, const char* name, const AttentionConfig& cfg,
                        int block_size, const std::vector<SeqSpec>& seqs) {
  const int d = cfg.head_dim, row = (cfg.num_heads + 2 * cfg.num_kv_heads) * d;
  int64_t blocks_needed = 0;
  int max_blocks = 1;
  for (const auto& s : seqs) {
    const int b = (s.cached + s.fresh + block_size - 1) / block_size;
    blocks_needed += b;
    max_blocks = std::max(max_blocks, b);
  }
  const int64_t num_blocks = blocks_needed + 7;
  std::vector<int32_t> perm(num_blocks);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937(static_cast<unsigned>(t.rng.next())));
  std::vector<std::vector<int32_t>> tables;
  size_t next = 0;
  for (const auto& s : seqs) {
    const int b = (s.cached + s.fresh + block_size - 1) / block_size;
    tables.emplace_back(perm.begin() + next, perm.begin() + next + b);
    next += b;
  }
  for (Backend* be : {t.cpu.get(), t.gpu.get()}) {
    be->configure_attention(cfg);
    be->allocate_kv_cache(1, num_blocks, block_size);
  }
  // Builds the step of tokens [from, to) of every sequence with to > from.
  auto make_step = [&](bool fresh_part) {
    StepInput st;
    st.max_blocks_per_seq = max_blocks;
    st.query_start.push_back(0);
    for (size_t q = 0; q < seqs.size(); ++q) {
      const int from = fresh_part ? seqs[q].cached : 0;
      const int to = fresh_part ? seqs[q].cached + seqs[q].fresh : seqs[q].cached;
      if (to <= from) continue;
      for (int p = from; p < to; ++p) {
        st.token_ids.push_back(0);
        st.positions.push_back(p);
        st.slot_mapping.push_back(static_cast<int64_t>(tables[q][p / block_size]) * block_size +
                                  p % block_size);
      }
      st.query_start.push_back(static_cast<int32_t>(st.token_ids.size()));
      st.context_lens.push_back(to);
      std::vector<int32_t> tb(max_blocks, -1);
      std::copy(tables[q].begin(), tables[q].end(), tb.begin());
      st.block_tables.insert(st.block_tables.end(), tb.begin(), tb.end());
    }
    return st;
  };
  const StepInput fill = make_step(false);
  if (fill.num_tokens() > 0) {
    const HostData qkv = random_bf16(t.rng, {fill.num_tokens(), row}, 1.0);
    for (Backend* be : {t.cpu.get(), t.gpu.get()}) {
      be->begin_step(fill);
      be->rope_store_kv(be->load_weight(qkv.host()), 0);
    }
  }
  const StepInput step = make_step(true);
  const HostData qkv = random_bf16(t.rng, {step.num_tokens(), row}, 1.0);
  t.cpu->begin_step(step);
  Tensor c_qkv = t.cpu->load_weight(qkv.host());
  Tensor c_out = t.cpu->scratch({step.num_tokens(), cfg.num_heads * d}, DType::kF32);
  t.cpu->rope_store_kv(c_qkv, 0);
  t.cpu->attention(c_out, c_qkv, 0);
  t.gpu->begin_step(step);
  Tensor g_qkv = t.gpu->load_weight(qkv.host());
  Tensor g_out = poisoned_gpu(*t.gpu, {step.num_tokens(), cfg.num_heads * d});
  t.gpu->rope_store_kv(g_qkv, 0);
  t.gpu->attention(g_out, g_qkv, 0);
  ERNIE_CUDA_CHECK(cudaDeviceSynchronize());
  expect_bf16_close(gpu_values(g_out), cpu_values(c_out), name);
}

TEST_F(CudaBackendTest, AttentionMatchesCpu) {
  struct Case {
    const char* name;
    AttentionConfig cfg;
    int block_size;
    std::vector<SeqSpec> seqs;
  };
  auto cfg = [](int h, int kv, int d) {
    return AttentionConfig{h, kv, d, 500000.0, static_cast<float>(1.0 / std::sqrt(d))};
  };
  std::vector<Case> cases = {
      {"prefill 21B shape", cfg(20, 4, 128), 16, {{0, 1}, {0, 17}, {0, 100}, {0, 300}}},
      {"chunked prefill over cached context", cfg(20, 4, 128), 16, {{200, 37}, {5, 64}, {0, 9}}},
      {"decode, long contexts (key splits)", cfg(20, 4, 128), 16, {{3000, 1}, {1500, 1}}},
      {"decode, many sequences", cfg(20, 4, 128), 16, std::vector<SeqSpec>(150, SeqSpec{300, 1})},
      // The TMA decode kernel over every cache block size it takes (8-64 keys: one to eight
      // blocks a 64-key tile), contexts of many tiles a split and partial last tiles.
      {"decode d128, block 8", cfg(20, 4, 128), 8, {{2000, 1}, {333, 1}, {64, 1}}},
      {"decode d128, block 32", cfg(20, 4, 128), 32, {{1800, 1}, {129, 1}, {31, 1}}},
      {"decode d128, block 64", cfg(20, 4, 128), 64, {{2500, 1}, {63, 1}, {700, 1}}},
      {"decode 300B shape", cfg(64, 8, 128), 16, {{5000, 1}, {1000, 1}, {17, 1}}},
      // Decode with key splits on the cp.async kernel (its last split of a tile merges them),
      // tiles with different numbers of splits that hold keys.
      {"decode d64, key splits", cfg(16, 2, 64), 32, {{1000, 1}, {77, 1}, {2500, 1}}},
      {"decode d48 block 5, key splits", cfg(4, 4, 48), 5, {{700, 1}, {1300, 1}, {2, 1}}},
      {"mixed decode and prefill", cfg(20, 4, 128), 16, {{2000, 1}, {64, 40}, {0, 70}, {700, 1}}},
      // Leading decodes (key splits among them) before a prompt, and before a chunk with a
      // long context (its keys split).
      {"decodes, then a prompt", cfg(20, 4, 128), 16, {{3000, 1}, {1500, 1}, {200, 1}, {0, 300}}},
      {"a decode, then a chunk after a long context", cfg(20, 4, 128), 16, {{2500, 1}, {4000, 20}}},
      {"300B shape", cfg(64, 8, 128), 16, {{0, 33}, {900, 1}}},
      {"MHA d48 block 5", cfg(4, 4, 48), 5, {{0, 23}, {40, 3}, {100, 1}}},
      {"MQA d32", cfg(4, 1, 32), 3, {{0, 50}, {20, 1}, {600, 2}}},
      {"d64 GQA", cfg(16, 2, 64), 32, {{1000, 1}, {0, 129}}},
      {"short prompts in 16-row tiles", cfg(4, 2, 48), 16, {{0, 4}, {0, 5}, {3, 2}, {40, 8}}},
      {"short prompts, 21B shape", cfg(20, 4, 128), 16, {{0, 2}, {0, 3}, {100, 1}}},
      {"prefill chunk after a long context (key splits)", cfg(20, 4, 128), 16, {{4000, 20}}},
      {"d128 prefill, block 7", cfg(20, 4, 128), 7, {{0, 150}, {300, 33}}},
      {"d128 prefill, block 8", cfg(20, 4, 128), 8, {{0, 150}, {301, 33}}},
      {"d128 prefill, block 64", cfg(64, 8, 128), 64, {{0, 90}, {130, 70}, {3, 1}}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    run_attention_case(*this, c.name, c.cfg, c.block_size, c.seqs);
  }
}

TEST_F(CudaBackendTest, MoeMatchesCpu) {
  struct Case {
    int tokens, hidden, experts, k, inter, shared_inter;
  };
  // Every M-block size (moe_block_m): 16-row tiles for up to 8 pairs per expert, 32-row up to
  // 32 (64-row ones up to 64 unless ERNIE_MOE_WIDE_SWAP=0), 128-row wgmma tiles beyond (also with
  // reductions and widths that leave partial tiles: hidden 160, intermediate 96); the 21B shape all
  // three ways. Up to 8 tokens, shared experts of a whole number of routed experts' sizes run
  // folded into the routed GEMMs (1, 5 and 8 tokens; 8: three folded experts); 160 over 96 cannot
  // (side stream), nor can 37, 200 and 700 tokens (side stream, side stream, one stream with the
  // wgmma GEMM). 64 tokens over an intermediate size of 512: 16-row tiles, too many for one wave of
  // the wide ones; 37 tokens over hidden 160 and intermediate 96: 32-row tiles with partial output
  // and reduction tiles; 64 tokens over hidden 1024 and intermediate 640: 16-row tiles with at
  // least five reduction tiles in both GEMMs. Hidden 8192 (the 300B model's): the combine's widest
  // rows. 1500 tokens over 8 experts: ~9 wgmma M-blocks an expert, so pairs of blocks of one
  // expert and pairs across two experts or beside padding (ERNIE_WG_MULTICAST), with partial
  // output tiles in both GEMMs. 400 tokens over 16 experts with shared experts: wgmma tiles at a
  // decode batch size (the shared experts on the side stream unless ERNIE_SIDE_SHARED_WGMMA=0).
  // 33-64 pairs an expert (the 64-row blocks, or wgmma tiles with ERNIE_MOE_WIDE_SWAP=0): 400
  // tokens over 64 experts; 200 over 24 with hidden 160 and intermediate 96 (partial output and
  // reduction tiles in both GEMMs); 300 over 32 with shared experts. 20-32 pairs an expert (the
  // paired 32-row blocks, cuda::moe_pair_blocks, unless ERNIE_MOE_PAIR_BLOCKS=0): 256 tokens of
  // the 21B shape with its shared experts; 100 over 16 experts top-4 with hidden 160 and
  // intermediate 96.
  for (const Case& c : {Case{1, 256, 64, 6, 128, 256},      Case{37, 128, 16, 4, 64, 128},
                        Case{300, 160, 24, 8, 96, 0},       Case{700, 256, 64, 6, 64, 128},
                        Case{5, 2560, 64, 6, 1536, 3072},   Case{400, 256, 64, 6, 128, 0},
                        Case{900, 2560, 64, 6, 1536, 0},    Case{200, 2560, 64, 6, 1536, 3072},
                        Case{3, 256, 16, 4, 96, 160},       Case{8, 128, 16, 4, 64, 192},
                        Case{64, 256, 64, 6, 512, 0},       Case{37, 160, 16, 4, 96, 0},
                        Case{64, 1024, 64, 6, 640, 0},      Case{40, 8192, 16, 8, 128, 0},
                        Case{1500, 384, 8, 6, 192, 0},      Case{400, 256, 16, 6, 128, 256},
                        Case{200, 160, 24, 6, 96, 0},       Case{300, 256, 32, 6, 128, 256},
                        Case{256, 2560, 64, 6, 1536, 3072}, Case{100, 160, 16, 4, 96, 0}}) {
    SCOPED_TRACE(::testing::Message() << c.tokens << " tokens, hidden " << c.hidden << ", "
                                      << c.experts << " experts top-" << c.k << ", inter "
                                      << c.inter << ", shared " << c.shared_inter);
    const double h = c.hidden;
    const HostData router = [&] {
      HostData d = random_f32(rng, {c.experts, c.hidden}, -1, 1);
      for (auto& v : d.f32) v = static_cast<float>(2.0 / std::sqrt(h) * rng.normal());
      return d;
    }();
    const HostData bias = random_f32(rng, {c.experts}, -1.0 / c.experts, 1.0 / c.experts);
    const HostData gate_up = random_bf16(rng, {c.experts, 2 * c.inter, c.hidden}, 1 / std::sqrt(h));
    const HostData down =
        random_bf16(rng, {c.experts, c.hidden, c.inter}, 1 / std::sqrt(double(c.inter)));
    const HostData sgu = random_bf16(rng, {2 * c.shared_inter, c.hidden}, 1 / std::sqrt(h));
    const HostData sdown =
        random_bf16(rng, {c.hidden, c.shared_inter}, 1 / std::sqrt(double(c.shared_inter) + 1));
    const HostData x = random_bf16(rng, {c.tokens, c.hidden}, 1.0);
    auto weights = [&](Backend& be) {
      MoeWeights w;
      w.router = be.load_weight(router.host());
      w.router_bias = be.load_weight(bias.host());
      w.experts_gate_up = be.load_weight(gate_up.host());
      w.experts_down = be.load_weight(down.host());
      if (c.shared_inter > 0) {
        w.shared_gate_up = be.load_weight(sgu.host());
        w.shared_down = be.load_weight(sdown.host());
      }
      const int64_t held = be.weight_bytes();
      be.prepare_moe(w);
      if (&be == gpu.get()) {
        // The tiled layout's padding columns and the router's terms are all prepare_moe may
        // add: folded shared experts are read from their own tensors, not from a second copy.
        const int64_t padding =
            int64_t{c.experts} * (2 * c.inter * (cuda::tiled_cols(c.hidden) - c.hidden) +
                                  c.hidden * (cuda::tiled_cols(c.inter) - c.inter));
        const int64_t terms = w.router_terms.empty() ? 0 : w.router_terms.numel();
        EXPECT_EQ(be.weight_bytes() - held, 2 * (padding + terms));
      }
      w.top_k = c.k;
      return w;
    };
    const MoeWeights cw = weights(*cpu), gw = weights(*gpu);
    const char* fold_env = std::getenv("ERNIE_FOLD_SHARED");  // "0": an A/B run without folds
    const bool folds = (fold_env == nullptr || std::string(fold_env) != "0") &&
                       c.shared_inter > 0 && c.shared_inter % c.inter == 0;
    EXPECT_EQ(gw.shared_folded, folds ? c.shared_inter / c.inter : 0);
    std::vector<float> c_out(static_cast<size_t>(c.tokens) * c.hidden);
    cpu->moe(Tensor{c_out.data(), DType::kF32, {c.tokens, c.hidden}}, cpu->load_weight(x.host()),
             cw);
    Tensor g_out = poisoned_gpu(*gpu, {c.tokens, c.hidden});
    gpu->moe(g_out, gpu->load_weight(x.host()), gw);
    ERNIE_CUDA_CHECK(cudaDeviceSynchronize());
    // A token whose k-th and (k+1)-th biased scores (computed here in double) nearly tie may
    // pick the other expert under a different summation order; such rows are left out of the
    // comparison (a few per thousand at most), every other row must match.
    std::vector<float> got = gpu_values(g_out), ref = c_out;
    std::vector<float> got_kept, ref_kept;
    int near_ties = 0;
    for (int t = 0; t < c.tokens; ++t) {
      std::vector<double> p(c.experts);
      double mx = -1e300, z = 0;
      for (int e = 0; e < c.experts; ++e) {
        double acc = 0;
        for (int i = 0; i < c.hidden; ++i) {
          acc += static_cast<double>(bf16_to_float(x.bf16[static_cast<size_t>(t) * c.hidden + i])) *
                 router.f32[static_cast<size_t>(e) * c.hidden + i];
        }
        p[e] = acc;
        mx = std::max(mx, acc);
      }
      for (auto& v : p) z += std::exp(v - mx);
      std::vector<double> score(c.experts);
      for (int e = 0; e < c.experts; ++e) score[e] = std::exp(p[e] - mx) / z + bias.f32[e];
      std::sort(score.begin(), score.end(), std::greater<>());
      if (c.k < c.experts && score[c.k - 1] - score[c.k] < 1e-6) {
        ++near_ties;
        continue;
      }
      const size_t row = static_cast<size_t>(t) * c.hidden;
      got_kept.insert(got_kept.end(), got.begin() + row, got.begin() + row + c.hidden);
      ref_kept.insert(ref_kept.end(), ref.begin() + row, ref.begin() + row + c.hidden);
    }
    EXPECT_LE(near_ties, std::max(1, c.tokens / 100));
    expect_bf16_close(got_kept, ref_kept, "moe");
  }
}

// By default (ERNIE_FUSED_MOE_NORM=0 turns it off) the MoE block ends with the next layer's
// residual add and norm in its combine kernel: the MoE output, the residual and the normalised rows
// must be bit for bit those of moe() followed by add_rms_norm(), the norm's output written over the
// MoE's input as the model does (folded shared experts, side-stream ones, and the wgmma path).
TEST_F(CudaBackendTest, MoeNormFusedMatchesSeparate) {
  const char* env = std::getenv("ERNIE_FUSED_MOE_NORM");
  if (env != nullptr && std::string(env) == "0") {
    GTEST_SKIP() << "the fused path is off (ERNIE_FUSED_MOE_NORM=0)";
  }
  struct Case {
    int tokens, hidden, experts, k, inter, shared_inter;
  };
  // 40 tokens of hidden 8192: a 1024-thread CTA a row.
  for (const Case& c : {Case{1, 2560, 64, 6, 1536, 3072}, Case{5, 256, 64, 6, 128, 256},
                        Case{37, 128, 16, 4, 64, 128}, Case{700, 256, 64, 6, 64, 128},
                        Case{40, 8192, 16, 8, 128, 256}}) {
    SCOPED_TRACE(::testing::Message() << c.tokens << " tokens, hidden " << c.hidden);
    const double h = c.hidden;
    MoeWeights w;
    w.router = gpu->load_weight(random_f32(rng, {c.experts, c.hidden}, -0.05, 0.05).host());
    w.router_bias = gpu->load_weight(random_f32(rng, {c.experts}, -0.01, 0.01).host());
    w.experts_gate_up = gpu->load_weight(
        random_bf16(rng, {c.experts, 2 * c.inter, c.hidden}, 1 / std::sqrt(h)).host());
    w.experts_down = gpu->load_weight(
        random_bf16(rng, {c.experts, c.hidden, c.inter}, 1 / std::sqrt(double(c.inter))).host());
    w.shared_gate_up =
        gpu->load_weight(random_bf16(rng, {2 * c.shared_inter, c.hidden}, 1 / std::sqrt(h)).host());
    w.shared_down = gpu->load_weight(
        random_bf16(rng, {c.hidden, c.shared_inter}, 1 / std::sqrt(double(c.shared_inter))).host());
    gpu->prepare_moe(w);
    w.top_k = c.k;
    const HostData x = random_bf16(rng, {c.tokens, c.hidden}, 1.0);
    const HostData residual = random_bf16(rng, {c.tokens, c.hidden}, 1.0);
    const HostData norm_w = random_bf16(rng, {c.hidden}, 1.0);
    const Tensor nw = gpu->load_weight(norm_w.host());
    // Separate: moe, then add_rms_norm into a fresh tensor.
    Tensor x_a = gpu->load_weight(x.host()), res_a = gpu->load_weight(residual.host());
    Tensor out_a = gpu->load_weight(x.host()), normed_a = gpu->load_weight(x.host());
    gpu->moe(out_a, x_a, w);
    gpu->add_rms_norm(normed_a, res_a, out_a, nw, 1e-5f);
    // Fused, the normalised rows over the input, as the model calls it.
    Tensor x_b = gpu->load_weight(x.host()), res_b = gpu->load_weight(residual.host());
    Tensor out_b = gpu->load_weight(residual.host());
    gpu->moe_add_rms_norm(x_b, res_b, out_b, x_b, w, nw, 1e-5f);
    ERNIE_CUDA_CHECK(cudaDeviceSynchronize());
    auto expect_same = [](const std::vector<float>& got, const std::vector<float>& want,
                          const char* what) {
      ASSERT_EQ(got.size(), want.size()) << what;
      size_t differ = 0, first = got.size();
      for (size_t i = 0; i < got.size(); ++i) {
        if (std::memcmp(&got[i], &want[i], sizeof(float)) != 0 && differ++ == 0) first = i;
      }
      EXPECT_EQ(differ, 0u) << what << ": " << differ << " elements differ, the first at " << first;
    };
    expect_same(gpu_values(out_b), gpu_values(out_a), "MoE output");
    expect_same(gpu_values(res_b), gpu_values(res_a), "residual");
    expect_same(gpu_values(x_b), gpu_values(normed_a), "normalised rows");
  }
}

// The dense MLP block (layer 0 of the ERNIE models) against the CPU reference; its
// intermediates go back to the scratch arena when it returns: the next scratch lies closer to
// one taken before the call than the intermediates' size (kept, they would lie in between).
TEST_F(CudaBackendTest, DenseMlpMatchesCpuAndFreesItsScratch) {
  for (const auto [tokens, hidden, inter] :
       {std::array{1, 256, 384}, std::array{37, 160, 96}, std::array{300, 2560, 1536}}) {
    SCOPED_TRACE(::testing::Message()
                 << tokens << " tokens, hidden " << hidden << ", inter " << inter);
    const HostData gate_up = random_bf16(rng, {2 * inter, hidden}, 1 / std::sqrt(double(hidden)));
    const HostData down = random_bf16(rng, {hidden, inter}, 1 / std::sqrt(double(inter)));
    const HostData x = random_bf16(rng, {tokens, hidden}, 1.0);
    std::vector<float> c_out(static_cast<size_t>(tokens) * hidden);
    cpu->dense_mlp(Tensor{c_out.data(), DType::kF32, {tokens, hidden}}, cpu->load_weight(x.host()),
                   cpu->load_weight(gate_up.host()), cpu->load_weight(down.host()));
    const Tensor g_x = gpu->load_weight(x.host()), g_gu = gpu->load_weight(gate_up.host());
    const Tensor g_down = gpu->load_weight(down.host());
    Tensor g_out = poisoned_gpu(*gpu, {tokens, hidden});
    const auto* before = static_cast<const char*>(gpu->scratch({1}, DType::kBF16).data);
    gpu->dense_mlp(g_out, g_x, g_gu, g_down);
    const auto* after = static_cast<const char*>(gpu->scratch({1}, DType::kBF16).data);
    ERNIE_CUDA_CHECK(cudaDeviceSynchronize());
    expect_bf16_close(gpu_values(g_out), c_out, "dense mlp");
    EXPECT_LT(after - before, static_cast<ptrdiff_t>(tokens) * 3 * inter * 2);
  }
}

TEST_F(CudaBackendTest, SamplingMatchesCpu) {
  // 300 rows: two launches of at most 256 rows each (the work buffer's bound).
  for (const auto [vocab, rows] : {std::array{4096, 300}, std::array{103424, 48}}) {
    SCOPED_TRACE(::testing::Message() << "vocab " << vocab << ", " << rows << " rows");
    HostData logits = random_f32(rng, {rows, vocab}, 0, 1);
    for (auto& v : logits.f32) v = static_cast<float>(3.0 * rng.normal());
    std::vector<std::vector<int32_t>> prompts(rows), outputs(rows);
    std::vector<std::vector<std::pair<int32_t, float>>> biases(rows);
    std::vector<SamplingRow> params(rows);
    for (int r = 0; r < rows; ++r) {
      SamplingRow& p = params[r];
      const int kind = r % 8;
      p.temperature = kind == 0 ? 0.0f : static_cast<float>(rng.uniform(0.3, 1.5));
      if (kind == 1 || kind == 7) p.top_k = 1 + static_cast<int>(rng.below(100));
      if (kind == 2 || kind == 7) p.top_p = static_cast<float>(rng.uniform(0.05, 0.99));
      if (kind == 3) p.min_p = static_cast<float>(rng.uniform(0.01, 0.3));
      if (kind == 4 || kind == 0) add_random_penalties(rng, p, vocab, prompts[r], outputs[r]);
      if (kind == 5) add_random_bias_and_bans(rng, p, vocab, biases[r]);
      p.seed = rng.next();
      p.position = static_cast<int64_t>(rng.below(1000));
      p.num_logprobs = r % 3 == 0 ? static_cast<int>(rng.below(21)) : -1;
    }
    const auto ref = cpu->sample(cpu->load_weight(logits.host()), params);
    const auto got = gpu->sample(gpu->load_weight(logits.host()), params);
    ASSERT_EQ(got.size(), ref.size());
    for (int r = 0; r < rows; ++r) {
      SCOPED_TRACE(::testing::Message() << "row " << r << " kind " << r % 8);
      EXPECT_EQ(got[r].id, ref[r].id);
      if (params[r].num_logprobs < 0) continue;
      EXPECT_NEAR(got[r].logprob, ref[r].logprob, 1e-4);
      EXPECT_EQ(got[r].rank, ref[r].rank);
      ASSERT_EQ(got[r].top.size(), ref[r].top.size());
      for (size_t i = 0; i < ref[r].top.size(); ++i) {
        EXPECT_EQ(got[r].top[i].id, ref[r].top[i].id);
        EXPECT_NEAR(got[r].top[i].logprob, ref[r].top[i].logprob, 1e-4);
      }
    }
  }
}

// A few rows without top-k, top-p or logprobs take the split sampler (each row over many
// CTAs): the same tokens as the CPU reference, for greedy rows with penalties, plain and min-p
// temperature rows, biased rows with bans, and top-k at the vocabulary (off); then many draws
// of one distribution keyed by position, 32 rows a call.
TEST_F(CudaBackendTest, SplitSamplingMatchesCpu) {
  // (256 and 300 rows: the lean split kernels, 4 chunks a row, at most 256 rows a launch; with
  // ERNIE_SAMPLER_LEAN=0 the one-CTA-per-row sampler: the same results are expected.)
  for (int vocab : {1000, 4096, 103424}) {
    for (int rows : {1, 5, 32, 256, 300}) {
      SCOPED_TRACE(::testing::Message() << "vocab " << vocab << ", " << rows << " rows");
      HostData logits = random_f32(rng, {rows, vocab}, 0, 1);
      for (auto& v : logits.f32) v = static_cast<float>(3.0 * rng.normal());
      std::vector<std::vector<int32_t>> prompts(rows), outputs(rows);
      std::vector<std::vector<std::pair<int32_t, float>>> biases(rows);
      std::vector<SamplingRow> params(rows);
      for (int r = 0; r < rows; ++r) {
        SamplingRow& p = params[r];
        const int kind = (r + rows) % 5;
        p.temperature = kind == 0 ? 0.0f : static_cast<float>(rng.uniform(0.3, 1.5));
        if (kind == 2) p.min_p = static_cast<float>(rng.uniform(0.01, 0.3));
        if (kind == 4) p.top_k = vocab;
        if (kind == 0 || kind == 4) add_random_penalties(rng, p, vocab, prompts[r], outputs[r]);
        if (kind == 3) {
          add_random_bias_and_bans(rng, p, vocab, biases[r]);
          biases[r].push_back({biases[r][0].first, 1.5f});  // the same id twice: in order
        }
        p.seed = rng.next();
        p.position = static_cast<int64_t>(rng.below(1000));
      }
      const auto ref = cpu->sample(cpu->load_weight(logits.host()), params);
      const auto got = gpu->sample(gpu->load_weight(logits.host()), params);
      ASSERT_EQ(got.size(), ref.size());
      for (int r = 0; r < rows; ++r) EXPECT_EQ(got[r].id, ref[r].id) << "row " << r;
    }
  }
  const int vocab = 1000, rows = 32;
  HostData one = random_f32(rng, {1, vocab}, 0, 1);
  for (auto& v : one.f32) v = static_cast<float>(1.5 * rng.normal());
  HostData logits{{}, {}, {rows, vocab}, DType::kF32};
  for (int r = 0; r < rows; ++r)
    logits.f32.insert(logits.f32.end(), one.f32.begin(), one.f32.end());
  const Tensor d_logits = gpu->load_weight(logits.host());
  int same = 0, total = 0, distinct = 0;
  std::vector<int> seen(vocab, 0);
  for (int call = 0; call < 64; ++call) {
    std::vector<SamplingRow> params(rows);
    for (int r = 0; r < rows; ++r) {
      params[r].temperature = 0.8f;
      params[r].seed = 12345;
      params[r].position = call * rows + r;
    }
    const auto got = gpu->sample(d_logits, params);
    for (int r = 0; r < rows; ++r) {
      const int32_t want =
          cpu::sample_row({one.f32.data(), static_cast<size_t>(vocab)}, params[r]).id;
      same += got[r].id == want;
      distinct += seen[want]++ == 0;
      ++total;
    }
  }
  EXPECT_EQ(same, total);
  EXPECT_GT(distinct, 10);  // the draws really vary
}

// Batches of nothing but greedy rows without edits (the benchmark's requests; cuda::greedy_rows
// takes them unless ERNIE_GREEDY_ROWS=0): every row's token is the CPU reference's, with
// planted ties (the lower index wins), a maximum in the last column, -inf entries and a row
// whose every value is the same.
TEST_F(CudaBackendTest, GreedyRowsMatchCpu) {
  for (int vocab : {7, 1000, 103424}) {
    for (int rows : {1, 3, 256, 1024}) {
      SCOPED_TRACE(::testing::Message() << "vocab " << vocab << ", " << rows << " rows");
      HostData logits = random_f32(rng, {rows, vocab}, 0, 1);
      for (auto& v : logits.f32) v = static_cast<float>(3.0 * rng.normal());
      for (int r = 0; r < rows; ++r) {
        float* row = logits.f32.data() + static_cast<size_t>(r) * vocab;
        const float top = *std::max_element(row, row + vocab) + 1.0f;
        const int a = static_cast<int>(rng.below(vocab)), b = static_cast<int>(rng.below(vocab));
        switch (r % 4) {
          case 0:  // a tie for the maximum
            row[a] = row[b] = top;
            break;
          case 1:  // the maximum last, some -inf
            row[vocab - 1] = top;
            row[a] = -std::numeric_limits<float>::infinity();
            break;
          case 2:  // all equal: the first
            std::fill(row, row + vocab, -2.5f);
            break;
          default:
            break;
        }
      }
      std::vector<SamplingRow> params(rows);
      for (auto& p : params) {
        p.temperature = 0.0f;
        p.seed = rng.next();
        p.position = static_cast<int64_t>(rng.below(1000));
      }
      const auto ref = cpu->sample(cpu->load_weight(logits.host()), params);
      const auto got = gpu->sample(gpu->load_weight(logits.host()), params);
      ASSERT_EQ(got.size(), ref.size());
      int differ = 0;
      for (int r = 0; r < rows; ++r) differ += got[r].id != ref[r].id;
      EXPECT_EQ(differ, 0);
      EXPECT_EQ(got[0].id, ref[0].id);
    }
  }
}

// Many draws from one distribution (top-k + top-p + temperature), keyed by position: the same
// token as the CPU reference for every position.
TEST_F(CudaBackendTest, ManyDrawsMatchCpuDrawForDraw) {
  const int vocab = 1000, rows = 4000;
  HostData one = random_f32(rng, {1, vocab}, 0, 1);
  for (auto& v : one.f32) v = static_cast<float>(1.5 * rng.normal());
  HostData logits{{}, {}, {rows, vocab}, DType::kF32};
  for (int r = 0; r < rows; ++r)
    logits.f32.insert(logits.f32.end(), one.f32.begin(), one.f32.end());
  std::vector<SamplingRow> params(rows);
  for (int r = 0; r < rows; ++r) {
    params[r].temperature = 0.8f;
    params[r].top_k = 20;
    params[r].top_p = 0.8f;
    params[r].seed = 12345;
    params[r].position = r;
  }
  const auto got = gpu->sample(gpu->load_weight(logits.host()), params);
  int same = 0, distinct = 0;
  std::vector<int> seen(vocab, 0);
  for (int r = 0; r < rows; ++r) {
    const int32_t want =
        cpu::sample_row({one.f32.data(), static_cast<size_t>(vocab)}, params[r]).id;
    same += got[r].id == want;
    distinct += seen[want]++ == 0;
  }
  EXPECT_EQ(same, rows);
  EXPECT_GT(distinct, 3);  // the draws really vary
}

// A whole synthetic model: the logits of a mixed step on the GPU against the CPU reference.
TEST_F(CudaBackendTest, ModelLogitsMatchCpu) {
  ernie::testing::TempDir dir;
  make_tiny_model(dir);
  auto ref = ernie::testing::load_model(dir.path(), std::move(cpu));
  auto dev = ernie::testing::load_model(dir.path(), std::move(gpu));
  const auto& c = ref.model->config();
  const int block = 16, blocks = 64;
  for (auto* m : {ref.model.get(), dev.model.get()}) {
    m->backend().allocate_kv_cache(static_cast<int>(c.num_hidden_layers), blocks, block);
  }
  // Three prompts of 1, 40 and 90 tokens in one step; blocks assigned in reverse.
  StepInput st;
  st.max_blocks_per_seq = 8;
  st.query_start = {0};
  int next_block = blocks - 1;
  for (int len : {1, 40, 90}) {
    std::vector<int32_t> table(8, -1);
    for (int b = 0; b < (len + block - 1) / block; ++b) table[b] = next_block--;
    for (int p = 0; p < len; ++p) {
      st.token_ids.push_back(static_cast<int32_t>(rng.below(c.vocab_size)));
      st.positions.push_back(p);
      st.slot_mapping.push_back(static_cast<int64_t>(table[p / block]) * block + p % block);
      st.logits_indices.push_back(st.num_tokens() - 1);
    }
    st.query_start.push_back(st.num_tokens());
    st.context_lens.push_back(len);
    st.block_tables.insert(st.block_tables.end(), table.begin(), table.end());
  }
  const auto want = ref.model->forward(st);
  const auto got = dev.model->forward(st);
  ASSERT_EQ(got.size(), want.size());
  // A token whose expert choice sits on a near-tie may route differently in bf16 (transformers
  // in bf16 does too): that row then differs a lot, and the later tokens of its sequence, which
  // attend to its keys, a little. At most a tenth of the rows may be far; the others must be
  // close one by one and all together.
  compare(got, want, "model logits (all rows)");
  int far = 0;
  std::vector<float> close_got, close_want;
  for (size_t r = 0; r < st.logits_indices.size(); ++r) {
    const std::vector<float> g(got.begin() + r * c.vocab_size,
                               got.begin() + (r + 1) * c.vocab_size);
    const std::vector<float> w(want.begin() + r * c.vocab_size,
                               want.begin() + (r + 1) * c.vocab_size);
    const std::string what = cat("logits of row ", r);
    if (compare(g, w, what.c_str()).l2_rel > 0.05) {
      ++far;
    } else {
      close_got.insert(close_got.end(), g.begin(), g.end());
      close_want.insert(close_want.end(), w.begin(), w.end());
    }
  }
  EXPECT_LE(far, static_cast<int>(st.logits_indices.size()) / 10);
  EXPECT_LT(compare(close_got, close_want, "model logits (rows within 0.05)").l2_rel, 0.03);
  // Greedy choices agree wherever the reference's margin is clear, but for rows whose
  // routing flipped (at most the far rows above).
  const int64_t v = c.vocab_size;
  int checked = 0, differ = 0;
  for (size_t r = 0; r < st.logits_indices.size(); ++r) {
    const float* w = want.data() + r * v;
    const float* g = got.data() + r * v;
    std::vector<float> sorted(w, w + v);
    std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<>());
    if (sorted[0] - sorted[1] < 0.2f) continue;
    ++checked;
    differ += std::max_element(g, g + v) - g != std::max_element(w, w + v) - w;
  }
  EXPECT_GT(checked, static_cast<int>(st.logits_indices.size()) / 2);
  EXPECT_LE(differ, std::max(far, 1));
}

}  // namespace
}  // namespace ernie::backend

namespace ernie::backend {
namespace {

// Rows of `rows` logits rows whose relative L2 against the eager step is over 0.05 (a flipped
// near-tie expert choice puts one row far off); the other rows together must be within 0.05.
int far_rows(const std::vector<float>& g, const std::vector<float>& e, size_t rows,
             const std::string& what) {
  const size_t vocab = g.size() / rows;
  std::vector<float> close_g, close_e;
  int far = 0;
  for (size_t q = 0; q < rows; ++q) {
    const std::vector<float> rg(g.begin() + q * vocab, g.begin() + (q + 1) * vocab);
    const std::vector<float> re(e.begin() + q * vocab, e.begin() + (q + 1) * vocab);
    if (compare(rg, re, cat(what, ", row ", q).c_str()).l2_rel > 0.05) {
      ++far;
      continue;
    }
    close_g.insert(close_g.end(), rg.begin(), rg.end());
    close_e.insert(close_e.end(), re.begin(), re.end());
  }
  EXPECT_LT(compare(close_g, close_e, cat(what, ", close rows").c_str()).l2_rel, 0.05) << what;
  return far;
}

// Decode steps replayed from CUDA graphs (padded batch, split counts fixed at capture, block
// tables and split sizes read from device memory) against the same steps run eagerly.
TEST_F(CudaBackendTest, GraphReplayMatchesEager) {
  ernie::testing::TempDir dir;
  make_tiny_model(dir);
  auto eager = ernie::testing::load_model(dir.path(), std::move(gpu));
  auto graphed = ernie::testing::load_model(dir.path(), make_cuda_backend(0));
  const auto& c = eager.model->config();
  const int block = 16, blocks = 500, width = 300;
  for (auto* m : {eager.model.get(), graphed.model.get()}) {
    m->backend().allocate_kv_cache(static_cast<int>(c.num_hidden_layers), blocks, block);
  }
  ASSERT_GT(graphed.model->enable_graphs(16, width), 0);
  // Eight sequences (a graph size: no padding), one long enough that the eager plan splits
  // its keys as many ways as the graph does: results must be identical.
  const std::vector<int> lens = {3, 17, 4500, 64, 250, 1000, 9, 130};
  std::vector<std::vector<int32_t>> tables;
  int next = 0;
  for (int len : lens) {
    std::vector<int32_t> t(width, -1);
    for (int b = 0; b < (len + 8 + block - 1) / block; ++b) t[b] = next++;
    tables.push_back(t);
  }
  ASSERT_LE(next, blocks);
  auto step_of = [&](size_t seqs, const std::vector<int>& from, const std::vector<int>& to) {
    StepInput st;
    st.max_blocks_per_seq = width;
    st.query_start = {0};
    for (size_t q = 0; q < seqs; ++q) {
      for (int p = from[q]; p < to[q]; ++p) {
        st.token_ids.push_back(static_cast<int32_t>((p * 7919 + q * 31) % c.vocab_size));
        st.positions.push_back(p);
        st.slot_mapping.push_back(static_cast<int64_t>(tables[q][p / block]) * block + p % block);
      }
      st.query_start.push_back(st.num_tokens());
      st.context_lens.push_back(to[q]);
      st.logits_indices.push_back(st.num_tokens() - 1);
      st.block_tables.insert(st.block_tables.end(), tables[q].begin(), tables[q].end());
    }
    return st;
  };
  {
    const StepInput prefill = step_of(lens.size(), std::vector<int>(lens.size(), 0), lens);
    EXPECT_EQ(graphed.model->forward(prefill), eager.model->forward(prefill));  // both eager
  }
  std::vector<int> at = lens;
  for (int s = 0; s < 8; ++s) {
    // Steps 0-3: all eight sequences. Steps 4-7: the first five, padded to eight by the graph
    // path: other GEMM shapes and split plans round differently in bf16, which can also flip
    // a near-tie expert choice (the padding-into-real-rows bug this guards against gave 0.4).
    const size_t seqs = s < 4 ? lens.size() : 5;
    std::vector<int> to = at;
    for (size_t q = 0; q < seqs; ++q) ++to[q];
    const StepInput decode = step_of(seqs, at, to);
    const auto g = graphed.model->forward(decode);
    const auto e = eager.model->forward(decode);
    const std::string what = cat("decode step ", s, " (", seqs, " sequences)");
    const Error err = compare(g, e, what.c_str());
    if (s < 4) {
      EXPECT_EQ(err.l2_rel, 0.0) << what;
    } else {
      // Measured 0.005-0.05 over the step; once one row of five had a near-tie expert choice
      // flip (that row alone far off, 0.127 over the step). At most one far row per step, the
      // others within 0.05 together, and the step within 0.2 (the padding bug gave 0.4).
      EXPECT_LE(far_rows(g, e, seqs, what), 1) << what;
      EXPECT_LT(err.l2_rel, 0.2) << what;
    }
    at = to;
  }
}

// Graphs above 256 rows (vLLM's sizes there step by 16; a server on an H100 records them up to
// 512): decode steps of 272 (a graph size) and 300 sequences (padded to 304) replayed against
// the same steps run eagerly; first 96 and 100 (padded to 104), whose 24-26 pairs an expert
// (the tiny model's 16 experts, top-4) take the paired 32-row MoE blocks. Other split plans and
// padding round differently in bf16 and can flip near-tie expert choices on a few rows; a padding
// or table bug puts every row off.
TEST_F(CudaBackendTest, GraphReplayAbove256Rows) {
  ernie::testing::TempDir dir;
  make_tiny_model(dir);
  auto eager = ernie::testing::load_model(dir.path(), std::move(gpu));
  auto graphed = ernie::testing::load_model(dir.path(), make_cuda_backend(0));
  const auto& c = eager.model->config();
  const int block = 16, width = 8, seqs = 300;
  for (auto* m : {eager.model.get(), graphed.model.get()}) {
    m->backend().allocate_kv_cache(static_cast<int>(c.num_hidden_layers), seqs * width, block);
  }
  ASSERT_EQ(graphed.model->enable_graphs(seqs, width), 3 + 31 + 4);  // up to 304
  std::vector<int> at(seqs);
  for (int q = 0; q < seqs; ++q) at[q] = 1 + static_cast<int>(rng.below(90));
  auto step_of = [&](int n, const std::vector<int>& from, int fresh) {
    StepInput st;
    st.max_blocks_per_seq = width;
    st.query_start = {0};
    for (int q = 0; q < n; ++q) {
      const int to = from[q] + fresh;
      for (int p = fresh == 1 ? from[q] : 0; p < to; ++p) {
        st.token_ids.push_back(static_cast<int32_t>(rng.below(c.vocab_size)));
        st.positions.push_back(p);
        st.slot_mapping.push_back(static_cast<int64_t>(q * width + p / block) * block + p % block);
      }
      st.query_start.push_back(st.num_tokens());
      st.context_lens.push_back(to);
      st.logits_indices.push_back(st.num_tokens() - 1);
      for (int b = 0; b < width; ++b) st.block_tables.push_back(q * width + b);
    }
    return st;
  };
  {
    const StepInput prefill = step_of(seqs, at, 0);
    EXPECT_EQ(graphed.model->forward(prefill), eager.model->forward(prefill));  // both eager
  }
  for (int n : {96, 100, 272, 300, 300}) {
    const StepInput decode = step_of(n, at, 1);
    const auto g = graphed.model->forward(decode);
    const auto e = eager.model->forward(decode);
    const std::string what = cat("decode step of ", n, " sequences");
    ASSERT_EQ(g.size(), static_cast<size_t>(n) * c.vocab_size);
    EXPECT_LE(far_rows(g, e, n, what), n / 20) << what;
    for (int q = 0; q < n; ++q) ++at[q];
  }
}

// Many concurrent sampled requests through the engine on the GPU (mixed prefill/decode steps,
// graph replays at many batch sizes): every request completes with valid tokens, and greedy
// requests give the same tokens whatever else is batched with them.
TEST_F(CudaBackendTest, EngineUnderLoad) {
  ernie::testing::TempDir dir;
  make_tiny_model(dir);
  auto m = ernie::testing::load_model(dir.path(), std::move(gpu));
  const int64_t vocab = m.model->config().vocab_size;
  runtime::EngineConfig ec;
  ec.max_model_len = 512;
  ec.gpu_memory_utilization = 0.0;
  ec.kv_cache_memory = 256ll << 20;
  runtime::Engine engine(*m.model, nullptr, ec);
  std::vector<std::vector<int32_t>> prompts;
  std::vector<runtime::SamplingParams> params;
  for (int i = 0; i < 200; ++i) {
    std::vector<int32_t> p;
    for (int t = 0, n = 3 + static_cast<int>(rng.below(5)); t < n; ++t) {
      p.push_back(static_cast<int32_t>(3 + rng.below(vocab - 3)));
    }
    prompts.push_back(p);
    runtime::SamplingParams sp;
    sp.max_tokens = 16;
    sp.ignore_eos = true;
    sp.temperature = i % 2 ? 1.0f : 0.0f;
    params.push_back(sp);
  }
  const auto all = runtime::generate(engine, prompts, params);
  ASSERT_EQ(all.size(), prompts.size());
  for (size_t i = 0; i < all.size(); ++i) {
    ASSERT_EQ(all[i][0].tokens.size(), 16u) << "request " << i;
    for (int32_t t : all[i][0].tokens) ASSERT_TRUE(t >= 0 && t < vocab) << t;
  }
  // Greedy requests alone (batch of one: graph size 1) give the same tokens.
  int same = 0, greedy = 0;
  for (size_t i = 0; i < prompts.size(); i += 2) {
    ++greedy;
    same += runtime::generate(engine, {prompts[i]}, {params[i]})[0][0].tokens == all[i][0].tokens;
  }
  // bf16 batches of other shapes may break near-ties differently; the rest must agree.
  EXPECT_GE(same, greedy * 9 / 10) << same << " of " << greedy;
}

// Asynchronous scheduling on the GPU (token feed on the device, graphs, double-buffered
// results): the same requests give the same tokens as synchronous scheduling. Both runs see
// the same batches (lengths are known ahead, so no spare rows), so only kernels that are not
// run-to-run deterministic could make them differ; allow what EngineUnderLoad allows.
TEST_F(CudaBackendTest, AsyncSchedulingMatchesSync) {
  ernie::testing::TempDir dir;
  make_tiny_model(dir);
  auto m = ernie::testing::load_model(dir.path(), std::move(gpu));
  const int64_t vocab = m.model->config().vocab_size;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<runtime::SamplingParams> params;
  for (int i = 0; i < 96; ++i) {
    std::vector<int32_t> p;
    for (int t = 0, n = 3 + static_cast<int>(rng.below(40)); t < n; ++t) {
      p.push_back(static_cast<int32_t>(3 + rng.below(vocab - 3)));
    }
    prompts.push_back(p);
    runtime::SamplingParams sp;
    sp.max_tokens = 1 + static_cast<int>(rng.below(24));
    sp.ignore_eos = true;
    sp.temperature = i % 3 == 1 ? 0.8f : 0.0f;
    sp.seed = 1000 + i;
    if (i % 3 == 2) sp.presence_penalty = 0.5f;
    params.push_back(sp);
  }
  std::vector<std::vector<runtime::GenerateResult>> runs[2];
  for (int async = 0; async < 2; ++async) {
    runtime::EngineConfig ec;
    ec.max_model_len = 512;
    ec.gpu_memory_utilization = 0.0;
    ec.kv_cache_memory = 256ll << 20;
    ec.max_num_batched_tokens = 512;  // prompts in several steps, decodes beside them
    ec.async_scheduling = async == 1;
    runtime::Engine engine(*m.model, nullptr, ec);
    runs[async] = runtime::generate(engine, prompts, params);
    EXPECT_FALSE(engine.has_unfinished());
  }
  int same = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const auto& a = runs[0][i][0].tokens;
    const auto& b = runs[1][i][0].tokens;
    ASSERT_EQ(b.size(), static_cast<size_t>(params[i].max_tokens)) << "request " << i;
    for (int32_t t : b) ASSERT_TRUE(t >= 0 && t < vocab) << t;
    same += a == b;
  }
  EXPECT_GE(same, static_cast<int>(prompts.size()) * 9 / 10) << same << " of " << prompts.size();
}

}  // namespace
}  // namespace ernie::backend
