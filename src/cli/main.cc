// `ernie`: one binary, vLLM-style subcommands.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <iostream>

#include "cli/commands.h"
#include "common/check.h"
#include "common/log.h"

int main(int argc, char** argv) {
  CLI::App app{"ernie: a serving engine for ERNIE-4.5 MoE models"};
  app.require_subcommand(1);
  app.set_version_flag("--version", ERNIE_VERSION);
  ernie::cli::MakeModelArgs make_args;
  ernie::cli::GenerateArgs gen_args;
  CLI::App* make_cmd = ernie::cli::add_make_model(app, make_args);
  CLI::App* gen_cmd = ernie::cli::add_generate(app, gen_args);
  ernie::cli::ServeArgs serve_args;
  CLI::App* serve_cmd = ernie::cli::add_serve(app, serve_args);
  ernie::cli::BenchArgs bench_args;
  CLI::App* bench_cmd = ernie::cli::add_bench(app, bench_args);
  ernie::cli::TokenizeArgs tok_args;
  CLI::App* tok_cmd = ernie::cli::add_tokenize(app, tok_args);
  ernie::cli::RooflineArgs roof_args;
  CLI::App* roof_cmd = ernie::cli::add_roofline(app, roof_args);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    if (make_cmd->parsed()) return ernie::cli::run_make_model(make_args);
    if (gen_cmd->parsed()) return ernie::cli::run_generate(gen_args);
    if (tok_cmd->parsed()) return ernie::cli::run_tokenize(tok_args);
    if (roof_cmd->parsed()) return ernie::cli::run_roofline(roof_args);
    if (serve_cmd->parsed()) return ernie::cli::run_serve(serve_args);
    if (bench_cmd->parsed()) return ernie::cli::run_bench(bench_args);
  } catch (const ernie::Error& e) {
    ernie::log::error(e.what());
    return 1;
  } catch (const std::exception& e) {
    ernie::log::error("unexpected error: ", e.what());
    return 1;
  }
  return 0;
}
