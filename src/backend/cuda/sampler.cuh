// Sampling on the device: one CTA per row of logits (or, for a few plain rows, many) applies the
// engine's sampling parameters exactly as the CPU reference (backend/cpu/sampler.cc) does and
// returns only the chosen id and the requested logprobs.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ernie::cuda {

struct DeviceSamplingRow {
  float temperature = 1.0f;  // < 1e-5: greedy
  float top_p = 1.0f;
  float min_p = 0.0f;
  int top_k = 0;  // <= 0: off
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  float repetition_penalty = 1.0f;
  int num_logprobs = -1;
  uint64_t seed = 0;
  int64_t position = 0;
  // Ranges into the step's flat arrays.
  int bias_begin = 0, bias_end = 0;  // logit_bias entries, applied in order
  int pen_begin = 0, pen_end = 0;    // distinct tokens of prompt and output
  int ban_begin = 0, ban_end = 0;    // banned ids
};

struct SamplingTables {
  const int32_t* bias_ids = nullptr;
  const float* bias_values = nullptr;
  const int32_t* pen_ids = nullptr;     // distinct token ids
  const int32_t* pen_counts = nullptr;  // occurrences in the output (0: prompt only)
  const int32_t* ban_ids = nullptr;
};

struct SamplingOutput {
  int32_t* ids = nullptr;         // [rows]
  float* logprobs = nullptr;      // [rows]
  int32_t* ranks = nullptr;       // [rows]
  int32_t* top_ids = nullptr;     // [rows, max_top]
  float* top_logprobs = nullptr;  // [rows, max_top]
  int max_top = 0;
};

// logits [rows, vocab] f32 (not modified); work [rows, vocab] f32 scratch.
void sample_rows(const float* logits, float* work, int rows, int vocab,
                 const DeviceSamplingRow* params, const SamplingTables& tables,
                 const SamplingOutput& out, cudaStream_t stream);

// The same for rows without top-k, top-p or logprobs (top_k <= 0 or >= vocab, top_p >= 1,
// num_logprobs < 0; only out.ids is written), each row spread over many CTAs: for a few rows,
// where sample_rows would run one CTA per row. scratch: sample_split_scratch_bytes(rows) of
// device memory, 8-byte aligned. `lean`: rows without edits are read from the logits and no
// probability is stored (work is written only for rows with bias, penalties or bans), each
// row over sample_split_chunks(rows, true) CTAs; otherwise 64 CTAs a row, every row's edited
// logits and probabilities stored in work.
size_t sample_split_scratch_bytes(int rows);
int sample_split_chunks(int rows, bool lean);
void sample_rows_split(const float* logits, float* work, int rows, int vocab,
                       const DeviceSamplingRow* params, const SamplingTables& tables,
                       const SamplingOutput& out, void* scratch, bool lean, cudaStream_t stream);

// Greedy rows without edits (temperature < 1e-5; no bias, penalties or bans; no top-k, top-p or
// logprobs): ids [rows] = each row's argmax, the lowest index among equal maxima, exactly what
// sample_rows_split gives such rows, with neither its parameters nor its work buffer: two
// kernels (a lean launch's chunk argmaxes, then one CTA a row). scratch:
// sample_split_scratch_bytes(rows) of device memory, 8-byte aligned.
void greedy_rows(const float* logits, int rows, int vocab, int32_t* ids, void* scratch,
                 cudaStream_t stream);

}  // namespace ernie::cuda
