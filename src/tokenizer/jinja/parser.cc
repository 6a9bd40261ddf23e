// Template lexing with Jinja's whitespace rules, and a recursive-descent parser with Jinja's
// operator precedence: or < and < not < comparisons < + - < ~ < * / // % < ** < unary <
// postfix (. [] ()) then filters (|) and tests (is).
#include <cstring>

#include "tokenizer/jinja/ast.h"

namespace ernie::jinja {
namespace {

bool is_ws(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}
bool is_ident_start(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}
bool is_ident(char c) {
  return is_ident_start(c) || (c >= '0' && c <= '9');
}

[[noreturn]] void fail(int line, const std::string& what) {
  throw TemplateError(cat("chat template line ", line, ": ", what));
}

// ---- template-level lexing ----

struct Segment {
  enum Kind { kText, kVar, kBlock } kind;
  std::string text;  // text, or the tag's inner source
  int line;
};

int count_lines(std::string_view s) {
  return static_cast<int>(std::count(s.begin(), s.end(), '\n'));
}

std::vector<Segment> lex_template(std::string_view src) {
  std::vector<Segment> out;
  if (!src.empty() && src.back() == '\n') {
    src.remove_suffix(1);  // keep_trailing_newline=False
    if (!src.empty() && src.back() == '\r') src.remove_suffix(1);
  }
  size_t pos = 0;
  int line = 1;
  bool line_starting = true, strip_next = false;
  while (pos <= src.size()) {
    size_t open = std::string_view::npos;
    char kind = 0;
    for (size_t p = src.find('{', pos); p != std::string_view::npos && p + 1 < src.size();
         p = src.find('{', p + 1)) {
      const char c = src[p + 1];
      if (c == '{' || c == '%' || c == '#') {
        open = p;
        kind = c;
        break;
      }
    }
    std::string text(
        src.substr(pos, open == std::string_view::npos ? std::string_view::npos : open - pos));
    if (strip_next) {
      size_t k = 0;
      while (k < text.size() && is_ws(text[k])) ++k;
      text.erase(0, k);
      strip_next = false;
    }
    char open_mod = 0;
    if (open != std::string_view::npos && open + 2 < src.size() &&
        (src[open + 2] == '-' || src[open + 2] == '+')) {
      open_mod = src[open + 2];
    }
    if (open != std::string_view::npos) {
      if (open_mod == '-') {
        while (!text.empty() && is_ws(text.back())) text.pop_back();
      } else if (open_mod != '+' && kind != '{') {
        // lstrip_blocks: drop spaces/tabs between the line start and a block or comment tag.
        const size_t nl = text.rfind('\n');
        const size_t l_pos = nl == std::string::npos ? 0 : nl + 1;
        if ((l_pos > 0 || line_starting) && l_pos < text.size()) {
          bool blank = true;
          for (size_t k = l_pos; k < text.size(); ++k) blank &= is_ws(text[k]);
          if (blank) text.erase(l_pos);
        }
      }
    }
    if (!text.empty()) out.push_back({Segment::kText, text, line});
    if (open == std::string_view::npos) break;
    line += count_lines(src.substr(pos, open - pos));
    // Find the closing delimiter, skipping string literals inside the tag.
    const char close_c = kind == '{' ? '}' : kind == '%' ? '%' : '#';
    size_t p = open + 2 + (open_mod ? 1 : 0);
    size_t close = std::string_view::npos;
    char quote = 0;
    for (; p + 1 < src.size(); ++p) {
      const char c = src[p];
      if (kind != '#' && quote) {
        if (c == '\\')
          ++p;
        else if (c == quote)
          quote = 0;
        continue;
      }
      if (kind != '#' && (c == '\'' || c == '"')) {
        quote = c;
        continue;
      }
      if (c == close_c && src[p + 1] == '}') {
        close = p;
        break;
      }
    }
    if (close == std::string_view::npos) {
      fail(line, kind == '#'   ? "missing end of comment tag"
                 : kind == '{' ? "unclosed '{{'"
                               : "unclosed '{%'");
    }
    const size_t inner_begin = open + 2 + (open_mod ? 1 : 0);
    size_t inner_end = close;
    char close_mod = 0;
    if (inner_end > inner_begin && (src[inner_end - 1] == '-' || src[inner_end - 1] == '+')) {
      close_mod = src[inner_end - 1];
      --inner_end;
    }
    const std::string inner(src.substr(inner_begin, inner_end - inner_begin));
    pos = close + 2;
    std::string_view consumed = src.substr(open, pos - open);
    line += count_lines(consumed);
    if (close_mod == '-') {
      strip_next = true;
      size_t k = pos;
      while (k < src.size() && is_ws(src[k])) ++k;
      consumed = src.substr(open, k - open);
    } else if (close_mod != '+' && kind != '{' && pos < src.size() && src[pos] == '\n') {
      ++pos;  // trim_blocks
      ++line;
      consumed = src.substr(open, pos - open);
    }
    line_starting = !consumed.empty() && consumed.back() == '\n';
    if (kind == '#') continue;
    // {% raw %} ... {% endraw %}: the content is text.
    std::string trimmed = inner;
    while (!trimmed.empty() && is_ws(trimmed.back())) trimmed.pop_back();
    while (!trimmed.empty() && is_ws(trimmed.front())) trimmed.erase(trimmed.begin());
    if (kind == '%' && trimmed == "raw") {
      size_t search = pos;
      while (true) {
        const size_t e = src.find("{%", search);
        if (e == std::string_view::npos) fail(line, "missing {% endraw %}");
        size_t q = e + 2;
        if (q < src.size() && (src[q] == '-' || src[q] == '+')) ++q;
        while (q < src.size() && is_ws(src[q])) ++q;
        if (src.compare(q, 6, "endraw") == 0) {
          std::string raw(src.substr(pos, e - pos));
          if (src[e + 2] == '-') {
            while (!raw.empty() && is_ws(raw.back())) raw.pop_back();
          }
          if (!raw.empty()) out.push_back({Segment::kText, raw, line});
          const size_t end = src.find("%}", q);
          if (end == std::string_view::npos) fail(line, "unclosed {% endraw %}");
          line += count_lines(src.substr(pos, end + 2 - pos));
          pos = end + 2;
          if (src[end - 1] == '-') {
            while (pos < src.size() && is_ws(src[pos])) ++pos;
          } else if (pos < src.size() && src[pos] == '\n') {
            ++pos;
          }
          break;
        }
        search = e + 2;
      }
      continue;
    }
    out.push_back(
        {kind == '{' ? Segment::kVar : Segment::kBlock, inner, line - count_lines(consumed)});
  }
  return out;
}

// ---- expression tokens ----

struct Token {
  enum Kind { kName, kInt, kFloat, kString, kOp, kEnd } kind;
  std::string text;
  Value value;
};

std::vector<Token> tokenize(const std::string& s, int line) {
  std::vector<Token> out;
  size_t i = 0;
  while (i < s.size()) {
    const char c = s[i];
    if (is_ws(c)) {
      ++i;
      continue;
    }
    if (is_ident_start(c)) {
      size_t j = i;
      while (j < s.size() && is_ident(s[j])) ++j;
      out.push_back({Token::kName, s.substr(i, j - i), {}});
      i = j;
      continue;
    }
    if (c >= '0' && c <= '9') {
      size_t j = i;
      bool is_float = false;
      while (j < s.size() && ((s[j] >= '0' && s[j] <= '9') || s[j] == '_')) ++j;
      if (j + 1 < s.size() && s[j] == '.' && s[j + 1] >= '0' && s[j + 1] <= '9') {
        is_float = true;
        ++j;
        while (j < s.size() && s[j] >= '0' && s[j] <= '9') ++j;
      }
      if (j < s.size() && (s[j] == 'e' || s[j] == 'E')) {
        size_t k = j + 1;
        if (k < s.size() && (s[k] == '+' || s[k] == '-')) ++k;
        if (k < s.size() && s[k] >= '0' && s[k] <= '9') {
          is_float = true;
          j = k;
          while (j < s.size() && s[j] >= '0' && s[j] <= '9') ++j;
        }
      }
      std::string num = s.substr(i, j - i);
      num.erase(std::remove(num.begin(), num.end(), '_'), num.end());
      try {
        if (is_float) {
          out.push_back({Token::kFloat, num, Value(std::stod(num))});
        } else {
          out.push_back({Token::kInt, num, Value(static_cast<int64_t>(std::stoll(num)))});
        }
      } catch (const std::exception&) {
        fail(line, cat("bad number '", num, "'"));
      }
      i = j;
      continue;
    }
    if (c == '\'' || c == '"') {
      std::string v;
      size_t j = i + 1;
      for (; j < s.size() && s[j] != c; ++j) {
        if (s[j] != '\\' || j + 1 >= s.size()) {
          v.push_back(s[j]);
          continue;
        }
        const char e = s[++j];
        switch (e) {
          case 'n':
            v.push_back('\n');
            break;
          case 't':
            v.push_back('\t');
            break;
          case 'r':
            v.push_back('\r');
            break;
          case '0':
            v.push_back('\0');
            break;
          case '\\':
            v.push_back('\\');
            break;
          case '\'':
            v.push_back('\'');
            break;
          case '"':
            v.push_back('"');
            break;
          case 'u': {
            // Exactly four hex digits, as Python requires ("truncated \\uXXXX escape").
            unsigned cp = 0;
            for (size_t d = j + 1; d <= j + 4; ++d) {
              const char h = d < s.size() ? s[d] : '\0';
              const int val = h >= '0' && h <= '9'   ? h - '0'
                              : h >= 'a' && h <= 'f' ? h - 'a' + 10
                              : h >= 'A' && h <= 'F' ? h - 'A' + 10
                                                     : -1;
              if (val < 0) fail(line, "bad \\u escape");
              cp = cp * 16 + static_cast<unsigned>(val);
            }
            j += 4;
            if (cp < 0x80) {
              v.push_back(static_cast<char>(cp));
            } else if (cp < 0x800) {
              v.push_back(static_cast<char>(0xc0 | (cp >> 6)));
              v.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
            } else {
              v.push_back(static_cast<char>(0xe0 | (cp >> 12)));
              v.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
              v.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
            }
            break;
          }
          default:  // Python keeps unknown escapes as written
            v.push_back('\\');
            v.push_back(e);
        }
      }
      if (j >= s.size()) fail(line, "unterminated string literal");
      out.push_back({Token::kString, v, Value(v)});
      i = j + 1;
      continue;
    }
    static const char* kOps[] = {"**", "//", "==", "!=", "<=", ">=", "+", "-", "*",
                                 "/",  "%",  "~",  "<",  ">",  "=",  "(", ")", "[",
                                 "]",  "{",  "}",  ",",  ".",  ":",  "|"};
    bool matched = false;
    for (const char* op : kOps) {
      const size_t n = std::strlen(op);
      if (s.compare(i, n, op) == 0) {
        out.push_back({Token::kOp, op, {}});
        i += n;
        matched = true;
        break;
      }
    }
    if (!matched) fail(line, cat("unexpected character '", std::string(1, c), "'"));
  }
  out.push_back({Token::kEnd, "", {}});
  return out;
}

// ---- expressions ----

class ExprParser {
 public:
  ExprParser(std::vector<Token> toks, int line) : t_(std::move(toks)), line_(line) {}

  bool at_end() const { return t_[i_].kind == Token::kEnd; }
  const Token& peek(size_t k = 0) const { return t_[std::min(i_ + k, t_.size() - 1)]; }
  bool is_op(const char* op, size_t k = 0) const {
    return peek(k).kind == Token::kOp && peek(k).text == op;
  }
  bool is_name(const char* n, size_t k = 0) const {
    return peek(k).kind == Token::kName && peek(k).text == n;
  }
  void expect_op(const char* op) {
    if (!is_op(op)) fail(line_, cat("expected '", op, "' but found '", peek().text, "'"));
    ++i_;
  }
  std::string expect_name() {
    if (peek().kind != Token::kName)
      fail(line_, cat("expected a name but found '", peek().text, "'"));
    return t_[i_++].text;
  }
  bool accept_op(const char* op) {
    if (!is_op(op)) return false;
    ++i_;
    return true;
  }
  bool accept_name(const char* n) {
    if (!is_name(n)) return false;
    ++i_;
    return true;
  }
  void expect_end() {
    if (!at_end()) fail(line_, cat("unexpected '", peek().text, "'"));
  }

  ExprPtr make(Expr::Kind k, std::vector<ExprPtr> args = {}, std::string name = {}) {
    auto e = std::make_shared<Expr>();
    e->kind = k;
    e->line = line_;
    e->args = std::move(args);
    e->name = std::move(name);
    return e;
  }

  // expression, without a tuple at the top level
  ExprPtr expression() {
    // Adversarial nesting must end in an error, not a stack overflow.
    struct Guard {
      int& d;
      explicit Guard(int& depth, int line) : d(depth) {
        if (++d > 100) fail(line, "expression nested too deeply");
      }
      ~Guard() { --d; }
    } guard(depth_, line_);
    ExprPtr e = or_expr();
    if (accept_name("if")) {
      ExprPtr cond = or_expr();
      ExprPtr other = accept_name("else") ? expression() : nullptr;
      return make(Expr::Kind::kCond, {cond, e, other});
    }
    return e;
  }
  // a, b, c  (an implicit tuple, as in {% set a, b = ... %} or {{ 1, 2 }})
  ExprPtr tuple_or_expression() {
    ExprPtr first = expression();
    if (!is_op(",")) return first;
    std::vector<ExprPtr> items{first};
    while (accept_op(",")) {
      if (at_end() || is_op(")")) break;
      items.push_back(expression());
    }
    return make(Expr::Kind::kTuple, items);
  }

  ExprPtr or_expr() {
    ExprPtr e = and_expr();
    while (accept_name("or")) e = make(Expr::Kind::kOr, {e, and_expr()});
    return e;
  }
  ExprPtr and_expr() {
    ExprPtr e = not_expr();
    while (accept_name("and")) e = make(Expr::Kind::kAnd, {e, not_expr()});
    return e;
  }
  ExprPtr not_expr() {
    if (accept_name("not")) {
      if (++unary_depth_ > 200) fail(line_, "expression nested too deeply");
      ExprPtr inner = not_expr();
      --unary_depth_;
      return make(Expr::Kind::kUnary, {inner}, "not");
    }
    return compare();
  }
  ExprPtr compare() {
    ExprPtr e = math1();
    while (true) {
      std::string op;
      if (peek().kind == Token::kOp &&
          (peek().text == "==" || peek().text == "!=" || peek().text == "<" ||
           peek().text == "<=" || peek().text == ">" || peek().text == ">=")) {
        op = t_[i_++].text;
      } else if (accept_name("in")) {
        op = "in";
      } else if (is_name("not") && is_name("in", 1)) {
        i_ += 2;
        op = "not in";
      } else {
        return e;
      }
      e = make(Expr::Kind::kBinary, {e, math1()}, op);
    }
  }
  ExprPtr math1() {
    ExprPtr e = concat();
    while (is_op("+") || is_op("-")) {
      const std::string op = t_[i_++].text;
      e = make(Expr::Kind::kBinary, {e, concat()}, op);
    }
    return e;
  }
  ExprPtr concat() {
    ExprPtr e = math2();
    while (accept_op("~")) e = make(Expr::Kind::kBinary, {e, math2()}, "~");
    return e;
  }
  ExprPtr math2() {
    ExprPtr e = pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const std::string op = t_[i_++].text;
      e = make(Expr::Kind::kBinary, {e, pow()}, op);
    }
    return e;
  }
  ExprPtr pow() {
    ExprPtr e = unary(true);
    while (accept_op("**")) e = make(Expr::Kind::kBinary, {e, unary(true)}, "**");
    return e;
  }
  ExprPtr unary(bool with_filter) {
    ExprPtr e;
    if (++unary_depth_ > 200) fail(line_, "expression nested too deeply");
    struct Release {
      int& d;
      ~Release() { --d; }
    } release{unary_depth_};
    if (is_op("-") || is_op("+")) {
      const std::string op = t_[i_++].text;
      e = make(Expr::Kind::kUnary, {unary(false)}, op);
    } else {
      e = postfix(primary());
    }
    return with_filter ? filters(e) : e;
  }
  ExprPtr primary() {
    const Token& tok = peek();
    if (tok.kind == Token::kString) {
      // Adjacent string literals concatenate, as in Python.
      std::string s;
      while (peek().kind == Token::kString) s += t_[i_++].text;
      auto e = make(Expr::Kind::kLiteral);
      e->value = Value(s);
      return e;
    }
    if (tok.kind == Token::kInt || tok.kind == Token::kFloat) {
      auto e = make(Expr::Kind::kLiteral);
      e->value = t_[i_++].value;
      return e;
    }
    if (tok.kind == Token::kName) {
      const std::string n = t_[i_++].text;
      auto e = make(Expr::Kind::kLiteral);
      if (n == "true" || n == "True")
        e->value = Value(true);
      else if (n == "false" || n == "False")
        e->value = Value(false);
      else if (n == "none" || n == "None")
        e->value = Value::none();
      else
        return make(Expr::Kind::kName, {}, n);
      return e;
    }
    if (accept_op("(")) {
      if (accept_op(")")) return make(Expr::Kind::kTuple);
      ExprPtr e = tuple_or_expression();
      expect_op(")");
      return e;
    }
    if (accept_op("[")) {
      std::vector<ExprPtr> items;
      while (!is_op("]")) {
        items.push_back(expression());
        if (!accept_op(",")) break;
      }
      expect_op("]");
      return make(Expr::Kind::kList, items);
    }
    if (accept_op("{")) {
      std::vector<ExprPtr> items;
      while (!is_op("}")) {
        items.push_back(expression());
        expect_op(":");
        items.push_back(expression());
        if (!accept_op(",")) break;
      }
      expect_op("}");
      return make(Expr::Kind::kDict, items);
    }
    fail(line_, tok.kind == Token::kEnd ? "unexpected end of expression"
                                        : cat("unexpected '", tok.text, "'"));
  }
  void call_args(ExprPtr& call) {
    // after '(' : positional and keyword arguments
    while (!is_op(")")) {
      if (peek().kind == Token::kName && is_op("=", 1)) {
        const std::string key = t_[i_].text;
        i_ += 2;
        call->kwargs.emplace_back(key, expression());
      } else {
        call->args.push_back(expression());
      }
      if (!accept_op(",")) break;
    }
    expect_op(")");
  }
  ExprPtr postfix(ExprPtr e) {
    while (true) {
      if (accept_op(".")) {
        if (peek().kind == Token::kInt) {  // x.0 means x[0]
          auto idx = make(Expr::Kind::kLiteral);
          idx->value = t_[i_++].value;
          e = make(Expr::Kind::kIndex, {e, idx});
        } else {
          e = make(Expr::Kind::kAttr, {e}, expect_name());
        }
      } else if (accept_op("[")) {
        ExprPtr a, b, c;
        bool slice = false;
        if (!is_op(":")) a = expression();
        if (accept_op(":")) {
          slice = true;
          if (!is_op("]") && !is_op(":")) b = expression();
          if (accept_op(":") && !is_op("]")) c = expression();
        }
        expect_op("]");
        e = slice ? make(Expr::Kind::kSlice, {e, a, b, c}) : make(Expr::Kind::kIndex, {e, a});
      } else if (accept_op("(")) {
        auto call = make(Expr::Kind::kCall, {e});
        call_args(call);
        e = call;
      } else {
        return e;
      }
    }
  }
  ExprPtr filters(ExprPtr e) {
    while (true) {
      if (accept_op("|")) {
        std::string name = expect_name();
        while (accept_op(".")) name += "." + expect_name();
        auto f = make(Expr::Kind::kFilter, {e}, name);
        if (accept_op("(")) call_args(f);
        e = f;
      } else if (accept_name("is")) {
        const bool neg = accept_name("not");
        std::string name = expect_name();
        auto t = make(Expr::Kind::kTest, {e}, name);
        t->negated = neg;
        if (accept_op("(")) {
          call_args(t);
        } else if (peek().kind == Token::kInt || peek().kind == Token::kFloat ||
                   peek().kind == Token::kString ||
                   (peek().kind == Token::kName && !is_name("and") && !is_name("or") &&
                    !is_name("else") && !is_name("if") && !is_name("in") && !is_name("is") &&
                    !is_name("not"))) {
          t->args.push_back(postfix(primary()));  // "is divisibleby 3", "is sameas none"
        }
        e = t;
      } else {
        return e;
      }
    }
  }

 private:
  std::vector<Token> t_;
  size_t i_ = 0;
  int line_;
  int depth_ = 0;
  int unary_depth_ = 0;
};

// ---- statements ----

class Parser {
 public:
  explicit Parser(std::vector<Segment> segs) : s_(std::move(segs)) {}

  Body parse_all() {
    Body body = parse_until({});
    if (pos_ < s_.size()) fail(s_[pos_].line, cat("unexpected '{% ", s_[pos_].text, " %}'"));
    return body;
  }

 private:
  static std::string first_word(const std::string& s) {
    size_t i = 0;
    while (i < s.size() && is_ws(s[i])) ++i;
    size_t j = i;
    while (j < s.size() && is_ident(s[j])) ++j;
    return s.substr(i, j - i);
  }

  // Parses nodes until a block tag whose first word is in `stops` (left unconsumed).
  Body parse_until(const std::vector<std::string>& stops) {
    if (++nesting_ > 100) fail(pos_ < s_.size() ? s_[pos_].line : 1, "blocks nested too deeply");
    struct Release {
      int& d;
      ~Release() { --d; }
    } release{nesting_};
    Body body;
    while (pos_ < s_.size()) {
      const Segment& seg = s_[pos_];
      if (seg.kind == Segment::kText) {
        auto n = std::make_shared<Node>();
        n->kind = Node::Kind::kText;
        n->text = seg.text;
        body.push_back(n);
        ++pos_;
        continue;
      }
      if (seg.kind == Segment::kVar) {
        ExprParser p(tokenize(seg.text, seg.line), seg.line);
        auto n = std::make_shared<Node>();
        n->kind = Node::Kind::kOutput;
        n->line = seg.line;
        n->expr = p.tuple_or_expression();
        p.expect_end();
        body.push_back(n);
        ++pos_;
        continue;
      }
      const std::string word = first_word(seg.text);
      if (std::find(stops.begin(), stops.end(), word) != stops.end()) return body;
      body.push_back(statement());
    }
    if (!stops.empty())
      fail(s_.empty() ? 1 : s_.back().line, cat("missing {% ", stops.back(), " %}"));
    return body;
  }

  std::string expect_tag(const std::vector<std::string>& words) {
    if (pos_ >= s_.size())
      fail(s_.empty() ? 1 : s_.back().line, cat("missing {% ", words.back(), " %}"));
    const std::string w = first_word(s_[pos_].text);
    if (std::find(words.begin(), words.end(), w) == words.end()) {
      fail(s_[pos_].line, cat("expected {% ", words.back(), " %}"));
    }
    return w;
  }

  NodePtr statement() {
    const Segment& seg = s_[pos_];
    const int line = seg.line;
    ExprParser p(tokenize(seg.text, line), line);
    const std::string word = p.expect_name();
    auto n = std::make_shared<Node>();
    n->line = line;
    ++pos_;
    if (word == "if") {
      n->kind = Node::Kind::kIf;
      ExprPtr cond = p.expression();
      p.expect_end();
      while (true) {
        Body b = parse_until({"elif", "else", "endif"});
        n->branches.emplace_back(cond, std::move(b));
        const std::string w = expect_tag({"elif", "else", "endif"});
        ExprParser q(tokenize(s_[pos_].text, s_[pos_].line), s_[pos_].line);
        q.expect_name();
        ++pos_;
        if (w == "endif") {
          q.expect_end();
          break;
        }
        if (w == "else") {
          q.expect_end();
          n->branches.emplace_back(nullptr, parse_until({"endif"}));
          expect_tag({"endif"});
          ++pos_;
          break;
        }
        cond = q.expression();
        q.expect_end();
      }
    } else if (word == "for") {
      n->kind = Node::Kind::kFor;
      const bool paren = p.accept_op("(");
      n->targets.push_back(p.expect_name());
      while (p.accept_op(",")) n->targets.push_back(p.expect_name());
      if (paren) p.expect_op(")");
      if (!p.accept_name("in")) fail(line, "expected 'in' in for loop");
      n->expr = p.or_expr();  // no conditional: "if" starts the loop filter
      if (p.accept_name("if")) n->filter = p.expression();
      if (p.accept_name("recursive")) fail(line, "recursive loops are not supported");
      p.expect_end();
      n->body = parse_until({"else", "endfor"});
      if (expect_tag({"else", "endfor"}) == "else") {
        ++pos_;
        n->else_body = parse_until({"endfor"});
        expect_tag({"endfor"});
      }
      ++pos_;
    } else if (word == "set") {
      const std::string first = p.expect_name();
      if (p.accept_op(".")) {
        n->kind = Node::Kind::kSet;
        n->attr_target = p.make(Expr::Kind::kName, {}, first);
        n->attr = p.expect_name();
        p.expect_op("=");
        n->expr = p.tuple_or_expression();
      } else {
        n->targets.push_back(first);
        while (p.accept_op(",")) n->targets.push_back(p.expect_name());
        if (p.accept_op("=")) {
          n->kind = Node::Kind::kSet;
          n->expr = p.tuple_or_expression();
        } else {
          if (n->targets.size() != 1) fail(line, "a {% set %} block assigns one name");
          n->kind = Node::Kind::kSetBlock;
          if (p.accept_op("|")) fail(line, "filters on {% set %} blocks are not supported");
          n->body = parse_until({"endset"});
          expect_tag({"endset"});
          ++pos_;
        }
      }
      p.expect_end();
    } else if (word == "macro") {
      n->kind = Node::Kind::kMacro;
      n->name = p.expect_name();
      p.expect_op("(");
      while (!p.is_op(")")) {
        const std::string param = p.expect_name();
        ExprPtr def = p.accept_op("=") ? p.expression() : nullptr;
        n->params.emplace_back(param, def);
        if (!p.accept_op(",")) break;
      }
      p.expect_op(")");
      p.expect_end();
      n->body = parse_until({"endmacro"});
      expect_tag({"endmacro"});
      ++pos_;
    } else if (word == "break" || word == "continue") {
      n->kind = word == "break" ? Node::Kind::kBreak : Node::Kind::kContinue;
      p.expect_end();
    } else if (word == "generation") {
      n->kind = Node::Kind::kScope;
      p.expect_end();
      n->body = parse_until({"endgeneration"});
      expect_tag({"endgeneration"});
      ++pos_;
    } else if (word == "filter") {
      n->kind = Node::Kind::kFilterBlock;
      auto placeholder = p.make(Expr::Kind::kLiteral);
      std::string name = p.expect_name();
      auto f = p.make(Expr::Kind::kFilter, {placeholder}, name);
      if (p.accept_op("(")) p.call_args(f);
      p.expect_end();
      n->expr = f;
      n->body = parse_until({"endfilter"});
      expect_tag({"endfilter"});
      ++pos_;
    } else {
      fail(line, cat("unsupported tag '", word, "'"));
    }
    return n;
  }

  std::vector<Segment> s_;
  size_t pos_ = 0;
  int nesting_ = 0;
};

}  // namespace

Body parse_template(std::string_view source) {
  return Parser(lex_template(source)).parse_all();
}

}  // namespace ernie::jinja
