#include "tokenizer/chat.h"

#include <fstream>
#include <sstream>

#include "common/check.h"

namespace ernie::tokenizer {

ChatTemplate::ChatTemplate(std::string_view source) : tmpl_(source) {}

std::shared_ptr<const ChatTemplate> ChatTemplate::for_model(const Tokenizer& tok,
                                                            const std::string& override_path) {
  if (!override_path.empty()) {
    std::ifstream f(override_path);
    if (!f) throw Error(cat("--chat-template: cannot open '", override_path, "'"));
    std::stringstream ss;
    ss << f.rdbuf();
    return std::make_shared<ChatTemplate>(ss.str());
  }
  if (tok.chat_template().empty()) {
    throw Error(
        "the model has no chat template (chat_template in tokenizer_config.json or "
        "chat_template.jinja); pass one with --chat-template");
  }
  return std::make_shared<ChatTemplate>(tok.chat_template());
}

std::string ChatTemplate::render(const Tokenizer& tok, const nlohmann::ordered_json& messages,
                                 const ChatOptions& opts) const {
  if (!messages.is_array()) throw jinja::TemplateError("messages must be a list");
  nlohmann::ordered_json ctx = nlohmann::ordered_json::object();
  for (const auto& [name, value] : tok.special_token_strings()) ctx[name] = value;
  ctx["messages"] = messages;
  if (!opts.tools.is_null()) ctx["tools"] = opts.tools;
  if (!opts.documents.is_null()) ctx["documents"] = opts.documents;
  ctx["add_generation_prompt"] = opts.add_generation_prompt;
  if (opts.kwargs.is_object()) {
    for (auto it = opts.kwargs.begin(); it != opts.kwargs.end(); ++it) ctx[it.key()] = it.value();
  }
  return tmpl_.render(ctx);
}

}  // namespace ernie::tokenizer
