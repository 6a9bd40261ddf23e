#include "step_cases.h"

#include <charconv>
#include <string_view>

#include "common/check.h"

namespace ernie::bench {

bool StepCase::decode_only() const {
  for (const StepGroup& g : groups) {
    if (g.fresh != 1) return false;
  }
  return true;
}

int StepCase::sequences() const {
  int n = 0;
  for (const StepGroup& g : groups) n += g.seqs;
  return n;
}

int StepCase::tokens() const {
  int n = 0;
  for (const StepGroup& g : groups) n += g.seqs * g.fresh;
  return n;
}

std::string StepCase::label() const {
  if (groups.size() == 1 && decode_only()) {
    return cat("decode step, ", groups[0].seqs, " x ", groups[0].context);
  }
  std::string s = "mixed step, ";
  for (size_t i = 0; i < groups.size(); ++i) {
    const StepGroup& g = groups[i];
    s += cat(i ? "+" : "", g.seqs, "x", g.context);
    if (g.fresh != 1) s += cat("/", g.fresh);
  }
  return s;
}

std::vector<StepCase> default_step_cases() {
  std::vector<StepCase> cases;
  for (auto [seqs, context] :
       {std::pair{1, 1000}, {16, 1000}, {16, 8500}, {64, 1500}, {256, 1000}}) {
    cases.push_back(StepCase{{StepGroup{seqs, context, 1}}});
  }
  return cases;
}

namespace {

// A positive decimal number filling all of `text`, else 0.
int positive(std::string_view text) {
  int v = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  return ec == std::errc() && end == text.data() + text.size() && v > 0 ? v : 0;
}

constexpr std::string_view kForm =
    "(SEQSxCTX or SEQSxCTX/NEW groups joined by '+', all positive, NEW at most CTX; or a count "
    "of sequences among the defaults: 1x1000, 16x1000, 16x8500, 64x1500, 256x1000)";

StepGroup parse_group(std::string_view text, const std::string& item) {
  const size_t x = text.find('x');
  const size_t slash = text.find('/');
  require_parts(x != std::string_view::npos && (slash == std::string_view::npos || slash > x),
                "bad step case '", item, "' ", kForm);
  StepGroup g;
  g.seqs = positive(text.substr(0, x));
  const std::string_view rest = text.substr(x + 1);
  const size_t s = rest.find('/');
  g.context = positive(rest.substr(0, s));
  g.fresh = s == std::string_view::npos ? 1 : positive(rest.substr(s + 1));
  require_parts(g.seqs > 0 && g.context > 0 && g.fresh > 0 && g.fresh <= g.context,
                "bad step case '", item, "' ", kForm);
  return g;
}

}  // namespace

std::vector<StepCase> parse_step_cases(const std::vector<std::string>& items) {
  if (items.empty()) return default_step_cases();
  std::vector<StepCase> cases;
  for (const std::string& item : items) {
    if (item.find('x') == std::string::npos) {
      const int seqs = positive(item);
      require_parts(seqs > 0, "bad step case '", item, "' ", kForm);
      bool found = false;
      for (const StepCase& c : default_step_cases()) {
        if (c.groups[0].seqs == seqs) {
          cases.push_back(c);
          found = true;
        }
      }
      require_parts(found, "step case '", item, "': no default case has ", seqs, " sequences ",
                    kForm);
      continue;
    }
    StepCase c;
    size_t begin = 0;
    while (true) {
      const size_t plus = item.find('+', begin);
      c.groups.push_back(parse_group(std::string_view(item).substr(begin, plus - begin), item));
      if (plus == std::string::npos) break;
      begin = plus + 1;
    }
    cases.push_back(std::move(c));
  }
  return cases;
}

}  // namespace ernie::bench
