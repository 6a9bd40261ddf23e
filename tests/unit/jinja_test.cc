// The Jinja renderer's own checks (the comparison with jinja2 itself is
// tests/tokenizer/compare_jinja.py): errors are TemplateErrors with a line number, hostile
// templates end in errors rather than crashes, and corrupted real templates never crash.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <random>

#include "common/rng.h"
#include "test_util.h"
#include "tokenizer/jinja/jinja.h"

namespace ernie::jinja {
namespace {

std::string render(const std::string& src,
                   const nlohmann::ordered_json& ctx = nlohmann::ordered_json::object()) {
  return Template(src).render(ctx);
}

std::string error_of(const std::string& src) {
  try {
    render(src);
  } catch (const TemplateError& e) {
    return e.what();
  }
  return "";
}

TEST(Jinja, RendersTheBasics) {
  nlohmann::ordered_json ctx = {{"messages", {{{"role", "user"}, {"content", "hi"}}}}, {"n", 3}};
  EXPECT_EQ(render("{% for m in messages %}{{ m.role }}:{{ m['content'] }}{% endfor %}", ctx),
            "user:hi");
  EXPECT_EQ(render("{{ n * 2 }}|{{ n / 2 }}|{{ n // 2 }}|{{ -n % 2 }}", ctx), "6|1.5|1|1");
  EXPECT_EQ(render("{{ {'b': 1, 'a': [1.5, none, true]}|tojson }}"),
            "{\"b\": 1, \"a\": [1.5, null, true]}");
  EXPECT_EQ(render("a\n{% if true %}\n  b\n{% endif %}\nc\n"), "a\n  b\nc");
}

TEST(Jinja, ErrorsNameTheLine) {
  const std::string e = error_of("line one\n{{ ok }}\n{% if x %}\n{{ 1 +* 2 }}\n{% endif %}");
  EXPECT_NE(e.find("line 4"), std::string::npos) << e;
  EXPECT_NE(error_of("{% for x in y %}").find("endfor"), std::string::npos);
  EXPECT_NE(error_of("{{ raise_exception('custom message') }}").find("custom message"),
            std::string::npos);
  EXPECT_NE(error_of("{{ a.b }}").find("'a' is undefined"), std::string::npos);
  EXPECT_NE(error_of("{% include 'x' %}").find("unsupported tag"), std::string::npos);
  EXPECT_NE(error_of("{{ [1].append(2) }}").find("immutable"), std::string::npos);
}

// A \u escape takes exactly four hex digits (Python refuses fewer); anything else is a
// TemplateError, never another exception (a corrupted template once threw std::stoul's).
TEST(Jinja, UnicodeEscapesNeedFourHexDigits) {
  EXPECT_EQ(render("{{ '\\u00e9\\u4E2D!' }}"), "\u00e9\u4e2d!");
  for (const char* bad : {"{{ '\\uzz00' }}", "{{ '\\u12' }}", "{{ '\\u12g4' }}", "{{ '\\u' }}",
                          "{{ \"\\u-123\" }}"}) {
    EXPECT_NE(error_of(bad).find("bad \\u escape"), std::string::npos) << bad;
  }
}

TEST(Jinja, HostileTemplatesFailCleanly) {
  EXPECT_FALSE(
      error_of("{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}").empty());
  EXPECT_FALSE(error_of("{{ " + std::string(5000, '-') + "1 }}").empty());
  EXPECT_FALSE(error_of("{{ " + std::string(2000, '[') + " }}").empty());
  std::string nested;
  for (int i = 0; i < 500; ++i) nested += "{% if true %}";
  EXPECT_FALSE(error_of(nested).empty());
  EXPECT_FALSE(error_of("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}").empty());  // recursion
  EXPECT_FALSE(error_of("{{ range(100000000)|length }}").empty());
  EXPECT_FALSE(error_of("{{ 'x' * 1000000000 }}").empty());
  EXPECT_FALSE(error_of("{% for i in range(1000) %}{% for j in range(1000) %}{{ "
                        "'abcdefghijklmnopqrstuvwxyz0123456789' * 3 }}{% endfor %}{% endfor %}")
                   .empty());
}

TEST(Jinja, CorruptedRealTemplatesNeverCrash) {
  std::vector<std::string> sources;
  for (const auto& e : std::filesystem::directory_iterator(ERNIE_CHAT_TEMPLATES)) {
    if (e.path().extension() == ".jinja") sources.push_back(testing::read_file(e.path()));
  }
  ASSERT_FALSE(sources.empty());
  const nlohmann::ordered_json ctx = nlohmann::ordered_json::parse(R"({
    "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                 {"role": "assistant", "content": "a", "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]},
                 {"role": "tool", "name": "f", "content": "r"}],
    "tools": [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object", "properties": {"x": {"type": "integer", "description": "x"}}}}}],
    "add_generation_prompt": true, "bos_token": "<s>", "eos_token": "</s>"})");
  Rng rng(std::random_device{}());
  const std::string alphabet = "{}%#-+()[]|.,:'\"=~ \n abcxyz0123if for in endif endfor set";
  int rendered = 0, failed = 0;
  for (int iter = 0; iter < 1500; ++iter) {
    std::string src = sources[rng.below(sources.size())];
    const int edits = 1 + static_cast<int>(rng.below(6));
    for (int k = 0; k < edits && !src.empty(); ++k) {
      const size_t pos = rng.below(src.size());
      switch (rng.below(3)) {
        case 0:
          src.erase(pos, 1 + rng.below(8));
          break;
        case 1:
          src.insert(pos, 1, alphabet[rng.below(alphabet.size())]);
          break;
        default:
          src[pos] = alphabet[rng.below(alphabet.size())];
      }
    }
    try {
      Template(src).render(ctx);
      ++rendered;
    } catch (const TemplateError&) {
      ++failed;
    }
  }
  EXPECT_GT(failed, 0);
  EXPECT_GT(rendered, 0);
}

TEST(Jinja, PythonFloatRepr) {
  EXPECT_EQ(python_float(1.0), "1.0");
  EXPECT_EQ(python_float(0.1), "0.1");
  EXPECT_EQ(python_float(1e-5), "1e-05");
  EXPECT_EQ(python_float(0.0001), "0.0001");
  EXPECT_EQ(python_float(1e16), "1e+16");
  EXPECT_EQ(python_float(123456789.125), "123456789.125");
  EXPECT_EQ(python_float(-2.5), "-2.5");
  EXPECT_EQ(python_float(1.0 / 3), "0.3333333333333333");
}

}  // namespace
}  // namespace ernie::jinja
