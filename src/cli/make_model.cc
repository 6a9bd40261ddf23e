#include "cli/commands.h"
#include "common/log.h"
#include "model/synthetic.h"
#include "tokenizer/synthetic.h"

namespace ernie::cli {

CLI::App* add_make_model(CLI::App& app, MakeModelArgs& a) {
  CLI::App* c = app.add_subcommand("make-model",
                                   "Write a synthetic checkpoint in the released ERNIE-4.5 layout");
  c->add_option("--preset", a.preset, "Model shape")
      ->check(CLI::IsMember({"tiny", "21b-a3b", "300b-a47b"}))
      ->capture_default_str();
  c->add_option("--out", a.out, "Output directory")->required();
  c->add_option("--seed", a.seed, "Seed of the random weights")->capture_default_str();
  c->add_flag("--no-weights", a.no_weights, "Write config.json only (for --load-format dummy)");
  c->add_option("--set", a.sets, "Override a config field: key=value (JSON value or string)")
      ->take_all();
  return c;
}

int run_make_model(const MakeModelArgs& a) {
  model::MakeModelOptions o;
  o.preset = a.preset;
  o.out = a.out;
  o.seed = a.seed;
  o.no_weights = a.no_weights;
  o.sets = a.sets;
  const auto c = model::make_model(o);
  const auto tok = tokenizer::write_synthetic_tokenizer(a.out);
  log::info("make-model: tokenizer with ", tok.size, " tokens (", tok.sentencepiece_size,
            " SentencePiece pieces) and the ERNIE chat template");
  log::info("make-model: ", a.preset, " model in ", a.out, ": ", c.num_hidden_layers, " layers (",
            c.num_moe_layers(), " MoE), hidden ", c.hidden_size, ", ", c.moe_num_experts,
            " experts top-", c.moe_k, ", vocab ", c.vocab_size);
  return 0;
}

}  // namespace ernie::cli
