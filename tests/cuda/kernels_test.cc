// SwiGLU and rope + KV store kernels against the CPU reference ops: fresh random inputs,
// outputs poisoned first, odd shapes.
#include <gtest/gtest.h>

#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <random>
#include <thread>
#include <tuple>
#include <utility>

#include "backend/cpu/ops.h"
#include "backend/cuda/activation.cuh"
#include "backend/cuda/cluster_gemm.cuh"
#include "backend/cuda/device.h"
#include "backend/cuda/expert_layout.h"
#include "backend/cuda/moe.cuh"
#include "backend/cuda/rope.cuh"
#include "backend/cuda/router.cuh"
#include "backend/cuda/skinny_gemm.cuh"
#include "backend/cuda/tuned_gemm.h"
#include "common/dtype.h"
#include "common/rng.h"
#include "device_buffer.h"

namespace ernie::cuda {
namespace {

using testing::DeviceBuffer;

std::vector<uint16_t> random_bf16(Rng& rng, size_t n, double scale) {
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = float_to_bf16(static_cast<float>(scale * rng.normal()));
  return v;
}
std::vector<float> widen(const std::vector<uint16_t>& v) {
  std::vector<float> f(v.size());
  for (size_t i = 0; i < v.size(); ++i) f[i] = bf16_to_float(v[i]);
  return f;
}
auto bf(uint16_t* p) {
  return reinterpret_cast<__nv_bfloat16*>(p);
}

// A random routing problem for `tokens` tokens: x (bf16), f32 router weights and correction
// bias on the host and uploaded, and the router's device scratch.
struct RouterInputs {
  RouterInputs(Rng& rng, int tokens, int hidden, int experts)
      : x(random_bf16(rng, static_cast<size_t>(tokens) * hidden, 1.0)),
        w(static_cast<size_t>(experts) * hidden),
        bias(experts),
        d_x(x.size()),
        d_w(w.size()),
        d_b(bias.size()),
        d_scratch(route_scratch_bytes(tokens, hidden, experts) / 4) {
    for (auto& v : w) v = static_cast<float>(2.0 / std::sqrt(hidden) * rng.normal());
    for (auto& v : bias) v = static_cast<float>(rng.uniform(-1.0, 1.0) / experts);
    d_x.upload(x);
    d_w.upload(w);
    d_b.upload(bias);
  }
  // tied: experts 2i and 2i + 1 identical (weights and bias), so their scores tie;
  // nan_tokens: the first so many tokens with one element of x a NaN (every score of theirs
  // NaN). Uploaded again.
  void vary(int hidden, int experts, bool tied, int nan_tokens) {
    if (tied) {
      for (int e = 1; e < experts; e += 2) {
        std::copy_n(w.begin() + static_cast<ptrdiff_t>(e - 1) * hidden, hidden,
                    w.begin() + static_cast<ptrdiff_t>(e) * hidden);
        bias[e] = bias[e - 1];
      }
      d_w.upload(w);
      d_b.upload(bias);
    }
    for (int t = 0; t < nan_tokens; ++t) x[static_cast<size_t>(t) * hidden + hidden / 2] = 0x7fc0;
    if (nan_tokens > 0) d_x.upload(x);  // 0x7fc0: a bf16 quiet NaN
  }
  std::vector<uint16_t> x;
  std::vector<float> w, bias;
  DeviceBuffer<uint16_t> d_x;
  DeviceBuffer<float> d_w, d_b, d_scratch;
};

TEST(CudaKernels, SiluMulMatchesCpuReference) {
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device";
  Rng rng(std::random_device{}());
  for (auto [rows, inter] : {std::pair{1, 64}, {7, 1536}, {33, 3072}, {3, 131}}) {
    const auto gu = random_bf16(rng, static_cast<size_t>(rows) * 2 * inter, 2.0);
    DeviceBuffer<uint16_t> d_gu(gu.size()), d_out(static_cast<size_t>(rows) * inter);
    d_gu.upload(gu);
    d_out.poison();
    silu_mul(bf(d_out.p), bf(d_gu.p), rows, inter, nullptr);
    ERNIE_CUDA_CHECK(cudaDeviceSynchronize());
    const auto out = widen(d_out.download());
    std::vector<float> ref(out.size());
    backend::cpu::silu_mul(ref.data(), widen(gu).data(), rows, inter);
    for (size_t i = 0; i < out.size(); ++i) {
      ASSERT_FALSE(std::isnan(out[i])) << i;
      ASSERT_NEAR(out[i], ref[i], 1e-2 * std::abs(ref[i]) + 1e-3)
          << rows << "x" << inter << " at " << i;
    }
  }
}

// The few-token linear layer against a double-precision reference of the same bf16 inputs:
// every row count it takes, rows wider than a warp's 256 columns and not a multiple of them,
// output rows that leave a CTA partly idle (its bulk copy shorter), f32 and bf16 outputs.
// x [m, k] w [n, k]^T in double: each output's value and the sum of its products' magnitudes.
struct GemmReference {
  std::vector<double> ref, mag;
};
GemmReference gemm_reference(const std::vector<float>& x, const std::vector<float>& w, int m, int n,
                             int k) {
  GemmReference g{std::vector<double>(static_cast<size_t>(m) * n),
                  std::vector<double>(static_cast<size_t>(m) * n)};
  for (int t = 0; t < m; ++t) {
    for (int r = 0; r < n; ++r) {
      double ref = 0.0, mag = 0.0;
      for (int i = 0; i < k; ++i) {
        const double p = static_cast<double>(x[static_cast<size_t>(t) * k + i]) *
                         w[static_cast<size_t>(r) * k + i];
        ref += p;
        mag += std::abs(p);
      }
      g.ref[static_cast<size_t>(t) * n + r] = ref;
      g.mag[static_cast<size_t>(t) * n + r] = mag;
    }
  }
  return g;
}

// got [m, n] against the double reference: f32 sums (~1e-6 of the magnitude), and a bf16 output
// (f32_out false) rounds by 2^-8 of the value.
void expect_gemm_close(const std::vector<float>& got, const GemmReference& g, int m, int n,
                       bool f32_out) {
  for (int t = 0; t < m; ++t) {
    for (int r = 0; r < n; ++r) {
      const size_t i = static_cast<size_t>(t) * n + r;
      const double tol = 1e-5 * g.mag[i] + (f32_out ? 0.0 : std::abs(g.ref[i]) / 128.0) + 1e-6;
      ASSERT_FALSE(std::isnan(got[i])) << "row " << t << " col " << r;
      ASSERT_NEAR(got[i], g.ref[i], tol) << "row " << t << " col " << r;
    }
  }
}

// got [m, n] = x [m, k] w [n, k]^T (expect_gemm_close).
void expect_gemm_matches(const std::vector<float>& got, const std::vector<float>& x,
                         const std::vector<float>& w, int m, int n, int k, bool f32_out) {
  expect_gemm_close(got, gemm_reference(x, w, m, n, k), m, n, f32_out);
}

TEST(CudaKernels, SkinnyGemmMatchesReference) {
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device";
  Rng rng(std::random_device{}());
  EXPECT_FALSE(skinny_gemm_fits(kSkinnyMaxRows + 1, 2560));
  EXPECT_FALSE(skinny_gemm_fits(1, 2566));
  EXPECT_FALSE(skinny_gemm_fits(4, 16384));  // its rows and input would not fit shared memory
  struct Case {
    int m, n, k;
    bool f32;
  };
  for (const Case& c :
       {Case{1, 3584, 2560, false}, Case{2, 37, 8, true}, Case{3, 1001, 7000, false},
        Case{4, 515, 3072, true}, Case{1, 2562, 12288, false}, Case{4, 66, 3080, false},
        Case{2, 4099, 264, true}}) {
    SCOPED_TRACE(::testing::Message()
                 << c.m << " x " << c.k << " -> " << c.n << (c.f32 ? " f32" : " bf16"));
    ASSERT_TRUE(skinny_gemm_fits(c.m, c.k));
    const auto x = random_bf16(rng, static_cast<size_t>(c.m) * c.k, 1.0);
    const auto w = random_bf16(rng, static_cast<size_t>(c.n) * c.k, 1.0 / std::sqrt(c.k));
    DeviceBuffer<uint16_t> d_x(x.size()), d_w(w.size());
    d_x.upload(x);
    d_w.upload(w);
    const auto in = widen(x);
    const auto wf = widen(w);
    const size_t outs = static_cast<size_t>(c.m) * c.n;
    std::vector<float> got(outs);
    if (c.f32) {
      DeviceBuffer<float> d_out(outs);
      d_out.poison();
      skinny_gemm(d_out.p, true, bf(d_x.p), bf(d_w.p), c.m, c.n, c.k, nullptr);
      ERNIE_CUDA_CHECK(cudaDeviceSynchronize());
      got = d_out.download();
    } else {
      DeviceBuffer<uint16_t> d_out(outs);
      d_out.poison();
      skinny_gemm(d_out.p, false, bf(d_x.p), bf(d_w.p), c.m, c.n, c.k, nullptr);
      ERNIE_CUDA_CHECK(cudaDeviceSynchronize());
      got = widen(d_out.download());
    }
    expect_gemm_matches(got, in, wf, c.m, c.n, c.k, c.f32);
  }
}

// A stream with a cuBLAS handle on it and the handle's 32 MB workspace (the backend's size).
struct BlasOnStream {
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  DeviceBuffer<uint8_t> workspace{32u << 20};
  BlasOnStream() {
    ERNIE_CUDA_CHECK(cudaStreamCreate(&stream));
    if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS ||
        cublasSetStream(blas, stream) != CUBLAS_STATUS_SUCCESS ||
        cublasSetWorkspace(blas, workspace.p, workspace.n) != CUBLAS_STATUS_SUCCESS) {
      throw Error("cuBLAS handle setup failed");
    }
  }
  ~BlasOnStream() {
    cublasDestroy(blas);
    cudaStreamDestroy(stream);
  }
  BlasOnStream(const BlasOnStream&) = delete;
  BlasOnStream& operator=(const BlasOnStream&) = delete;
};

// Random bf16 operands of out[m, n] = x[m, k] w[n, k]^T on the device, and both kinds of output
// buffer (out: the f32 one or the bf16 one).
struct GemmOperands {
  std::vector<uint16_t> x, w;
  DeviceBuffer<uint16_t> d_x, d_w;
  DeviceBuffer<float> d_f32;
  DeviceBuffer<uint16_t> d_bf16;
  void* out;
  GemmOperands(Rng& rng, int m, int n, int k, bool f32)
      : x(random_bf16(rng, static_cast<size_t>(m) * k, 1.0)),
        w(random_bf16(rng, static_cast<size_t>(n) * k, 1.0 / std::sqrt(k))),
        d_x(x.size()),
        d_w(w.size()),
        d_f32(static_cast<size_t>(m) * n),
        d_bf16(static_cast<size_t>(m) * n),
        out(f32 ? static_cast<void*>(d_f32.p) : static_cast<void*>(d_bf16.p)) {
    d_x.upload(x);
    d_w.upload(w);
  }
};

// TunedGemm: each shape tuned on first use (the default GEMM and cuBLASLt's candidates timed on
// these operands), then run again from its plan: both results against the reference, and the
// second equal to the first bit for bit (one algorithm per shape). A shape not seen while tuning
// was allowed is left to the caller.
TEST(CudaKernels, TunedGemmMatchesReference) {
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device";
  Rng rng(std::random_device{}());
  const BlasOnStream b;
  const auto& [stream, blas, workspace] = b;
  {
    TunedGemm tuned;
    tuned.begin_tuning();
    struct Case {
      int m, n, k;
      bool f32;
    };
    for (const Case& c :
         {Case{9, 6144, 2560, false}, Case{256, 1024, 2560, false}, Case{65, 192, 2560, true},
          Case{512, 384, 3072, false}, Case{100, 1001, 704, true}, Case{17, 2560, 1536, false}}) {
      SCOPED_TRACE(::testing::Message()
                   << c.m << " x " << c.k << " -> " << c.n << (c.f32 ? " f32" : " bf16"));
      GemmOperands ops(rng, c.m, c.n, c.k, c.f32);
      auto& [x, w, d_x, d_w, d_f32, d_bf16, out] = ops;
      const size_t outs = static_cast<size_t>(c.m) * c.n;
      auto run = [&](bool may_tune) {
        d_f32.poison();
        d_bf16.poison();
        const bool ran = tuned.run(blas, out, c.f32, d_x.p, d_w.p, c.m, c.n, c.k, workspace.p,
                                   workspace.n, stream, may_tune);
        ERNIE_CUDA_CHECK(cudaStreamSynchronize(stream));
        EXPECT_TRUE(ran);
        return c.f32 ? d_f32.download() : widen(d_bf16.download());
      };
      const int before = tuned.shapes();
      EXPECT_FALSE(tuned.run(blas, out, c.f32, d_x.p, d_w.p, c.m, c.n, c.k, workspace.p,
                             workspace.n, stream, false));  // not tuned yet, not allowed to
      const auto first = run(true);
      EXPECT_EQ(tuned.shapes(), before + 1);
      const auto second = run(false);
      EXPECT_EQ(tuned.shapes(), before + 1);
      expect_gemm_matches(first, widen(x), widen(w), c.m, c.n, c.k, c.f32);
      for (size_t i = 0; i < outs; ++i) {
        ASSERT_EQ(std::bit_cast<uint32_t>(first[i]), std::bit_cast<uint32_t>(second[i]))
            << "element " << i;
      }
    }
    std::printf("tuned %d shapes, %d not the default GEMM, %.1f ms\n", tuned.shapes(),
                tuned.non_default(), tuned.tune_ms());
    tuned.end_tuning();
  }
}

// Every algorithm the tuner may keep with the split-K sweep on (TuneOptions::split_k): each
// candidate, forced in turn, heuristic results first and then the split-K variants, computes
// the product (the same check as above), for decode-sized shapes of the 21B model; some of them
// split K.
TEST(CudaKernels, TunedGemmSplitCandidatesMatchReference) {
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device";
  Rng rng(std::random_device{}());
  const BlasOnStream b;
  const auto& [stream, blas, workspace] = b;
  struct Case {
    int m, n, k;
    bool f32;
  };
  int split = 0;  // forced candidates that split K
  for (const Case& c :
       {Case{256, 3584, 2560, false}, Case{128, 2560, 2560, false}, Case{65, 192, 2560, true}}) {
    GemmOperands ops(rng, c.m, c.n, c.k, c.f32);
    auto& [x, w, d_x, d_w, d_f32, d_bf16, out] = ops;
    const GemmReference ref = gemm_reference(widen(x), widen(w), c.m, c.n, c.k);
    int candidates = 1;
    for (int force = 0; force < candidates; ++force) {
      SCOPED_TRACE(::testing::Message() << c.m << " x " << c.k << " -> " << c.n
                                        << (c.f32 ? " f32" : " bf16") << ", candidate " << force);
      TunedGemm tuned(TuneOptions{.candidates = 16, .split_k = true, .force = force});
      tuned.begin_tuning();
      d_f32.poison();
      d_bf16.poison();
      ASSERT_TRUE(tuned.run(blas, out, c.f32, d_x.p, d_w.p, c.m, c.n, c.k, workspace.p, workspace.n,
                            stream, true));
      ERNIE_CUDA_CHECK(cudaStreamSynchronize(stream));
      tuned.end_tuning();
      candidates = tuned.last_candidates();
      split += tuned.split_k(c.m, c.n, c.k, c.f32) > 1;
      expect_gemm_close(c.f32 ? d_f32.download() : widen(d_bf16.download()), ref, c.m, c.n, c.f32);
      if (::testing::Test::HasFailure()) break;
    }
  }
  EXPECT_GT(split, 0) << "no candidate split K";
}

// The device tiling of expert weights puts every element where tiled_offset says and zeros in
// the padding columns (K not a multiple of 128 included).
TEST(CudaKernels, TileExpertWeightsMatchesLayout) {
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device";
  Rng rng(std::random_device{}());
  for (auto [rows, k] : {std::pair<int64_t, int64_t>{32, 160}, {64, 96}, {48, 2560}, {16, 8}}) {
    const auto src = random_bf16(rng, static_cast<size_t>(rows * k), 1.0);
    const int64_t kp = tiled_cols(k);
    DeviceBuffer<uint16_t> d_src(src.size()), d_dst(static_cast<size_t>(rows * kp));
    d_src.upload(src);
    d_dst.poison();
    tile_expert_weights(bf(d_dst.p), bf(d_src.p), rows, k, nullptr);
    ERNIE_CUDA_CHECK(cudaDeviceSynchronize());
    const auto dst = d_dst.download();
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < kp; ++c) {
        const uint16_t want = c < k ? src[static_cast<size_t>(r * k + c)] : uint16_t{0};
        ASSERT_EQ(dst[static_cast<size_t>(tiled_offset(r, c, kp))], want)
            << rows << " x " << k << " at (" << r << ", " << c << ")";
      }
    }
  }
}

// The MoE layout from random routings, one CTA (few pairs) and spread over many (a prefill
// chunk): each expert's segment starts where the counts before it, rounded up to whole blocks,
// end; every pair sits once in its expert's segment and pair_pos finds it; every other row is
// padding (-1); block_expert names the expert of each used block and -1 after.
TEST(CudaKernels, MoeAlignLaysOutEveryPair) {
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device";
  Rng rng(std::random_device{}());
  for (int pairs : {7, 3000, 8192, 8193, 49152, 70001}) {
    for (int experts : {64, 160}) {
      for (int block_m : {kMoeBlockSmall, kMoeBlockWgmma, kMoeBlockTall}) {
        SCOPED_TRACE(::testing::Message()
                     << pairs << " pairs, " << experts << " experts, block " << block_m);
        std::vector<int32_t> ids(pairs);
        // Skewed routings too: a quarter of the experts get most pairs, some get none.
        const bool skew = rng.below(2) == 0;
        for (auto& id : ids) {
          id = static_cast<int32_t>(skew && rng.below(4) != 0 ? rng.below(experts / 4)
                                                              : rng.below(experts));
        }
        const int64_t cap = moe_capacity(pairs, experts, block_m);
        const int blocks = static_cast<int>(cap / block_m);
        DeviceBuffer<int32_t> d_ids(pairs), d_sorted(cap), d_block(blocks), d_pos(pairs);
        DeviceBuffer<int32_t> d_scratch(moe_align_scratch_bytes(pairs, experts) / 4 + 1);
        d_ids.upload(ids);
        // Not -1 (padding's value): every row must be written.
        for (auto* buf : {&d_sorted, &d_block, &d_pos, &d_scratch}) {
          ERNIE_CUDA_CHECK(cudaMemset(buf->p, 0x55, buf->n * sizeof(int32_t)));
        }
        moe_align(d_sorted.p, d_block.p, d_pos.p, d_ids.p, pairs, experts, block_m, d_scratch.p,
                  nullptr);
        ERNIE_CUDA_CHECK(cudaDeviceSynchronize());
        const auto sorted = d_sorted.download();
        const auto block_expert = d_block.download();
        const auto pos = d_pos.download();
        std::vector<int64_t> count(experts, 0), start(experts + 1, 0);
        for (int32_t id : ids) ++count[id];
        for (int e = 0; e < experts; ++e) {
          start[e + 1] = start[e] + (count[e] + block_m - 1) / block_m * block_m;
        }
        for (int b = 0; b < blocks; ++b) {
          int want = -1;
          for (int e = 0; e < experts; ++e) {
            if (b * block_m >= start[e] && b * block_m < start[e + 1]) want = e;
          }
          ASSERT_EQ(block_expert[b], want) << "block " << b;
        }
        std::vector<int> seen(cap, 0);
        for (int i = 0; i < pairs; ++i) {
          const int e = ids[i];
          ASSERT_GE(pos[i], start[e]) << "pair " << i;
          ASSERT_LT(pos[i], start[e] + count[e]) << "pair " << i;
          ASSERT_EQ(sorted[pos[i]], i);
          ++seen[pos[i]];
        }
        for (int64_t r = 0; r < cap; ++r) {
          if (seen[r] == 0) {
            ASSERT_EQ(sorted[r], -1) << "row " << r;
          }
        }
      }
    }
  }
}

// Waits for `stream` for at most `seconds`; a GPU that has not finished by then is hung (a
// deadlock in the kernels under test), so the test binary stops rather than block forever.
void finish_or_abort(cudaStream_t stream, double seconds) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (cudaStreamQuery(stream) == cudaErrorNotReady) {
    if (std::chrono::steady_clock::now() > until) {
      ADD_FAILURE() << "the GPU has not finished after " << seconds << " s (deadlock?)";
      std::fflush(stdout);
      std::_Exit(1);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ERNIE_CUDA_CHECK(cudaStreamSynchronize(stream));
}

// Random expert weights of one MoE layer in the tiled layout: gate/up [E * 2I, H], down
// [E * H, I], scaled by 1/sqrt of the reduction. The model's shapes hold half a billion
// weights: a random pool of an odd length, repeated from a random offset, keeps the draw quick.
struct ExpertWeights {
  ExpertWeights(Rng& rng, cudaStream_t stream, int hidden, int inter, int experts)
      : gu(static_cast<size_t>(int64_t{experts} * 2 * inter * tiled_cols(hidden))),
        down(static_cast<size_t>(int64_t{experts} * hidden * tiled_cols(inter))) {
    const int64_t gu_rows = int64_t{experts} * 2 * inter, down_rows = int64_t{experts} * hidden;
    const auto pool = random_bf16(rng, (1 << 20) + 1, 1.0);
    auto pooled = [&](size_t n, double scale) {
      std::vector<uint16_t> v(n);
      const size_t shift = rng.below(pool.size());
      for (size_t i = 0; i < n; ++i) {
        v[i] = float_to_bf16(static_cast<float>(scale) *
                             bf16_to_float(pool[(i + shift) % pool.size()]));
      }
      return v;
    };
    DeviceBuffer<uint16_t> gu_src(static_cast<size_t>(gu_rows * hidden));
    DeviceBuffer<uint16_t> down_src(static_cast<size_t>(down_rows * inter));
    gu_src.upload(pooled(gu_src.n, 1.0 / std::sqrt(hidden)));
    down_src.upload(pooled(down_src.n, 1.0 / std::sqrt(inter)));
    tile_expert_weights(bf(gu.p), bf(gu_src.p), gu_rows, hidden, stream);
    tile_expert_weights(bf(down.p), bf(down_src.p), down_rows, inter, stream);
    ERNIE_CUDA_CHECK(cudaStreamSynchronize(stream));  // before the sources are freed
  }
  DeviceBuffer<uint16_t> gu, down;
};

// A routing of `tokens` tokens for the expert GEMM tests: k distinct experts a token (skewed:
// most from the first quarter), the pairs' routing weights and the tokens' rows.
struct Routing {
  int tokens, k;
  bool skew;
  std::vector<int32_t> ids;
  std::vector<float> wts;
  std::vector<uint16_t> x;
};

Routing random_routing(Rng& rng, int tokens, int experts, int k, int hidden) {
  Routing r{tokens,
            k,
            rng.below(2) == 0,
            std::vector<int32_t>(tokens * k),
            std::vector<float>(tokens * k),
            {}};
  for (int t = 0; t < tokens; ++t) {
    std::vector<int> pool(experts);
    std::iota(pool.begin(), pool.end(), 0);
    std::shuffle(pool.begin(), pool.end(), std::mt19937(static_cast<unsigned>(rng.next())));
    if (r.skew) {
      std::stable_partition(pool.begin(), pool.end(),
                            [&](int e) { return e < experts / 4 && rng.below(4) != 0; });
    }
    for (int j = 0; j < k; ++j) r.ids[t * k + j] = pool[j];
  }
  for (auto& w : r.wts) w = static_cast<float>(rng.uniform(0.05, 1.0));
  r.x = random_bf16(rng, static_cast<size_t>(tokens) * hidden, 1.0);
  return r;
}

// The expert GEMMs' outputs by pair: act [pairs, inter] and y [pairs, hidden].
struct PairRows {
  std::vector<float> act, y;
};

// Whether the 32-row MoE blocks run on the swapped kernel (ERNIE_MOE_SWAP_AB=0: the mma.sync
// tiles, and no 64-row blocks).
bool swapped_kernel_on() {
  const char* v = std::getenv("ERNIE_MOE_SWAP_AB");
  return v == nullptr || std::string(v) != "0";
}

// What one routing through the expert GEMMs left: act [cap, inter] and y [cap, hidden] in the
// sorted layout, each pair's row (pair_pos) and each block's expert.
struct GemmOutputs {
  std::vector<uint16_t> act, y;
  std::vector<int32_t> pos, block_expert;
};

// One routing through align, gate/up and down with blocks of block_m rows (ready: the blocks'
// readiness counters, or null), into outputs poisoned first.
GemmOutputs run_expert_gemms(cudaStream_t stream, int hidden, int inter, int experts,
                             const Routing& r, int block_m, const DeviceBuffer<uint16_t>& d_gu,
                             const DeviceBuffer<uint16_t>& d_down, int32_t* ready,
                             const MoeSwapForm& form = {}) {
  const int k = r.k, tokens = r.tokens, pairs = tokens * k;
  const int64_t cap = moe_capacity(pairs, experts, block_m);
  const int blocks = static_cast<int>(cap / block_m);
  DeviceBuffer<uint16_t> d_x(static_cast<size_t>(tokens) * hidden);
  d_x.upload(r.x);
  DeviceBuffer<int32_t> d_ids(pairs), d_sorted(cap), d_block(blocks), d_pos(pairs);
  DeviceBuffer<int32_t> d_scratch(moe_align_scratch_bytes(pairs, experts) / 4 + 1);
  DeviceBuffer<float> d_wts(pairs);
  DeviceBuffer<uint16_t> d_act(static_cast<size_t>(cap) * inter);
  DeviceBuffer<uint16_t> d_y(static_cast<size_t>(cap) * hidden);
  d_ids.upload(r.ids);
  d_wts.upload(r.wts);
  ERNIE_CUDA_CHECK(cudaMemsetAsync(d_act.p, 0xff, d_act.n * sizeof(uint16_t), stream));
  ERNIE_CUDA_CHECK(cudaMemsetAsync(d_y.p, 0xff, d_y.n * sizeof(uint16_t), stream));
  moe_align(d_sorted.p, d_block.p, d_pos.p, d_ids.p, pairs, experts, block_m, d_scratch.p, stream,
            ready);
  moe_gate_up(bf(d_act.p), bf(d_x.p), bf(d_gu.p), d_sorted.p, d_block.p, cap, block_m, k, hidden,
              inter, experts, stream, SharedFold{}, ready, form);
  moe_down(bf(d_y.p), bf(d_act.p), bf(d_down.p), d_wts.p, d_sorted.p, d_block.p, cap, block_m,
           hidden, inter, experts, stream, SharedFold{}, ready, form);
  finish_or_abort(stream, 20.0);
  return {d_act.download(), d_y.download(), d_pos.download(), d_block.download()};
}

// Every pair's rows of act and y from `run` into `out` (as floats, pair by pair), each checked
// computed (finite where the poison was NaN).
void collect_pair_rows(const GemmOutputs& run, int pairs, int inter, int hidden, PairRows* out) {
  for (int i = 0; i < pairs; ++i) {
    for (auto [v, width, dst, name] : {std::tuple{&run.act, inter, &out->act, "act"},
                                       std::tuple{&run.y, hidden, &out->y, "y"}}) {
      const auto row = v->begin() + static_cast<ptrdiff_t>(run.pos[i]) * width;
      for (int c = 0; c < width; c += 97) {
        ASSERT_TRUE(std::isfinite(bf16_to_float(row[c])))
            << name << " of pair " << i << " column " << c;
      }
      for (int c = 0; c < width; ++c) dst->push_back(bf16_to_float(row[c]));
    }
  }
}

// One routing through the expert GEMMs of block_m-row blocks (32, or 64 on the swapped
// kernel; the 32-row ones paired as `base` says), with and without readiness counters
// (MoeBlockReadyMatchesGridWait); the outputs by pair go to `out`.
void expect_block_ready_matches(cudaStream_t stream, int hidden, int inter, int experts,
                                const Routing& r, int block_m, const DeviceBuffer<uint16_t>& d_gu,
                                const DeviceBuffer<uint16_t>& d_down, PairRows* out,
                                const MoeSwapForm& base = {}) {
  const int k = r.k, tokens = r.tokens, pairs = tokens * k;
  SCOPED_TRACE(::testing::Message()
               << tokens << " tokens, " << hidden << "/" << inter << ", " << experts
               << " experts top-" << k << (r.skew ? ", skewed" : "") << ", blocks of " << block_m
               << (base.pair_blocks ? ", paired" : ""));
  const int blocks = static_cast<int>(moe_capacity(pairs, experts, block_m) / block_m);
  DeviceBuffer<int32_t> d_ready(blocks);
  ERNIE_CUDA_CHECK(cudaMemsetAsync(d_ready.p, 0x7f, d_ready.n * sizeof(int32_t), stream));
  // The align kernels may order an expert's pairs differently from run to run: rows are
  // compared by pair.
  const GemmOutputs grid_wait =
      run_expert_gemms(stream, hidden, inter, experts, r, block_m, d_gu, d_down, nullptr, base);
  const GemmOutputs ready =
      run_expert_gemms(stream, hidden, inter, experts, r, block_m, d_gu, d_down, d_ready.p, base);
  for (int i = 0; i < pairs; ++i) {
    for (auto [a, b, width, name] : {std::tuple{&ready.act, &grid_wait.act, inter, "act"},
                                     std::tuple{&ready.y, &grid_wait.y, hidden, "y"}}) {
      const auto row_a = a->begin() + static_cast<ptrdiff_t>(ready.pos[i]) * width;
      const auto row_b = b->begin() + static_cast<ptrdiff_t>(grid_wait.pos[i]) * width;
      ASSERT_TRUE(std::equal(row_a, row_a + width, row_b))
          << name << " of pair " << i << " differs (rows " << ready.pos[i] << ", "
          << grid_wait.pos[i] << ")";
    }
  }
  collect_pair_rows(ready, pairs, inter, hidden, out);
  if (::testing::Test::HasFatalFailure()) return;
  const auto counters = d_ready.download();
  int used = 0;
  for (int b = 0; b < blocks; ++b) {
    if (ready.block_expert[b] < 0) {
      ASSERT_EQ(counters[b], 0) << "padding block " << b;
    } else {
      ASSERT_GT(counters[b], 0) << "block " << b;
      ASSERT_EQ(counters[b], counters[0]) << "block " << b;
      ++used;
    }
  }
  EXPECT_GT(used, 0);
}

// Rows of `got` against the same rows of `ref` (width values each): every value within 2% of
// its reference row's RMS (the 64-row blocks' wgmma N differs from the 32-row ones', the sums
// in f32 do not: at most a bf16 rounding step apart).
void expect_rows_close(const std::vector<float>& got, const std::vector<float>& ref, int width,
                       const char* name) {
  ASSERT_EQ(got.size(), ref.size());
  for (size_t r = 0; r < ref.size() / width; ++r) {
    double ss = 0.0;
    for (int c = 0; c < width; ++c) ss += double(ref[r * width + c]) * ref[r * width + c];
    const double tol = 0.02 * std::sqrt(ss / width) + 1e-6;
    for (int c = 0; c < width; ++c) {
      ASSERT_LE(std::abs(double(got[r * width + c]) - ref[r * width + c]), tol)
          << name << " row " << r << " column " << c;
    }
  }
}

// The 32-row expert GEMMs with per-M-block readiness counters (each down CTA waits for its own
// M-block's gate/up tiles) compute bit for bit what they compute when down waits for the whole
// gate/up grid, over random and skewed routings, one-CTA and spread layouts, and grids of many
// waves; afterwards every used M-block's counter holds the same positive count (gate/up's
// column tiles) and every padding block's is 0 (the align kernels cleared the poison). The
// same for 64-row blocks (the swapped kernel with 64 rows as N) and for paired 32-row blocks
// (moe_pair_blocks: an expert of two 32-row blocks in one CTA, wgmma's N of 64), whose outputs
// must also match the 32-row blocks' pair by pair, on every routing whatever the step size
// (moe_pair_blocks would give them only from 20 pairs an expert); the routings must hold
// experts of two 32-row blocks.
TEST(CudaKernels, MoeBlockReadyMatchesGridWait) {
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device";
  Rng rng(std::random_device{}());
  ASSERT_TRUE(moe_block_ready_fits(kMoeBlockMid, SharedFold{}));
  ASSERT_TRUE(moe_block_ready_fits(kMoeBlockWide, SharedFold{}));
  const bool wide = swapped_kernel_on();
  cudaStream_t stream;
  ERNIE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  struct Shape {
    int hidden, inter, experts, k;
    std::vector<int> tokens;
  };
  int paired_experts = 0;  // experts of 33-64 pairs in the routings (two 32-row blocks)
  for (const Shape& s : {Shape{2560, 1536, 64, 6, {3, 256, 512, 1500}},
                         Shape{512, 160, 24, 8, {200}}, Shape{160, 96, 24, 6, {200}}}) {
    const ExpertWeights w(rng, stream, s.hidden, s.inter, s.experts);
    for (int tokens : s.tokens) {
      const Routing r = random_routing(rng, tokens, s.experts, s.k, s.hidden);
      std::vector<int> per_expert(s.experts, 0);
      for (int32_t e : r.ids) ++per_expert[e];
      for (int n : per_expert) paired_experts += n > kMoeBlockMid && n <= 2 * kMoeBlockMid;
      PairRows mid;
      expect_block_ready_matches(stream, s.hidden, s.inter, s.experts, r, kMoeBlockMid, w.gu,
                                 w.down, &mid);
      if (!wide || ::testing::Test::HasFatalFailure()) continue;
      struct Form {
        int block_m;
        MoeSwapForm form;
        const char* name;
      };
      for (const Form& f : {Form{kMoeBlockMid, {.pair_blocks = true}, "paired 32-row"},
                            Form{kMoeBlockWide, {}, "64-row"}}) {
        PairRows other;
        expect_block_ready_matches(stream, s.hidden, s.inter, s.experts, r, f.block_m, w.gu, w.down,
                                   &other, f.form);
        if (::testing::Test::HasFatalFailure()) break;
        SCOPED_TRACE(::testing::Message()
                     << tokens << " tokens, " << f.name << " against 32-row blocks");
        expect_rows_close(other.act, mid.act, s.inter, "act");
        expect_rows_close(other.y, mid.y, s.hidden, "y");
        if (::testing::Test::HasFatalFailure()) break;
      }
    }
  }
  if (wide) {
    EXPECT_GT(paired_experts, 0) << "no routing had an expert of two 32-row blocks";
  }
  ERNIE_CUDA_CHECK(cudaStreamDestroy(stream));
}

// The tall wgmma GEMMs (256-row blocks, 192-row weight tiles: ERNIE_WG_TALL) compute what the
// 128-row ones compute, pair by pair (within 2% of each row's RMS), whatever the switch: the
// 21B model's shapes at 700-3000 tokens (several blocks an expert, an expert's last block
// holding one to four 64-row parts of pairs, random and skewed routings), widths that leave the
// last weight tile partial (intermediate 160 and hidden 512 against 96- and 192-row tiles),
// and a reduction that is not a whole number of 64-wide slices (hidden 160, intermediate 96).
TEST(CudaKernels, MoeTallBlocksMatchWgmmaBlocks) {
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device";
  Rng rng(std::random_device{}());
  cudaStream_t stream;
  ERNIE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  struct Shape {
    int hidden, inter, experts, k;
    std::vector<int> tokens;
  };
  for (const Shape& s : {Shape{2560, 1536, 64, 6, {700, 3000}}, Shape{512, 160, 24, 8, {900}},
                         Shape{160, 96, 8, 6, {1500}}}) {
    const ExpertWeights w(rng, stream, s.hidden, s.inter, s.experts);
    for (int tokens : s.tokens) {
      const Routing r = random_routing(rng, tokens, s.experts, s.k, s.hidden);
      const int pairs = tokens * s.k;
      SCOPED_TRACE(::testing::Message()
                   << tokens << " tokens, " << s.hidden << "/" << s.inter << ", " << s.experts
                   << " experts top-" << s.k << (r.skew ? ", skewed" : ""));
      PairRows ref, tall;
      collect_pair_rows(run_expert_gemms(stream, s.hidden, s.inter, s.experts, r, kMoeBlockWgmma,
                                         w.gu, w.down, nullptr),
                        pairs, s.inter, s.hidden, &ref);
      collect_pair_rows(run_expert_gemms(stream, s.hidden, s.inter, s.experts, r, kMoeBlockTall,
                                         w.gu, w.down, nullptr),
                        pairs, s.inter, s.hidden, &tall);
      if (::testing::Test::HasFatalFailure()) break;
      expect_rows_close(tall.act, ref.act, s.inter, "act");
      expect_rows_close(tall.y, ref.y, s.hidden, "y");
      if (::testing::Test::HasFatalFailure()) break;
    }
  }
  ERNIE_CUDA_CHECK(cudaStreamDestroy(stream));
}

// `tokens` distinct cache slots out of num_slots, in random order.
std::vector<int64_t> random_slots(Rng& rng, int num_slots, int tokens) {
  std::vector<int64_t> slots(num_slots);
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), std::mt19937(static_cast<unsigned>(rng.next())));
  slots.resize(tokens);
  return slots;
}

TEST(CudaKernels, RopeStoreKvMatchesCpuReference) {
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device";
  Rng rng(std::random_device{}());
  struct Shape {
    int tokens, heads, kv_heads, head_dim;
  };
  for (const Shape& s :
       {Shape{1, 20, 4, 128}, Shape{37, 4, 2, 48}, Shape{5, 64, 8, 128}, Shape{9, 2, 1, 32}}) {
    SCOPED_TRACE(::testing::Message() << s.tokens << " tokens, " << s.heads << "/" << s.kv_heads
                                      << " heads, d " << s.head_dim);
    const int row = (s.heads + 2 * s.kv_heads) * s.head_dim, kv = s.kv_heads * s.head_dim;
    const int num_slots = 3 * s.tokens + 5;
    const auto qkv = random_bf16(rng, static_cast<size_t>(s.tokens) * row, 1.0);
    std::vector<int32_t> positions(s.tokens);
    for (auto& p : positions) p = static_cast<int32_t>(rng.below(20000));
    const std::vector<int64_t> slots = random_slots(rng, num_slots, s.tokens);
    DeviceBuffer<uint16_t> d_qkv(qkv.size()), d_k(static_cast<size_t>(num_slots) * kv),
        d_v(static_cast<size_t>(num_slots) * kv);
    DeviceBuffer<int32_t> d_pos(positions.size());
    DeviceBuffer<int64_t> d_slots(slots.size());
    d_qkv.upload(qkv);
    d_pos.upload(positions);
    d_slots.upload(slots);
    d_k.poison();
    d_v.poison();
    rope_store_kv(bf(d_qkv.p), bf(d_k.p), bf(d_v.p), d_pos.p, d_slots.p, s.tokens, s.heads,
                  s.kv_heads, s.head_dim, 500000.0, nullptr);
    ERNIE_CUDA_CHECK(cudaDeviceSynchronize());
    const auto got = widen(d_qkv.download());
    const auto k_cache = d_k.download(), v_cache = d_v.download();
    auto ref = widen(qkv);
    for (int t = 0; t < s.tokens; ++t) {
      float* q = ref.data() + static_cast<size_t>(t) * row;
      backend::cpu::rope_interleaved(q, s.heads, s.head_dim, positions[t], 500000.0);
      backend::cpu::rope_interleaved(q + s.heads * s.head_dim, s.kv_heads, s.head_dim, positions[t],
                                     500000.0);
    }
    for (size_t i = 0; i < got.size(); ++i) {
      // bf16 output, and f32 sin/cos of angles up to 2e4 rad on two different libms.
      ASSERT_NEAR(got[i], ref[i], 2e-2 * (std::abs(ref[i]) + 0.1)) << "element " << i;
    }
    std::vector<bool> written(num_slots, false);
    for (int t = 0; t < s.tokens; ++t) {
      written[slots[t]] = true;
      for (int i = 0; i < kv; ++i) {
        const size_t at = static_cast<size_t>(slots[t]) * kv + i;
        EXPECT_EQ(bf16_to_float(k_cache[at]),
                  got[static_cast<size_t>(t) * row + s.heads * s.head_dim + i]);
        EXPECT_EQ(v_cache[at],
                  qkv[static_cast<size_t>(t) * row + (s.heads + s.kv_heads) * s.head_dim + i]);
      }
    }
    for (int slot = 0; slot < num_slots; ++slot) {
      if (!written[slot]) {
        EXPECT_EQ(k_cache[static_cast<size_t>(slot) * kv], 0xffff)
            << "slot " << slot << " was written";
      }
    }
  }
}

// rope_store_kv_vec (16-byte pieces, the frequency table) gives rope_store_kv's bytes: the
// rotated q and k, both caches (poisoned first: only the tokens' slots written).
TEST(CudaKernels, RopeVecAndWideMatchRopeKernel) {
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device";
  Rng rng(std::random_device{}());
  struct Shape {
    int tokens, heads, kv_heads, head_dim;
  };
  const double theta = 500000.0;
  for (const Shape& s :
       {Shape{1, 20, 4, 128}, Shape{16, 20, 4, 128}, Shape{37, 4, 2, 48}, Shape{300, 64, 8, 128},
        Shape{9, 2, 1, 32}, Shape{3, 8, 8, 64}, Shape{2049, 20, 4, 128}}) {
    SCOPED_TRACE(::testing::Message() << s.tokens << " tokens, " << s.heads << "/" << s.kv_heads
                                      << " heads, d " << s.head_dim);
    const int row = (s.heads + 2 * s.kv_heads) * s.head_dim, kv = s.kv_heads * s.head_dim;
    const int num_slots = 2 * s.tokens + 3;
    const auto qkv = random_bf16(rng, static_cast<size_t>(s.tokens) * row, 1.0);
    std::vector<int32_t> positions(s.tokens);
    for (auto& p : positions) p = static_cast<int32_t>(rng.below(130000));
    const std::vector<int64_t> slots = random_slots(rng, num_slots, s.tokens);
    std::vector<float> inv(s.head_dim / 2);  // configure_attention's recipe
    for (int j = 0; j < s.head_dim / 2; ++j) {
      inv[j] = static_cast<float>(1.0 / std::pow(theta, 2.0 * j / s.head_dim));
    }
    DeviceBuffer<int32_t> d_pos(positions.size());
    DeviceBuffer<int64_t> d_slots(slots.size());
    DeviceBuffer<float> d_inv(inv.size());
    d_pos.upload(positions);
    d_slots.upload(slots);
    d_inv.upload(inv);
    // 0: rope_store_kv, 1: rope_store_kv_vec, 2: rope_store_kv_wide.
    std::vector<uint16_t> out_qkv[3], out_k[3], out_v[3];
    for (int vec = 0; vec < 3; ++vec) {
      DeviceBuffer<uint16_t> d_qkv(qkv.size()), d_k(static_cast<size_t>(num_slots) * kv),
          d_v(static_cast<size_t>(num_slots) * kv);
      d_qkv.upload(qkv);
      d_k.poison();
      d_v.poison();
      if (vec == 2) {
        rope_store_kv_wide(bf(d_qkv.p), bf(d_k.p), bf(d_v.p), d_pos.p, d_slots.p, d_inv.p, s.tokens,
                           s.heads, s.kv_heads, s.head_dim, nullptr);
      } else if (vec) {
        rope_store_kv_vec(bf(d_qkv.p), bf(d_k.p), bf(d_v.p), d_pos.p, d_slots.p, d_inv.p, s.tokens,
                          s.heads, s.kv_heads, s.head_dim, nullptr);
      } else {
        rope_store_kv(bf(d_qkv.p), bf(d_k.p), bf(d_v.p), d_pos.p, d_slots.p, s.tokens, s.heads,
                      s.kv_heads, s.head_dim, theta, nullptr);
      }
      ERNIE_CUDA_CHECK(cudaDeviceSynchronize());
      out_qkv[vec] = d_qkv.download();
      out_k[vec] = d_k.download();
      out_v[vec] = d_v.download();
    }
    ASSERT_NE(out_qkv[0], qkv);  // rotated at all
    for (int vec = 1; vec < 3; ++vec) {
      SCOPED_TRACE(vec == 1 ? "vec" : "wide");
      EXPECT_EQ(out_qkv[vec], out_qkv[0]);
      EXPECT_EQ(out_k[vec], out_k[0]);
      EXPECT_EQ(out_v[vec], out_v[0]);
    }
  }
}

struct RopeShape {
  int tokens, heads, kv_heads, head_dim, k;
};

// A qkv projection with rope done two ways on the same random inputs: `unfused(qkv, x, w, n)`
// writes the projection, which rope_store_kv then rotates and stores; `fused(qkv, x, w, rope)`
// does all of it in one kernel. The qkv and both caches must match (poisoned beforehand: the
// step's slots written, every other slot untouched) up to one bf16 rounding step or `floor`
// absolute (the rotation may be contracted into FMAs differently in the two kernels), and 98%
// of the elements bit for bit.
template <typename Unfused, typename Fused>
void expect_fused_rope_matches(Rng& rng, const RopeShape& s, float floor, Unfused unfused,
                               Fused fused) {
  SCOPED_TRACE(::testing::Message() << s.tokens << " tokens, " << s.heads << "/" << s.kv_heads
                                    << " heads, d " << s.head_dim << ", k " << s.k);
  const int row = (s.heads + 2 * s.kv_heads) * s.head_dim, kv = s.kv_heads * s.head_dim;
  const int num_slots = 3 * s.tokens + 5;
  const auto x = random_bf16(rng, static_cast<size_t>(s.tokens) * s.k, 1.0);
  const auto w = random_bf16(rng, static_cast<size_t>(row) * s.k, 1.0 / std::sqrt(s.k));
  std::vector<int32_t> positions(s.tokens);
  for (auto& p : positions) p = static_cast<int32_t>(rng.below(20000));
  const std::vector<int64_t> slots = random_slots(rng, num_slots, s.tokens);
  DeviceBuffer<uint16_t> d_x(x.size()), d_w(w.size());
  DeviceBuffer<int32_t> d_pos(positions.size());
  DeviceBuffer<int64_t> d_slots(slots.size());
  d_x.upload(x);
  d_w.upload(w);
  d_pos.upload(positions);
  d_slots.upload(slots);
  const size_t qkv_elems = static_cast<size_t>(s.tokens) * row;
  const size_t cache_elems = static_cast<size_t>(num_slots) * kv;
  // Separate kernels.
  DeviceBuffer<uint16_t> a_qkv(qkv_elems), a_k(cache_elems), a_v(cache_elems);
  a_qkv.poison();
  a_k.poison();
  a_v.poison();
  unfused(bf(a_qkv.p), bf(d_x.p), bf(d_w.p), row);
  rope_store_kv(bf(a_qkv.p), bf(a_k.p), bf(a_v.p), d_pos.p, d_slots.p, s.tokens, s.heads,
                s.kv_heads, s.head_dim, 500000.0, nullptr);
  // Fused.
  DeviceBuffer<uint16_t> b_qkv(qkv_elems), b_k(cache_elems), b_v(cache_elems);
  b_qkv.poison();
  b_k.poison();
  b_v.poison();
  std::vector<float> inv_freq(s.head_dim / 2);
  for (int j = 0; j < s.head_dim / 2; ++j) {
    inv_freq[j] = static_cast<float>(1.0 / std::pow(500000.0, 2.0 * j / s.head_dim));
  }
  DeviceBuffer<float> d_inv(inv_freq.size());
  d_inv.upload(inv_freq);
  SkinnyRope rope;
  rope.inv_freq = d_inv.p;
  rope.k_cache = bf(b_k.p);
  rope.v_cache = bf(b_v.p);
  rope.positions = d_pos.p;
  rope.slots = d_slots.p;
  rope.heads = s.heads;
  rope.kv_heads = s.kv_heads;
  rope.head_dim = s.head_dim;
  fused(bf(b_qkv.p), bf(d_x.p), bf(d_w.p), rope);
  ERNIE_CUDA_CHECK(cudaDeviceSynchronize());
  int exact = 0, total = 0;
  auto compare = [&](const std::vector<uint16_t>& want, const std::vector<uint16_t>& got,
                     const char* what) {
    for (size_t i = 0; i < want.size(); ++i) {
      ++total;
      if (want[i] == got[i]) {
        ++exact;
        continue;
      }
      // Poison (0xffff, a NaN) must match exactly; values may differ by one rounding step.
      ASSERT_NE(want[i], 0xffff) << what << " element " << i << " written by the fused kernel";
      ASSERT_NE(got[i], 0xffff) << what << " element " << i << " not written";
      const float a = bf16_to_float(want[i]), b = bf16_to_float(got[i]);
      ASSERT_LE(std::abs(a - b), std::abs(a) / 128.0f + floor) << what << " element " << i;
    }
  };
  compare(a_qkv.download(), b_qkv.download(), "qkv");
  compare(a_k.download(), b_k.download(), "k cache");
  compare(a_v.download(), b_v.download(), "v cache");
  EXPECT_GE(exact, total * 0.98) << exact << " of " << total << " bit-identical";
}

// The qkv projection with rope_store_kv in its epilogue gives what the two kernels give one
// after the other.
TEST(CudaKernels, SkinnyGemmRopeMatchesSeparateKernels) {
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device";
  Rng rng(std::random_device{}());
  for (const RopeShape& s : {RopeShape{1, 20, 4, 128, 2560}, RopeShape{3, 4, 2, 48, 264},
                             RopeShape{4, 2, 1, 32, 520}, RopeShape{2, 64, 8, 128, 1024}}) {
    ASSERT_NO_FATAL_FAILURE(expect_fused_rope_matches(
        rng, s, 1e-30f,
        [&](__nv_bfloat16* qkv, const __nv_bfloat16* x, const __nv_bfloat16* w, int n) {
          skinny_gemm(qkv, false, x, w, s.tokens, n, s.k, nullptr);
        },
        [&](__nv_bfloat16* qkv, const __nv_bfloat16* x, const __nv_bfloat16* w,
            const SkinnyRope& rope) {
          ASSERT_TRUE(skinny_rope_fits(s.tokens, s.k, rope));
          skinny_gemm_rope(qkv, x, w, s.tokens, s.k, rope, nullptr);
        }));
  }
}

// The whole-row tensor-core skinny GEMM (up to 32 rows, 16 or 32 weight rows per CTA) against
// a double reference, output poisoned: row counts from 1 to 32 (one and two m16 tiles), the
// 21B qkv and o projections, reductions of one to three load batches per warp (256 to 4096),
// and the CTAs-per-wave count it is chosen by.
TEST(CudaKernels, SkinnyTcMatchesReference) {
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device";
  Rng rng(std::random_device{}());
  EXPECT_FALSE(skinny_tc_fits(33, 64, 2560, 16));
  EXPECT_FALSE(skinny_tc_fits(8, 48, 2560, 32));  // n % 32
  EXPECT_FALSE(skinny_tc_fits(8, 64, 2000, 16));  // k % 256
  EXPECT_FALSE(skinny_tc_fits(8, 64, 4096, 32));  // 32 rows of 8 KB do not fit
  EXPECT_FALSE(skinny_tc_fits(8, 64, 2560, 24));  // 16 or 32 rows per CTA only
  EXPECT_GE(skinny_tc_ctas_per_wave(2560, 16), skinny_tc_ctas_per_wave(2560, 32));
  EXPECT_GT(skinny_tc_ctas_per_wave(2560, 32), 0);
  EXPECT_EQ(skinny_tc_ctas_per_wave(8192, 32), 0);
  struct Case {
    int m, n, k, rows;
  };
  for (const Case& c :
       {Case{16, 3584, 2560, 32}, Case{9, 2560, 2560, 16}, Case{5, 32, 256, 32},
        Case{16, 48, 4096, 16}, Case{1, 64, 1024, 16}, Case{12, 4096, 512, 32},
        Case{7, 160, 3072, 32}, Case{13, 2560, 2560, 32}, Case{16, 3584, 2560, 16},
        Case{32, 3584, 2560, 32}, Case{17, 2560, 2560, 16}, Case{24, 96, 3072, 32}}) {
    SCOPED_TRACE(::testing::Message()
                 << c.m << " x " << c.k << " -> " << c.n << ", " << c.rows << " per CTA");
    ASSERT_TRUE(skinny_tc_fits(c.m, c.n, c.k, c.rows));
    const auto x = random_bf16(rng, static_cast<size_t>(c.m) * c.k, 1.0);
    const auto w = random_bf16(rng, static_cast<size_t>(c.n) * c.k, 1.0 / std::sqrt(c.k));
    DeviceBuffer<uint16_t> d_x(x.size()), d_w(w.size()), d_out(static_cast<size_t>(c.m) * c.n);
    d_x.upload(x);
    d_w.upload(w);
    d_out.poison();
    skinny_tc(bf(d_out.p), bf(d_x.p), bf(d_w.p), c.m, c.n, c.k, c.rows, nullptr);
    ERNIE_CUDA_CHECK(cudaDeviceSynchronize());
    const auto got = widen(d_out.download());
    expect_gemm_matches(got, widen(x), widen(w), c.m, c.n, c.k, false);
  }
}

// skinny_tc_rope against skinny_tc followed by rope_store_kv (the rotation's operands are
// O(1): where its result nearly cancels, the two kernels' FMA contractions differ by up to a
// few 1e-8 absolute, hence the 1e-6 floor).
TEST(CudaKernels, SkinnyTcRopeMatchesSeparateKernels) {
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device";
  Rng rng(std::random_device{}());
  struct Case {
    RopeShape shape;
    int rows;  // per CTA
  };
  for (const Case& c : {Case{{16, 20, 4, 128, 2560}, 32}, Case{{5, 20, 4, 128, 2560}, 16},
                        Case{{11, 4, 2, 48, 512}, 16}, Case{{8, 64, 8, 128, 1024}, 32},
                        Case{{32, 20, 4, 128, 2560}, 32}, Case{{21, 20, 4, 128, 2560}, 16}}) {
    SCOPED_TRACE(::testing::Message() << c.rows << " weight rows per CTA");
    const RopeShape& s = c.shape;
    ASSERT_NO_FATAL_FAILURE(expect_fused_rope_matches(
        rng, s, 1e-6f,
        [&](__nv_bfloat16* qkv, const __nv_bfloat16* x, const __nv_bfloat16* w, int n) {
          skinny_tc(qkv, x, w, s.tokens, n, s.k, c.rows, nullptr);
        },
        [&](__nv_bfloat16* qkv, const __nv_bfloat16* x, const __nv_bfloat16* w,
            const SkinnyRope& rope) {
          ASSERT_TRUE(skinny_tc_rope_fits(s.tokens, s.k, c.rows, rope));
          skinny_tc_rope(qkv, x, w, s.tokens, s.k, c.rows, rope, nullptr);
        }));
  }
}

// The cluster GEMM for decode batches against a double reference, output poisoned: token
// tiles of 64, 128 and 256 (one partial, and two tiles of 256 for 300 tokens), splits of the
// reduction from 1 to 8 (uneven ones too), tokens shared by 2 or 4 tiles (multicast pieces),
// the 21B model's qkv, o and shared-down shapes; a second run must give the same bits (the
// splits are added in rank order).
TEST(CudaKernels, ClusterGemmMatchesReference) {
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device";
  Rng rng(std::random_device{}());
  EXPECT_GT(cluster_gemm_plan(256, 3584, 2560).splits, 0);
  EXPECT_GT(cluster_gemm_plan(17, 2560, 2560).splits, 0);
  EXPECT_EQ(cluster_gemm_plan(256, 3500, 2560).splits, 0);          // n % 128
  EXPECT_EQ(cluster_gemm_plan(256, 3584, 2000).splits, 0);          // k % 64
  EXPECT_FALSE(cluster_gemm_plan_valid({4, 256}, 64, 256, 192));    // 3 slices for 4 splits
  EXPECT_FALSE(cluster_gemm_plan_valid({2, 96}, 64, 256, 256));     // token tile
  EXPECT_FALSE(cluster_gemm_plan_valid({2, 64, 2}, 64, 384, 256));  // 3 tiles for pairs
  EXPECT_FALSE(cluster_gemm_plan_valid({4, 64, 4}, 64, 512, 256));  // clusters of 16
  struct Case {
    int m, n, k, splits, tile, share = 1;
  };
  for (const Case& c :
       {Case{17, 128, 64, 1, 64}, Case{64, 3584, 2560, 4, 64}, Case{100, 2560, 2560, 4, 128},
        Case{256, 3584, 2560, 4, 256}, Case{256, 2560, 3072, 2, 256}, Case{300, 384, 512, 3, 256},
        Case{129, 640, 1024, 8, 256}, Case{1, 256, 192, 2, 64}, Case{200, 256, 2560, 1, 256},
        Case{256, 3584, 2560, 4, 256, 2}, Case{100, 2560, 2560, 2, 128, 4},
        Case{40, 512, 512, 1, 64, 4}, Case{300, 1024, 1024, 3, 256, 2}}) {
    SCOPED_TRACE(::testing::Message()
                 << c.m << " x " << c.k << " -> " << c.n << ", " << c.splits
                 << " splits, token tile " << c.tile << ", shared by " << c.share);
    const ClusterGemmPlan plan{c.splits, c.tile, c.share};
    ASSERT_TRUE(cluster_gemm_plan_valid(plan, c.m, c.n, c.k));
    const auto x = random_bf16(rng, static_cast<size_t>(c.m) * c.k, 1.0);
    const auto w = random_bf16(rng, static_cast<size_t>(c.n) * c.k, 1.0 / std::sqrt(c.k));
    DeviceBuffer<uint16_t> d_x(x.size()), d_w(w.size()), d_out(static_cast<size_t>(c.m) * c.n),
        d_again(static_cast<size_t>(c.m) * c.n);
    d_x.upload(x);
    d_w.upload(w);
    d_out.poison();
    d_again.poison();
    cluster_gemm(bf(d_out.p), bf(d_x.p), bf(d_w.p), c.m, c.n, c.k, plan, nullptr);
    cluster_gemm(bf(d_again.p), bf(d_x.p), bf(d_w.p), c.m, c.n, c.k, plan, nullptr);
    ERNIE_CUDA_CHECK(cudaDeviceSynchronize());
    const auto got = d_out.download();
    EXPECT_TRUE(got == d_again.download()) << "two runs differ";
    expect_gemm_matches(widen(got), widen(x), widen(w), c.m, c.n, c.k, false);
  }
}

// The SwiGLU epilogue against cluster_gemm's gate and up followed by silu_mul, bit for bit
// (the same plan: the same sums, rounded to bf16 before the activation as silu_mul reads them).
TEST(CudaKernels, ClusterGemmSwiGluMatchesSeparateKernels) {
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device";
  Rng rng(std::random_device{}());
  struct Case {
    int m, inter, k;
    ClusterGemmPlan plan;
  };
  for (const Case& c :
       {Case{256, 3072, 2560, cluster_gemm_plan(256, 6144, 2560)}, Case{40, 128, 640, {4, 64}},
        Case{130, 192, 1024, {1, 256}}, Case{77, 3072, 2560, cluster_gemm_plan(77, 6144, 2560)},
        Case{256, 3072, 2560, {2, 256, 4}}}) {
    const int n = 2 * c.inter;
    SCOPED_TRACE(::testing::Message()
                 << c.m << " x " << c.k << " -> " << n << ", " << c.plan.splits << " splits");
    ASSERT_TRUE(cluster_gemm_plan_valid(c.plan, c.m, n, c.k));
    const auto x = random_bf16(rng, static_cast<size_t>(c.m) * c.k, 1.0);
    const auto w = random_bf16(rng, static_cast<size_t>(n) * c.k, 2.0 / std::sqrt(c.k));
    DeviceBuffer<uint16_t> d_x(x.size()), d_w(w.size()), d_gu(static_cast<size_t>(c.m) * n),
        d_want(static_cast<size_t>(c.m) * c.inter), d_got(static_cast<size_t>(c.m) * c.inter);
    d_x.upload(x);
    d_w.upload(w);
    d_gu.poison();
    d_want.poison();
    d_got.poison();
    cluster_gemm(bf(d_gu.p), bf(d_x.p), bf(d_w.p), c.m, n, c.k, c.plan, nullptr);
    silu_mul(bf(d_want.p), bf(d_gu.p), c.m, c.inter, nullptr);
    cluster_gemm_swiglu(bf(d_got.p), bf(d_x.p), bf(d_w.p), c.m, n, c.k, c.plan, nullptr);
    ERNIE_CUDA_CHECK(cudaDeviceSynchronize());
    const auto want = d_want.download(), got = d_got.download();
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_NE(got[i], 0xffff) << "element " << i << " not written";
      ASSERT_EQ(got[i], want[i]) << "element " << i;
    }
  }
}

// cluster_gemm_rope against cluster_gemm followed by rope_store_kv (the same plan).
TEST(CudaKernels, ClusterGemmRopeMatchesSeparateKernels) {
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device";
  Rng rng(std::random_device{}());
  struct Case {
    RopeShape shape;
    int share;  // 0: cluster_gemm_plan's plan
  };
  for (const Case& c : {Case{{256, 20, 4, 128, 2560}, 0}, Case{{33, 4, 2, 48, 512}, 0},
                        Case{{100, 20, 4, 128, 2560}, 0}, Case{{17, 64, 8, 128, 1024}, 0},
                        Case{{256, 20, 4, 128, 2560}, 2}, Case{{70, 20, 4, 128, 2560}, 4}}) {
    const RopeShape& s = c.shape;
    const int n = (s.heads + 2 * s.kv_heads) * s.head_dim;
    ClusterGemmPlan plan = cluster_gemm_plan(s.tokens, n, s.k);
    ASSERT_GT(plan.splits, 0);
    if (c.share > 0) plan = {8 / c.share, plan.token_tile, c.share};
    ASSERT_TRUE(cluster_gemm_plan_valid(plan, s.tokens, n, s.k));
    SCOPED_TRACE(::testing::Message() << plan.splits << " splits, shared by " << plan.share);
    ASSERT_NO_FATAL_FAILURE(expect_fused_rope_matches(
        rng, s, 1e-6f,
        [&](__nv_bfloat16* qkv, const __nv_bfloat16* x, const __nv_bfloat16* w, int cols) {
          cluster_gemm(qkv, x, w, s.tokens, cols, s.k, plan, nullptr);
        },
        [&](__nv_bfloat16* qkv, const __nv_bfloat16* x, const __nv_bfloat16* w,
            const SkinnyRope& rope) {
          ASSERT_TRUE(cluster_gemm_rope_fits(rope));
          cluster_gemm_rope(qkv, x, w, s.tokens, s.k, rope, plan, nullptr);
        }));
  }
}

struct RouteShape {
  int tokens, hidden, experts, k;
};

// ids and weights [tokens, k] against the CPU reference router (cpu::route_token on f32 logits):
// the same experts in the same order and the same weights, except that a genuine near tie of
// biased scores may order differently (at most two tokens per shape); such a token's weights
// are not compared (a different pick changes the sum they are divided by).
void expect_reference_routes(const RouterInputs& in, const RouteShape& s,
                             const std::vector<int32_t>& ids, const std::vector<float>& wts) {
  const auto xf = widen(in.x);
  std::vector<float> logits(static_cast<size_t>(s.tokens) * s.experts);
  backend::cpu::gemm_xwt(logits.data(), xf.data(), in.w.data(), s.tokens, s.experts, s.hidden);
  int near_tie_tokens = 0;
  for (int t = 0; t < s.tokens; ++t) {
    std::vector<int32_t> ref_ids(s.k);
    std::vector<float> ref_w(s.k);
    const float* lg = logits.data() + static_cast<size_t>(t) * s.experts;
    backend::cpu::route_token(lg, in.bias.data(), s.experts, s.k, 1e-12f, ref_ids.data(),
                              ref_w.data());
    bool tie = false;
    for (int r = 0; r < s.k; ++r) {
      const int32_t got = ids[static_cast<size_t>(t) * s.k + r];
      ASSERT_GE(got, 0);
      ASSERT_LT(got, s.experts);
      if (got != ref_ids[r]) {
        // Only a genuine near tie of biased scores may order differently.
        double mx = *std::max_element(lg, lg + s.experts), z = 0;
        for (int e = 0; e < s.experts; ++e) z += std::exp(double(lg[e]) - mx);
        auto score = [&](int e) { return std::exp(double(lg[e]) - mx) / z + in.bias[e]; };
        ASSERT_NEAR(score(got), score(ref_ids[r]), 1e-5) << "token " << t << " rank " << r;
        tie = true;
      }
    }
    near_tie_tokens += tie;
    for (int r = 0; r < s.k && !tie; ++r) {
      ASSERT_NEAR(wts[static_cast<size_t>(t) * s.k + r], ref_w[r], 1e-5)
          << "token " << t << " rank " << r;
    }
  }
  EXPECT_LE(near_tie_tokens, 2);
}

TEST(CudaKernels, RouterMatchesCpuReference) {
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device";
  Rng rng(std::random_device{}());
  // Up to 8 tokens a CTA per expert (8192 columns: a 32 KB weight row; 1024 experts: the most
  // allowed); more split the reduction over CTAs on the tensor cores (12, 17, 32 tokens: 10
  // splits or more), many do not; 24 and 160 experts leave partial expert tiles.
  for (const RouteShape& s :
       {RouteShape{300, 2560, 64, 6}, RouteShape{17, 8192, 64, 8}, RouteShape{40, 128, 24, 8},
        RouteShape{3, 96, 16, 1}, RouteShape{1, 2560, 64, 6}, RouteShape{2000, 2560, 64, 6},
        RouteShape{70, 512, 160, 8}, RouteShape{8, 8192, 64, 8}, RouteShape{5, 2560, 1024, 8},
        RouteShape{32, 2560, 64, 6}, RouteShape{12, 2560, 64, 6}}) {
    SCOPED_TRACE(::testing::Message()
                 << s.tokens << "x" << s.hidden << ", " << s.experts << " experts top-" << s.k);
    RouterInputs in(rng, s.tokens, s.hidden, s.experts);
    DeviceBuffer<float> d_wts(static_cast<size_t>(s.tokens) * s.k);
    DeviceBuffer<int32_t> d_ids(static_cast<size_t>(s.tokens) * s.k);
    d_ids.poison();
    d_wts.poison();
    route_topk(d_ids.p, d_wts.p, bf(in.d_x.p), in.d_w.p, in.d_b.p, s.tokens, s.hidden, s.experts,
               s.k, 1e-12f, in.d_scratch.p, nullptr);
    ERNIE_CUDA_CHECK(cudaDeviceSynchronize());
    expect_reference_routes(in, s, d_ids.download(), d_wts.download());
  }
}

// The router's weights as bf16 terms (split_router_terms: lo, mid, hi, adding up to each f32
// weight exactly), their GEMM with x by cuBLAS as the CUDA backend runs it for many tokens, and
// the top-k of the summed terms (route_topk_terms) route as the CPU reference does. Weights
// include subnormal ones and ones a single bf16 holds (mid and lo zero).
TEST(CudaKernels, RouterTermsMatchCpuReference) {
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device";
  Rng rng(std::random_device{}());
  cublasHandle_t handle;
  ASSERT_EQ(cublasCreate(&handle), CUBLAS_STATUS_SUCCESS);
  for (const RouteShape& s : {RouteShape{300, 2560, 64, 6}, RouteShape{8192, 2560, 64, 6},
                              RouteShape{65, 512, 160, 8}, RouteShape{1000, 96, 24, 3}}) {
    SCOPED_TRACE(::testing::Message()
                 << s.tokens << "x" << s.hidden << ", " << s.experts << " experts top-" << s.k);
    RouterInputs in(rng, s.tokens, s.hidden, s.experts);
    for (size_t i = 0; i < in.w.size(); i += 97) in.w[i] = std::ldexp(in.w[i], -140);
    for (size_t i = 5; i < in.w.size(); i += 101) in.w[i] = 0.375f;
    in.d_w.upload(in.w);
    const size_t count = in.w.size();
    DeviceBuffer<uint16_t> d_terms(kRouterTerms * count);
    d_terms.poison();
    split_router_terms(bf(d_terms.p), in.d_w.p, static_cast<int64_t>(count), nullptr);
    ERNIE_CUDA_CHECK(cudaDeviceSynchronize());
    const auto terms = d_terms.download();
    for (size_t i = 0; i < count; ++i) {  // lo + mid + hi is the weight
      const double sum = static_cast<double>(bf16_to_float(terms[i])) +
                         bf16_to_float(terms[count + i]) + bf16_to_float(terms[2 * count + i]);
      if (std::fabs(in.w[i]) < 0x1p-100f) {
        // The conversions may flush subnormal terms: off by less than the smallest normal.
        ASSERT_LT(std::fabs(sum - in.w[i]), 0x1p-126) << "weight " << i;
        continue;
      }
      ASSERT_EQ(sum, static_cast<double>(in.w[i])) << "weight " << i;
      ASSERT_EQ(terms[2 * count + i], float_to_bf16(in.w[i]))
          << "weight " << i << ": hi is not its bf16 rounding";
    }
    const int cols = kRouterTerms * s.experts;
    DeviceBuffer<float> d_partial(static_cast<size_t>(s.tokens) * cols);
    d_partial.poison();
    const float alpha = 1.0f, beta = 0.0f;
    ASSERT_EQ(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, cols, s.tokens, s.hidden, &alpha,
                           d_terms.p, CUDA_R_16BF, s.hidden, in.d_x.p, CUDA_R_16BF, s.hidden, &beta,
                           d_partial.p, CUDA_R_32F, cols, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
              CUBLAS_STATUS_SUCCESS);
    DeviceBuffer<float> d_wts(static_cast<size_t>(s.tokens) * s.k);
    DeviceBuffer<int32_t> d_ids(static_cast<size_t>(s.tokens) * s.k);
    d_ids.poison();
    d_wts.poison();
    route_topk_terms(d_ids.p, d_wts.p, d_partial.p, in.d_b.p, s.tokens, s.experts, s.k, 1e-12f,
                     nullptr);
    ERNIE_CUDA_CHECK(cudaDeviceSynchronize());
    expect_reference_routes(in, s, d_ids.download(), d_wts.download());
  }
  cublasDestroy(handle);
}

// Up to 8 tokens the router kernel can also lay the pairs out (moe_align's job) in the same
// launch: the ids and weights must be exactly those of the separate kernels, the layout must
// hold every pair once in its expert's blocks, and back-to-back launches must each finish
// (the last CTA resets the arrival count). Tied shapes give experts in pairs the same router
// row and bias, so equal scores must be ordered by id as the separate top-k orders them (the
// fused tail stores them differently: ERNIE_LEAN_TAIL). A NaN input makes every score NaN: the
// ids then repeat expert 0, and the one-token layout must hand over to the general one.
TEST(CudaKernels, RouterLayoutMatchesSeparateAlign) {
  if (device_count() == 0) GTEST_SKIP() << "no CUDA device";
  Rng rng(std::random_device{}());
  struct Shape {
    int tokens, hidden, experts, k, block_m;
    bool tied = false, nan = false;
  };
  for (const Shape& s :
       {Shape{1, 2560, 64, 6, kMoeBlockSmall}, Shape{8, 2560, 64, 6, kMoeBlockSmall},
        Shape{3, 2560, 64, 6, kMoeBlockMid}, Shape{5, 128, 24, 8, kMoeBlockSmall},
        Shape{7, 512, 160, 8, kMoeBlockMid}, Shape{2, 8192, 1024, 8, kMoeBlockSmall},
        Shape{1, 2560, 64, 6, kMoeBlockSmall, true}, Shape{8, 256, 64, 8, kMoeBlockSmall, true},
        Shape{4, 128, 256, 8, kMoeBlockSmall}, Shape{1, 512, 160, 8, kMoeBlockMid},
        Shape{1, 256, 64, 6, kMoeBlockSmall, false, true}}) {
    SCOPED_TRACE(::testing::Message()
                 << s.tokens << "x" << s.hidden << ", " << s.experts << " experts top-" << s.k
                 << (s.tied ? ", tied" : "") << (s.nan ? ", NaN input" : ""));
    const int pairs = s.tokens * s.k;
    const int64_t cap = moe_capacity(pairs, s.experts, s.block_m);
    const int blocks = static_cast<int>(cap / s.block_m);
    RouterInputs in(rng, s.tokens, s.hidden, s.experts);
    in.vary(s.hidden, s.experts, s.tied, s.nan ? 1 : 0);
    DeviceBuffer<float> d_wts(pairs);
    DeviceBuffer<int32_t> d_ids(pairs), d_sorted(cap), d_block(blocks), d_pos(pairs);
    d_ids.poison();
    d_wts.poison();
    d_block.poison();
    EXPECT_FALSE(route_topk(d_ids.p, d_wts.p, bf(in.d_x.p), in.d_w.p, in.d_b.p, s.tokens, s.hidden,
                            s.experts, s.k, 1e-12f, in.d_scratch.p, nullptr));
    ASSERT_EQ(moe_align_scratch_bytes(pairs, s.experts), 0u);
    moe_align(d_sorted.p, d_block.p, d_pos.p, d_ids.p, pairs, s.experts, s.block_m, nullptr,
              nullptr);
    ERNIE_CUDA_CHECK(cudaDeviceSynchronize());
    const auto ids = d_ids.download();
    const auto wts = d_wts.download();
    const auto block_expert = d_block.download();
    const RouteLayout layout{d_sorted.p, d_block.p, d_pos.p, s.block_m, blocks};
    for (int run = 0; run < 3; ++run) {
      d_ids.poison();
      d_wts.poison();
      d_sorted.poison();
      d_block.poison();
      d_pos.poison();
      EXPECT_TRUE(route_topk(d_ids.p, d_wts.p, bf(in.d_x.p), in.d_w.p, in.d_b.p, s.tokens, s.hidden,
                             s.experts, s.k, 1e-12f, in.d_scratch.p, nullptr, &layout));
      ERNIE_CUDA_CHECK(cudaDeviceSynchronize());
      const auto f_ids = d_ids.download();
      const auto f_wts = d_wts.download();
      ASSERT_EQ(f_ids, ids) << "run " << run;
      for (int i = 0; i < pairs; ++i) {  // bit for bit (NaN included)
        ASSERT_EQ(std::bit_cast<uint32_t>(f_wts[i]), std::bit_cast<uint32_t>(wts[i]))
            << "run " << run << " pair " << i;
      }
      ASSERT_EQ(d_block.download(), block_expert) << "run " << run;
      const auto sorted = d_sorted.download();
      const auto pos = d_pos.download();
      int filled = 0;
      for (int32_t v : sorted) filled += v >= 0;
      EXPECT_EQ(filled, pairs);
      for (int i = 0; i < pairs; ++i) {
        ASSERT_GE(pos[i], 0);
        ASSERT_LT(pos[i], cap);
        ASSERT_EQ(sorted[pos[i]], i);
        ASSERT_EQ(block_expert[pos[i] / s.block_m], ids[i]);
      }
    }
  }
}

}  // namespace
}  // namespace ernie::cuda
