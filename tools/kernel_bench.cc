// Times the CUDA backend's heavy ops at the seed benchmark's shapes (21B: hidden 2560, 64
// experts top-6, I 1536, 20/4 heads of 128) with random data, and prints each beside the floor
// its bytes or FLOPs imply on the device: MoE experts (decode and prefill batches), decode
// attention over long contexts, prefill attention; then whole steps of the 21B model
// (dummy weights, CUDA graphs as the server runs them) beside the roofline floor of the step.
// Usage: ernie_kernel_bench [iterations] [ops|steps|timeline|all] [case,...]: a case list runs
// only those steps ("32x4000": any sequences x context; "16": the default cases of 16
// sequences; "8x1000/1000+192x1000": eight 1000-token prompts prefilled beside 192 decodes, a
// serving step with a prefill chunk; handy under a profiler). `timeline` times the steps, then
// records one more of each through CUPTI (builds with CUPTI only) and prints where its time went
// kernel by kernel, gaps included. Inputs are random (unit normal); the buffers it makes are kept
// until it exits.
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/device.h"
#include "common/check.h"
#ifdef ERNIE_HAVE_CUPTI
#include "kernel_trace.h"
#endif
#include "model/config.h"
#include "model/ernie45.h"
#include "model/roofline.h"
#include "model/synthetic.h"
#include "step_cases.h"

namespace ernie {
namespace {

using backend::Backend;

using backend::RandomInit;
using backend::StepInput;
using backend::Tensor;

// Streaming read bandwidth, measured on this device at start (cuda::measure_read_bandwidth);
// the bf16 dense GEMM rate measured on an H100 (an H200's is the same).
double peak_bytes = 3.1e12;
constexpr double kPeakFlops = 790e12;

// Mean seconds per call of `fn` over `iters` calls after two warm-ups (the device is
// synchronised around the timed loop only).
template <typename F>
double time_it(int iters, F&& fn) {
  fn();
  fn();
  cudaDeviceSynchronize();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) fn();
  cudaDeviceSynchronize();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
}

void report(const char* what, double sec, double bytes, double flops) {
  const double floor_s = std::max(bytes / peak_bytes, flops / kPeakFlops);
  std::printf("%-44s %9.3f ms  %6.2f TB/s  %7.1f TFLOP/s  floor %8.3f ms  x%.2f\n", what, sec * 1e3,
              bytes / sec / 1e12, flops / sec / 1e12, floor_s * 1e3, sec / floor_s);
}

// One sequence per entry of `contexts`, sequence i with fresh[i] new tokens at the end.
StepInput make_step(const std::vector<int>& contexts, const std::vector<int>& fresh, int block) {
  StepInput s;
  int width = 1;
  for (int c : contexts) width = std::max(width, (c + block - 1) / block);
  s.max_blocks_per_seq = width;
  s.query_start = {0};
  // Cache blocks in the order a fresh server hands them out (each sequence's blocks in a row),
  // or with ERNIE_BENCH_SHUFFLE_BLOCKS=1 in a fixed random order (a cache after much churn).
  int total = 0;
  for (int c : contexts) total += (c + block - 1) / block;
  std::vector<int> order(static_cast<size_t>(total));
  std::iota(order.begin(), order.end(), 0);
  if (const char* v = std::getenv("ERNIE_BENCH_SHUFFLE_BLOCKS"); v && std::string(v) == "1") {
    std::shuffle(order.begin(), order.end(), std::mt19937(7));
  }
  int next_block = 0;
  for (size_t i = 0; i < contexts.size(); ++i) {
    const int c = contexts[i];
    const int first = next_block;
    const int seq = s.num_seqs();
    for (int p = c - fresh[i]; p < c; ++p) {
      // Distinct tokens per sequence, so that a decode batch routes like real text does
      // (identical tokens would all pick the same experts).
      s.token_ids.push_back(1000 + (seq * 7919 + p * 31) % 90000);
      s.positions.push_back(p);
      s.slot_mapping.push_back(static_cast<int64_t>(order[first + p / block]) * block + p % block);
    }
    s.query_start.push_back(s.num_tokens());
    s.context_lens.push_back(c);
    s.logits_indices.push_back(s.num_tokens() - 1);
    for (int b = 0; b < width; ++b)
      s.block_tables.push_back(b < (c + block - 1) / block ? order[first + b] : -1);
    next_block += (c + block - 1) / block;
  }
  return s;
}

// The same with `fresh` new tokens in every sequence.
StepInput make_step(const std::vector<int>& contexts, int fresh, int block) {
  return make_step(contexts, std::vector<int>(contexts.size(), fresh), block);
}

int run_ops(int iters) {
  auto be = backend::make_cuda_backend(0);
  const int64_t h = 2560, e = 64, k = 6, ie = 1536, si = 3072;
  const int heads = 20, kv_heads = 4, d = 128, block = 16;

  // ---- MoE experts (router, align, grouped GEMMs, combine; shared experts included) ----
  backend::MoeWeights w;
  w.router = be->random_weight({e, h}, DType::kF32, RandomInit{false, 0, 0.04}, 1);
  w.router_bias = be->random_weight({e}, DType::kF32, RandomInit{true, -0.015, 0.015}, 2);
  w.experts_gate_up = be->random_weight({e, 2 * ie, h}, DType::kBF16, {false, 0, 0.02}, 3);
  w.experts_down = be->random_weight({e, h, ie}, DType::kBF16, {false, 0, 0.025}, 4);
  w.shared_gate_up = be->random_weight({2 * si, h}, DType::kBF16, {false, 0, 0.02}, 5);
  w.shared_down = be->random_weight({h, si}, DType::kBF16, {false, 0, 0.018}, 6);
  be->prepare_moe(w);
  w.top_k = static_cast<int>(k);
  for (int64_t tokens : {1, 16, 64, 128, 256, 512, 1024, 8192}) {
    Tensor x = be->random_weight({tokens, h}, DType::kBF16, {false, 0, 1}, 7);
    Tensor out = be->random_weight({tokens, h}, DType::kBF16, {false, 0, 1}, 8);
    const double sec = time_it(iters, [&] { be->moe(out, x, w); });
    const double touched = model::expected_experts_touched(e, k, tokens);
    const double bytes = (touched * 3 * ie + 3 * si) * h * 2 + e * h * 4;
    const double flops = 6.0 * tokens * h * (k * ie + si);
    char what[64];
    std::snprintf(what, sizeof what, "moe layer, %lld tokens", static_cast<long long>(tokens));
    report(what, sec, bytes, flops);
    // Where the layer's time goes: one call with the stage profile on, after one more whose
    // figures are dropped (the profile runs the shared experts through cuBLAS at every size:
    // at one token the timed runs never did, and its first call loads kernels, ~0.13 s).
    be->enable_profile(true);
    backend::StageProfile p;
    for (int rep = 0; rep < 2; ++rep) {
      be->mark(backend::Stage::kMoeRouter);
      be->moe(out, x, w);
      p = be->take_profile();
    }
    be->enable_profile(false);
    std::printf("  stages:");
    for (int i = 0; i < static_cast<int>(backend::Stage::kCount); ++i) {
      if (p.ms[i] > 0) std::printf(" %s %.3f ms", backend::stage_name(backend::Stage(i)), p.ms[i]);
    }
    std::printf("\n");
  }

  // ---- attention (one layer) ----
  // The "1 KV head" cases read the same bytes with the same CTAs as the 4-head case above them
  // (4x the sequences, a quarter of the heads each): a cache block of one head is then 4 KB in
  // one piece instead of 16 rows of 256 bytes 1 KB apart, which tells how much the cache layout
  // costs decode attention.
  struct Case {
    const char* name;
    int seqs, context, fresh;
    int decodes = 0;   // of the seqs, the first `decodes` add one token (a mixed step)
    int kv_heads = 4;  // query heads: 5 per KV head
  };
  const Case cases[] = {
      Case{"decode attention, 1 x 1000", 1, 1000, 1},
      Case{"decode attention, 16 x 8500", 16, 8500, 1},
      Case{"decode attention, 64 x 8500, 1 KV head", 64, 8500, 1, 0, 1},
      Case{"decode attention, 64 x 1500", 64, 1500, 1},
      Case{"decode attention, 256 x 1500", 256, 1500, 1},
      Case{"decode attention, 1024 x 1500, 1 KV head", 1024, 1500, 1, 0, 1},
      Case{"prefill attention, 1 x 8000", 1, 8000, 8000},
      Case{"prefill chunk 2048 after 6000", 1, 8048, 2048},
      Case{"mixed: 8000 prefill + 15 decodes at 8000", 16, 8000, 8000, 15},
      // The 256-prompt serving step's attention and its two parts alone.
      Case{"prefill attention, 8 x 1000", 8, 1000, 1000},
      Case{"decode attention, 192 x 1000", 192, 1000, 1},
      Case{"mixed: 8 x 1000 prefill + 192 decodes at 1000", 200, 1000, 1000, 192}};
  for (const Case& c : cases) {
    const int kvh = c.kv_heads, qh = heads / kv_heads * kvh;
    be->configure_attention({qh, kvh, d, 500000.0, 0.08838834764831845f});
    const int64_t row = (qh + 2 * kvh) * d;
    const std::vector<int> contexts(c.seqs, c.context);
    const int64_t blocks = static_cast<int64_t>(c.seqs) * ((c.context + block - 1) / block);
    be->allocate_kv_cache(1, blocks, block);
    // Fill the cache: every token of every sequence through rope_store_kv, then the step.
    const StepInput fill = make_step(contexts, c.context, block);
    be->begin_step(fill);
    be->rope_store_kv(be->random_weight({fill.num_tokens(), row}, DType::kBF16, {}, 9), 0);
    std::vector<int> fresh(c.seqs, c.fresh);
    std::fill(fresh.begin(), fresh.begin() + c.decodes, 1);
    const StepInput st = make_step(contexts, fresh, block);
    be->begin_step(st);
    Tensor qkv = be->random_weight({st.num_tokens(), row}, DType::kBF16, {}, 10);
    Tensor out = be->scratch({st.num_tokens(), qh * d}, DType::kBF16);
    be->rope_store_kv(qkv, 0);
    const double sec = time_it(iters, [&] { be->attention(out, qkv, 0); });
    double visible = 0;
    for (int32_t p : st.positions) visible += p + 1.0;
    const double bytes = static_cast<double>(c.seqs) * c.context * 2 * kvh * d * 2;
    report(c.name, sec, bytes, 4 * visible * qh * d);
  }
  return 0;
}

// Whole steps of the 21B model (tools/step_cases.h): decode steps replayed from the CUDA graph
// the server would use (step input upload included, sampling not); steps with prefill chunks
// run eagerly, as the server runs them. The floor is the step's bytes or FLOPs
// (model::step_cost) at the device's peak, whichever takes longer.
int run_steps(int iters, const std::vector<std::string>& only, bool timeline) {
  const std::vector<bench::StepCase> cases = bench::parse_step_cases(only);
  auto be = backend::make_cuda_backend(0);
  const model::ModelConfig cfg = model::parse_config(model::preset_config("21b-a3b"));
  model::Ernie45 m(cfg, model::dummy_weights(cfg, *be), *be);
  const int block = 16;
  int64_t blocks = 0;
  int max_width = 1, max_batch = 0;
  for (const bench::StepCase& c : cases) {
    int64_t case_blocks = 0;
    for (const bench::StepGroup& g : c.groups) {
      const int width = (g.context + block - 1) / block;
      case_blocks += static_cast<int64_t>(g.seqs) * width;
      max_width = std::max(max_width, width);
    }
    blocks = std::max(blocks, case_blocks);
    if (c.decode_only()) max_batch = std::max(max_batch, c.sequences());
  }
  be->allocate_kv_cache(static_cast<int>(cfg.num_hidden_layers), blocks, block);
  const int graphs = m.enable_graphs(max_batch, max_width);
  std::printf("steps: 21b-a3b dummy weights, %d graphs, %lld KV blocks of %d\n", graphs,
              static_cast<long long>(blocks), block);
  for (const bench::StepCase& c : cases) {
    std::vector<int> contexts, fresh;
    for (const bench::StepGroup& g : c.groups) {
      contexts.insert(contexts.end(), g.seqs, g.context);
      fresh.insert(fresh.end(), g.seqs, g.fresh);
    }
    const StepInput st = make_step(contexts, fresh, block);
    const double sec = time_it(iters, [&] { m.forward_logits(st); });
    // One more step inside a profiler range (scripts/gpu_profile.sh collects only that one).
    cudaProfilerStart();
    m.forward_logits(st);
    cudaDeviceSynchronize();
    cudaProfilerStop();
    double bytes = 0, flops = 0;
    for (const model::StageCost& s : model::step_cost(cfg, st)) {
      bytes += s.bytes;
      flops += s.flops;
    }
    report(c.label().c_str(), sec, bytes, flops);
    if (timeline) {
#ifdef ERNIE_HAVE_CUPTI
      trace::start();
      const auto host0 = std::chrono::steady_clock::now();
      m.forward_logits(st);
      const double host_ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - host0)
              .count();
      const std::vector<trace::KernelSpan> spans = trace::stop();
      trace::print_summary(spans, 30);
      // Whether the host keeps ahead: the launches' time against the kernels' span.
      std::printf("  host: the step's launches took %.3f ms; its first kernels:\n", host_ms);
      trace::print_window(spans, 0, 4);
      // A layer's worth from the middle of the step (decode steps: from the 150th, as before;
      // eager steps launch more kernels a layer).
      const size_t per_layer = spans.size() / static_cast<size_t>(cfg.num_hidden_layers);
      const size_t first = c.decode_only() ? 150 : per_layer * (cfg.num_hidden_layers / 2);
      std::printf("  one layer's kernels (from kernel %zu):\n", first);
      trace::print_window(spans, first, std::max<size_t>(16, per_layer + 2));
#endif
    }
  }
  return 0;
}

// Sampling a step's rows of the 21B vocabulary (Backend::sample: host packing, upload, kernels,
// the ids back), with an OpenAI request's defaults (temperature 1) and greedy. The floor is one
// read of the logits.
int run_sampling(int iters) {
  auto be = backend::make_cuda_backend(0);
  const int64_t vocab = 103424;
  for (int rows : {1, 16, 256}) {
    Tensor logits = be->random_weight({rows, vocab}, DType::kF32, RandomInit{false, 0, 3}, 11);
    for (bool greedy : {false, true}) {
      std::vector<backend::SamplingRow> params(rows);
      for (int r = 0; r < rows; ++r) {
        params[r].temperature = greedy ? 0.0f : 1.0f;
        params[r].seed = static_cast<uint64_t>(r);
        params[r].position = r;
      }
      const double sec = time_it(iters, [&] { be->sample(logits, params); });
      char what[64];
      std::snprintf(what, sizeof what, "sampling, %d rows%s", rows, greedy ? ", greedy" : "");
      report(what, sec, static_cast<double>(rows) * vocab * 4, 0);
    }
  }
  return 0;
}

}  // namespace
}  // namespace ernie

int main(int argc, char** argv) {
  try {
    const int iters = argc > 1 ? std::atoi(argv[1]) : 20;
    const std::string what = argc > 2 ? argv[2] : "all";
    std::vector<std::string> only;  // "16" (every case of 16 sequences) or "16x8500"
    if (argc > 3) {
      std::stringstream list(argv[3]);
      for (std::string item; std::getline(list, item, ',');) only.push_back(item);
    }
    ernie::require(iters > 0 && (what == "all" || what == "ops" || what == "steps" ||
                                 what == "timeline" || what == "sampling"),
                   "usage: ernie_kernel_bench [iterations > 0] [ops|steps|timeline|sampling|all] "
                   "[SEQS[xCONTEXT[/NEW]][+...],...]");
#ifndef ERNIE_HAVE_CUPTI
    ernie::require(what != "timeline", "timeline needs CUPTI, which this build did not find");
#endif
    ernie::require(ernie::cuda::device_count() > 0, "no CUDA device");
    std::printf("%s\n", ernie::cuda::describe_device(0).c_str());
    ernie::peak_bytes = ernie::cuda::measure_read_bandwidth();
    std::printf("floors at %.2f TB/s (streaming read measured now) and %.0f TFLOP/s\n",
                ernie::peak_bytes * 1e-12, ernie::kPeakFlops * 1e-12);
    std::printf("%-44s %12s  %10s  %15s  %14s  %s\n", "op", "time", "bytes/s", "FLOP/s", "floor",
                "ratio");
    if ((what == "all" || what == "ops") && ernie::run_ops(iters) != 0) return 1;
    if ((what == "all" || what == "sampling") && ernie::run_sampling(iters) != 0) return 1;
    if (what != "ops" && what != "sampling") {
      return ernie::run_steps(iters, only, what == "timeline");
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
