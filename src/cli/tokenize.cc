// `ernie tokenize`: a line-oriented JSON interface to the tokenizer and chat templates, for
// tests against transformers and for debugging. One request per stdin line:
//   {"op": "encode", "text": "...", "add_special_tokens": false}
//   {"op": "decode", "ids": [...], "skip_special_tokens": false}
//   {"op": "stream", "ids": [...], "skip_special_tokens": false}   (incremental detokenizer)
//   {"op": "chat", "messages": [...], "add_generation_prompt": true, "tools": [...], "kwargs":
//   {...}}
//   {"op": "render", "template": "...", "context": {...}}
// One JSON answer per line: {"ids": [...]} / {"text": "..."} / {"pieces": [...]} or {"error":
// "..."}.
#include <nlohmann/json.hpp>

#include <iostream>

#include "cli/commands.h"
#include "common/check.h"
#include "tokenizer/chat.h"
#include "tokenizer/detokenizer.h"
#include "tokenizer/tokenizer.h"

namespace ernie::cli {

CLI::App* add_tokenize(CLI::App& app, TokenizeArgs& a) {
  CLI::App* c =
      app.add_subcommand("tokenize", "Tokenizer and chat-template requests as JSON lines on stdin");
  c->group("");  // a tool for tests and debugging, not shown in --help
  c->add_option("--model", a.model, "Model directory (tokenizer files)")->required();
  c->add_option("--chat-template", a.chat_template,
                "A chat template file to use instead of the model's");
  return c;
}

int run_tokenize(const TokenizeArgs& a) {
  auto tok = tokenizer::Tokenizer::load(a.model);
  std::shared_ptr<const tokenizer::ChatTemplate> chat;  // parsed on first use
  std::string line;
  while (std::getline(std::cin, line)) {
    nlohmann::json out;
    try {
      const auto req = nlohmann::ordered_json::parse(line);
      const std::string op = req.at("op");
      if (op == "encode") {
        out["ids"] =
            tok->encode(req.at("text").get<std::string>(), req.value("add_special_tokens", false));
      } else if (op == "decode") {
        out["text"] = tok->decode(req.at("ids").get<std::vector<int32_t>>(),
                                  req.value("skip_special_tokens", false));
      } else if (op == "stream") {
        tokenizer::IncrementalDetokenizer detok(tok, req.value("skip_special_tokens", false));
        nlohmann::json pieces = nlohmann::json::array();
        for (int32_t id : req.at("ids").get<std::vector<int32_t>>())
          pieces.push_back(detok.add(id));
        pieces.push_back(detok.finish());
        out["pieces"] = pieces;
      } else if (op == "render") {  // a raw template with a raw context
        out["text"] = jinja::Template(req.at("template").get<std::string>())
                          .render(req.value("context", nlohmann::ordered_json::object()));
      } else if (op == "chat") {
        if (!chat) chat = tokenizer::ChatTemplate::for_model(*tok, a.chat_template);
        tokenizer::ChatOptions o;
        o.add_generation_prompt = req.value("add_generation_prompt", true);
        if (req.contains("tools")) o.tools = req["tools"];
        if (req.contains("kwargs")) o.kwargs = req["kwargs"];
        out["text"] = chat->render(*tok, req.at("messages"), o);
      } else {
        throw Error(cat("unknown op '", op, "'"));
      }
    } catch (const std::exception& e) {
      out = {{"error", e.what()}};
    }
    std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << std::endl;
  }
  return 0;
}

}  // namespace ernie::cli
