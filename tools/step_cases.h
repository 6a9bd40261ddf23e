// The whole steps `ernie_kernel_bench steps` replays, as written on its command line (no GPU
// needed to parse them).
#pragma once

#include <string>
#include <vector>

namespace ernie::bench {

// `seqs` sequences of `context` tokens, the last `fresh` of each new this step: 1 is a decode,
// more a prefill chunk (fresh == context: a whole prompt).
struct StepGroup {
  int seqs = 0, context = 0, fresh = 1;
};

// One step: its groups in order (a serving step with a prefill chunk among decodes is two).
struct StepCase {
  std::vector<StepGroup> groups;

  bool decode_only() const;  // every group decodes (graph-replayed, as the server runs it)
  int sequences() const;
  int tokens() const;
  // "decode step, 16 x 8500" for one decoding group (the form the A/B scripts pick lines by);
  // otherwise "mixed step, 8x1000/1000+248x1000", the case as written.
  std::string label() const;
};

// The default cases: decode steps 1x1000, 16x1000, 16x8500, 64x1500, 256x1000.
std::vector<StepCase> default_step_cases();

// Cases from the command line's items, each "SEQSxCTX[/NEW]" groups joined by '+' (NEW: the
// fresh tokens of each of those sequences, at most CTX; 1 when left out), or a plain count N,
// which picks the default cases of N sequences. Bad items throw ernie::Error naming the item.
std::vector<StepCase> parse_step_cases(const std::vector<std::string>& items);

}  // namespace ernie::bench
