// Chat templates rendered as transformers' apply_chat_template renders them: the template sees
// messages, tools, add_generation_prompt, the named special tokens and chat_template_kwargs.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "tokenizer/jinja/jinja.h"
#include "tokenizer/tokenizer.h"

namespace ernie::tokenizer {

struct ChatOptions {
  bool add_generation_prompt = true;
  nlohmann::ordered_json tools;      // null when the request has none
  nlohmann::ordered_json documents;  // null when absent
  nlohmann::ordered_json kwargs =
      nlohmann::ordered_json::object();  // chat_template_kwargs, applied last
};

class ChatTemplate {
 public:
  // Parses the template; throws jinja::TemplateError.
  explicit ChatTemplate(std::string_view source);
  // The model's template, or `override_path`'s contents when given (--chat-template). Throws
  // Error when the model has none and no override is given.
  static std::shared_ptr<const ChatTemplate> for_model(const Tokenizer& tok,
                                                       const std::string& override_path);

  std::string render(const Tokenizer& tok, const nlohmann::ordered_json& messages,
                     const ChatOptions& opts) const;

 private:
  jinja::Template tmpl_;
};

}  // namespace ernie::tokenizer
