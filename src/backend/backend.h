// The op set the model's forward pass is written against, and the step interface every backend
// consumes. The CPU backend (cpu/) is the exact reference; the CUDA backend implements the same
// ops on the device. No CUDA headers here.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/dtype.h"

namespace ernie::backend {

using Shape = std::vector<int64_t>;

// A non-owning view of backend memory (host memory for cpu, device memory for cuda), row-major.
struct Tensor {
  void* data = nullptr;
  DType dtype = DType::kF32;
  Shape shape;

  bool empty() const { return data == nullptr; }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return shape.empty() ? 0 : n;
  }
  int64_t dim(int i) const { return shape.at(i < 0 ? shape.size() + i : i); }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data);
  }
};

// A tensor in host memory in its checkpoint dtype, handed to Backend::load_weight.
struct HostTensor {
  const void* data = nullptr;  // need not be aligned
  DType dtype = DType::kBF16;
  Shape shape;
};

// One forward step over any mix of prefill chunks and decodes, flattened.
struct StepInput {
  std::vector<int32_t> token_ids;     // [num_tokens]
  std::vector<int32_t> positions;     // [num_tokens]: position of each token in its sequence
  std::vector<int32_t> query_start;   // [num_seqs + 1]: sequence s owns tokens [qs[s], qs[s+1])
  std::vector<int32_t> context_lens;  // [num_seqs]: tokens in the KV cache after this step
  std::vector<int32_t> block_tables;  // [num_seqs, max_blocks_per_seq], unused entries -1
  int32_t max_blocks_per_seq = 0;
  std::vector<int64_t> slot_mapping;    // [num_tokens]: KV slot = block * block_size + offset
  std::vector<int32_t> logits_indices;  // token rows whose logits the step returns, in order
  // Tokens whose ids the host does not know yet (asynchronous scheduling): {token index i, row
  // r} gives token i the id that row r of the backend's last sample_async drew; their
  // token_ids entries are placeholders (0).
  std::vector<std::pair<int32_t, int32_t>> token_feed;

  int32_t num_tokens() const { return static_cast<int32_t>(token_ids.size()); }
  int32_t num_seqs() const { return static_cast<int32_t>(context_lens.size()); }
};

// Checks that a StepInput is self-consistent for a cache of `num_blocks` x `block_size` slots;
// throws ernie::Error naming the first inconsistency. Backends call it in begin_step.
void validate_step(const StepInput& step, int64_t num_blocks, int64_t block_size,
                   int64_t vocab_size);

// How a dummy weight is drawn (`--load-format dummy`): normal(a, b) or uniform [a, b).
struct RandomInit {
  bool uniform = false;
  double a = 0.0, b = 1.0;
};

// Shapes the attention ops need, fixed for the model.
struct AttentionConfig {
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  double rope_theta = 10000.0;
  float scale = 1.0f;  // head_dim^-0.5
};

// The weights of one MoE block, stacked per expert so a backend can run grouped GEMMs.
struct MoeWeights {
  Tensor router;           // [E, hidden] f32
  Tensor router_bias;      // [E] f32, e_score_correction_bias: selection only
  Tensor experts_gate_up;  // [E, 2 * I_e, hidden]: rows [0, I_e) gate, [I_e, 2 I_e) up
  Tensor experts_down;     // [E, hidden, I_e]
  Tensor shared_gate_up;   // [2 * I_s, hidden], empty without shared experts
  Tensor shared_down;      // [hidden, I_s]
  int top_k = 0;
  float norm_min = 1e-12f;
  // Set by Backend::prepare_moe: the expert tensors are in the form the backend's moe() reads
  // (their shapes stay the logical ones above).
  bool experts_prepared = false;
  // Set by Backend::prepare_moe where the backend's routed GEMMs can also run the shared
  // experts, as this many extra routed-expert-sized experts (0: they cannot).
  int shared_folded = 0;
  // Set by Backend::prepare_moe where the backend also keeps the router's weights in another
  // form for its own kernels (the CUDA backend: bf16 terms, cuda::split_router_terms); empty
  // otherwise.
  Tensor router_terms;
};

// How to sample one row of logits (one sequence). Pointers stay valid for the call.
struct SamplingRow {
  float temperature = 1.0f;  // < 1e-5: greedy
  float top_p = 1.0f;
  int top_k = 0;  // 0 or -1: off
  float min_p = 0.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  float repetition_penalty = 1.0f;
  const std::vector<std::pair<int32_t, float>>* logit_bias = nullptr;
  const std::vector<int32_t>* prompt_tokens = nullptr;  // repetition penalty
  const std::vector<int32_t>* output_tokens = nullptr;  // all three penalties
  std::vector<int32_t> banned;  // ids that must not be drawn (EOS/stop ids under min_tokens)
  uint64_t seed = 0;            // with `position`, fixes the draw whatever else is batched
  int64_t position = 0;         // index of the token being sampled in the request's output
  int num_logprobs = -1;        // -1: none; k >= 0: the sampled token's and the top k
};

struct TokenLogprob {
  int32_t id;
  float logprob;
};

// One row's result. Logprobs are of the model's raw distribution (log_softmax of the logits
// before any penalty, bias or temperature), as vLLM reports them by default.
struct SampledToken {
  int32_t id = -1;
  float logprob = 0.0f;           // of `id`, when logprobs were asked for
  int32_t rank = 0;               // 1 = most likely
  std::vector<TokenLogprob> top;  // most likely first
};

// The raw log-probability of token `id` in a row of logits (log_softmax of the row), its rank
// (1 + the tokens with larger logits) and the `k` most likely tokens (larger logit first, then
// smaller id). The sampler's logprobs and the engine's prompt logprobs both come from it.
SampledToken score_token(std::span<const float> logits, int32_t id, int k);

// Stages of a step for the stage profile (`--profile-stages`): each op belongs to the stage
// marked last before it.
enum class Stage : int {
  kEmbedding,
  kNorm,
  kQkvProj,
  kRopeKv,
  kAttention,
  kOProj,
  kDenseMlp,
  kMoeRouter,  // router logits, top-k and the expert sort
  kMoeExperts,
  kMoeShared,
  kMoeCombine,
  kLmHead,
  kSampling,
  kHostSchedule,  // engine: scheduling and building the step (the GPU waits)
  kHostOutput,    // engine: stop checks, detokenizing, outputs (the GPU waits)
  kCount
};
const char* stage_name(Stage s);

// Time per stage summed over `steps` steps (device time between stage marks on GPU backends,
// wall time on the CPU).
struct StageProfile {
  double ms[static_cast<int>(Stage::kCount)] = {};
  // What the steps had to move and compute per stage (filled by the engine from the model's
  // cost model), for achieved bandwidth and FLOP rates.
  double bytes[static_cast<int>(Stage::kCount)] = {};
  double flops[static_cast<int>(Stage::kCount)] = {};
  int64_t steps = 0;
};

// Stage marks timed on the host clock, for backends whose ops are done when they return.
class HostStageTimer {
 public:
  void enable(bool on) { on_ = on; }
  void mark(Stage s);  // closes the open stage
  void end_step();     // closes the open stage and counts a step
  StageProfile take();

 private:
  bool on_ = false, open_ = false;
  Stage stage_ = Stage::kEmbedding;
  std::chrono::steady_clock::time_point since_;
  StageProfile profile_;
};

// The accelerator a backend runs on (empty name and no memory: the host).
struct DeviceSpec {
  std::string name;          // e.g. "NVIDIA H100 80GB HBM3"
  int64_t total_memory = 0;  // bytes
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual DeviceSpec device_spec() const { return {}; }
  // The dtype activations are kept in (f32 on cpu).
  virtual DType activation_dtype() const = 0;

  // Copies a host tensor into memory the backend owns (converting as it likes) for the
  // lifetime of the backend.
  virtual Tensor load_weight(const HostTensor& src) = 0;
  // A weight filled with deterministic random values (a function of `seed` only).
  virtual Tensor random_weight(const Shape& shape, DType dtype, const RandomInit& init,
                               uint64_t seed) = 0;
  // Bytes held by weights so far.
  virtual int64_t weight_bytes() const = 0;
  // Puts a MoE block's expert tensors (loaded or drawn by this backend) into the form its moe()
  // reads, once, after every tensor of `w` is set and before the first moe() with them. The
  // CPU backend reads them as they are; the CUDA backend re-lays them out for its kernels
  // (cuda/expert_layout.h) and lets its routed GEMMs run the shared experts of small steps
  // too, from their own tensors (MoeWeights::shared_folded).
  virtual void prepare_moe(MoeWeights& w) { w.experts_prepared = true; }

  virtual void configure_attention(const AttentionConfig& cfg) = 0;
  // Allocates the paged KV cache (replacing any earlier one): per layer, K and V of
  // [num_blocks, block_size, kv_heads, head_dim].
  virtual void allocate_kv_cache(int num_layers, int64_t num_blocks, int block_size) = 0;
  // The element type of the KV cache (sizes the cache from a memory budget).
  virtual DType kv_dtype() const = 0;
  virtual int64_t num_kv_blocks() const = 0;
  virtual int kv_block_size() const = 0;
  // Device backends: bytes left for the KV cache if the process may use `utilization` of the
  // device's memory, after the weights, the scratch peak measured so far (run a worst-case
  // step first) and `reserve` bytes the caller will allocate after the cache (`what` names
  // them in the log). -1: the backend sizes its cache from a host budget instead (cpu).
  virtual bool sizes_kv_from_device_memory() const { return false; }
  virtual int64_t kv_memory_budget(double utilization, int64_t reserve, const std::string& what) {
    (void)utilization;
    (void)reserve;
    (void)what;
    return -1;
  }
  // Device backends: bytes of device memory in use by the whole process now; -1 elsewhere.
  virtual int64_t device_memory_in_use() { return -1; }

  // Starts a step: validates and takes the batch description; frees last step's scratch.
  virtual void begin_step(const StepInput& step) = 0;
  // Scratch activation memory valid until the next begin_step.
  virtual Tensor scratch(const Shape& shape, DType dtype) = 0;

  // ---- graphs for decode steps (optional: a backend without them keeps these defaults) ----
  // Turns graphs on for steps of up to `max_batch` sequences whose block tables are at most
  // `max_blocks_per_seq` wide; false when the backend has none.
  virtual bool enable_graphs(int max_batch, int max_blocks_per_seq) {
    (void)max_batch;
    (void)max_blocks_per_seq;
    return false;
  }
  // begin_step for a step of a graph size: equal sizes put every buffer at the same address.
  // Padding rows may use block num_kv_blocks(), a spare block outside the engine's cache.
  virtual void begin_graph_step(const StepInput& step) { begin_step(step); }
  // Runs graph `key` on the current graph step; false when there is none yet.
  virtual bool replay_graph(int key) {
    (void)key;
    return false;
  }
  // Runs `body` (the ops of the current graph step) eagerly, then records it as graph `key`
  // without running it again; false when it could not be recorded (the eager results stand).
  virtual bool capture_graph(int key, const std::function<void()>& body) {
    (void)key;
    body();
    return false;
  }

  // ---- stage profile (off by default; a backend may ignore marks while it is off) ----
  virtual void enable_profile(bool on) = 0;
  // The ops from here to the next mark belong to `s`.
  virtual void mark(Stage s) = 0;
  // The profile so far (steps whose timing is complete), and resets it.
  virtual StageProfile take_profile() = 0;

  // ---- ops (shapes: T = the step's tokens) ----
  // out [T, hidden] = table[token_ids]
  virtual void embedding(Tensor out, const Tensor& table) = 0;
  // out = rms_norm(x) * weight, per row
  virtual void rms_norm(Tensor out, const Tensor& x, const Tensor& weight, float eps) = 0;
  // residual += x; out = rms_norm(residual) * weight
  virtual void add_rms_norm(Tensor out, Tensor residual, const Tensor& x, const Tensor& weight,
                            float eps) = 0;
  // out [M, N] = x [M, K] @ w[N, K]^T
  virtual void linear(Tensor out, const Tensor& x, const Tensor& w) = 0;
  // qkv [T, (H + 2 KV) * d]: rotates q and k in place (interleaved pairs), stores k and v into
  // layer's cache at the step's slots.
  virtual void rope_store_kv(Tensor qkv, int layer) = 0;
  // linear(qkv, x, w) then rope_store_kv(qkv, layer) (stage kRopeKv marked between): one call,
  // so that a backend may do both in one pass.
  virtual void qkv_rope_store_kv(Tensor qkv, const Tensor& x, const Tensor& w, int layer) {
    linear(qkv, x, w);
    mark(Stage::kRopeKv);
    rope_store_kv(qkv, layer);
  }
  // out [T, H * d]: causal attention of q (inside qkv) over each sequence's cached keys.
  virtual void attention(Tensor out, const Tensor& qkv, int layer) = 0;
  // out [M, I] = silu(gate_up[:, :I]) * gate_up[:, I:]
  virtual void silu_mul(Tensor out, const Tensor& gate_up) = 0;
  // out [T, hidden] = down(silu_mul(linear(x, gate_up))): a dense MLP block. Its
  // intermediate activations are scratch that a backend may free when it returns (the CUDA
  // backend does: they are the largest buffers of a long prefill step).
  virtual void dense_mlp(Tensor out, const Tensor& x, const Tensor& gate_up, const Tensor& down) {
    const int64_t inter = down.dim(1);
    Tensor gu = scratch({x.dim(0), 2 * inter}, activation_dtype());
    Tensor a = scratch({x.dim(0), inter}, activation_dtype());
    linear(gu, x, gate_up);
    silu_mul(a, gu);
    linear(out, a, down);
  }
  // out [T, hidden] = routed experts (+ shared experts) of x [T, hidden]
  virtual void moe(Tensor out, const Tensor& x, const MoeWeights& w) = 0;
  // moe(out, x, w), then add_rms_norm(normed, residual, out, norm_weight, eps) (the next
  // layer's input norm): one call, so that a backend may end the MoE block with the norm.
  virtual void moe_add_rms_norm(Tensor normed, Tensor residual, Tensor out, const Tensor& x,
                                const MoeWeights& w, const Tensor& norm_weight, float eps) {
    moe(out, x, w);
    mark(Stage::kNorm);
    add_rms_norm(normed, residual, out, norm_weight, eps);
  }
  // out [R, cols] = x[step.logits_indices]
  virtual void gather_logit_rows(Tensor out, const Tensor& x) = 0;
  // Copies an f32 tensor to the host.
  virtual void to_host(const Tensor& src, float* dst) = 0;
  // Samples one token per row of logits [rows, vocab] (on the device for GPU backends; only
  // ids and requested logprobs come back).
  virtual std::vector<SampledToken> sample(const Tensor& logits,
                                           const std::vector<SamplingRow>& rows) = 0;
  // sample() in two halves, for asynchronous scheduling: sample_async queues the work and may
  // return before the ids are known; finish_sample() waits for them and returns what sample()
  // would have. The drawn ids also stay with the backend as the next step's token_feed. At
  // most one sample is pending; a step may begin (and be fed) before finish_sample().
  // Backends that sample on the host answer at once (this default).
  virtual void sample_async(const Tensor& logits, const std::vector<SamplingRow>& rows) {
    pending_samples_ = sample(logits, rows);
    fed_ids_.clear();
    for (const SampledToken& t : pending_samples_) fed_ids_.push_back(t.id);
  }
  virtual std::vector<SampledToken> finish_sample() {
    std::vector<SampledToken> out;
    out.swap(pending_samples_);
    return out;
  }

 protected:
  // The default sample_async's result and its ids (the host-side token feed).
  std::vector<SampledToken> pending_samples_;
  std::vector<int32_t> fed_ids_;
};

std::unique_ptr<Backend> make_cpu_backend(int num_threads = 0);

}  // namespace ernie::backend
