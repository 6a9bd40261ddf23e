// A Jinja renderer for Hugging Face chat templates: the subset real templates use (if/elif/else,
// for with loop variables and filters, set and set blocks, namespace(), macros, break/continue,
// whitespace control, the usual filters and tests, Python string and dict methods) rendered
// the way transformers configures jinja2 (trim_blocks, lstrip_blocks, a json.dumps tojson,
// raise_exception, strftime_now). Anything outside the subset is a TemplateError, never a crash.
#pragma once

#include <string>
#include <string_view>

#include <nlohmann/json_fwd.hpp>

#include "tokenizer/jinja/ast.h"
#include "tokenizer/jinja/value.h"

namespace ernie::jinja {

class Template {
 public:
  // Parses; throws TemplateError naming the line.
  explicit Template(std::string_view source);
  // Renders with the variables of `context` (a JSON object); throws TemplateError.
  std::string render(const nlohmann::ordered_json& context) const;

 private:
  Body body_;
};

}  // namespace ernie::jinja
