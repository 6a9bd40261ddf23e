// The template interpreter: scopes, statements, expressions, filters, tests and methods.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <map>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "tokenizer/jinja/jinja.h"

namespace ernie::jinja {
namespace {

[[noreturn]] void fail(int line, const std::string& what) {
  throw TemplateError(cat("chat template line ", line, ": ", what));
}

constexpr int kMaxDepth = 256;           // macro recursion
constexpr size_t kMaxOutput = 64 << 20;  // rendered bytes
constexpr int64_t kMaxRange = 1 << 20;

enum class Flow { kNormal, kBreak, kContinue };

using Scope = std::unordered_map<std::string, Value>;

class Interpreter {
 public:
  explicit Interpreter(Scope globals) {
    scopes_.push_back(std::move(globals));
    scopes_.emplace_back();
  }

  std::string run(const Body& body) {
    std::string out;
    exec(body, out);
    return out;
  }

 private:
  // ---- variables ----
  Value lookup(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      if (auto f = it->find(name); f != it->end()) return f->second;
    }
    return Value::undefined(name);
  }
  void assign(const std::string& name, Value v) { scopes_.back()[name] = std::move(v); }

  // ---- statements ----
  Flow exec(const Body& body, std::string& out) {
    for (const auto& n : body) {
      const Flow f = exec(*n, out);
      if (f != Flow::kNormal) return f;
      if (out.size() > kMaxOutput) throw TemplateError("chat template output is too large");
    }
    return Flow::kNormal;
  }

  Flow exec(const Node& n, std::string& out) {
    switch (n.kind) {
      case Node::Kind::kText:
        out += n.text;
        return Flow::kNormal;
      case Node::Kind::kOutput:
        out += eval(*n.expr).str();
        return Flow::kNormal;
      case Node::Kind::kIf:
        for (const auto& [cond, body] : n.branches) {
          if (!cond || eval(*cond).truthy()) return exec(body, out);
        }
        return Flow::kNormal;
      case Node::Kind::kFor:
        return exec_for(n, out);
      case Node::Kind::kSet: {
        Value v = eval(*n.expr);
        if (n.attr_target) {
          Value ns = eval(*n.attr_target);
          if (!ns.is_namespace())
            fail(n.line,
                 cat("cannot assign attribute on '", ns.type_name(), "' (only namespace objects)"));
          ns.as_dict().set(n.attr, v);
        } else if (n.targets.size() == 1) {
          assign(n.targets[0], v);
        } else {
          const List items = iterate(v, n.line);
          if (items.size() != n.targets.size()) fail(n.line, "wrong number of values to unpack");
          for (size_t i = 0; i < items.size(); ++i) assign(n.targets[i], items[i]);
        }
        return Flow::kNormal;
      }
      case Node::Kind::kSetBlock: {
        std::string captured;
        exec(n.body, captured);
        assign(n.targets[0], Value(captured));
        return Flow::kNormal;
      }
      case Node::Kind::kMacro:
        assign(n.name, make_macro(n));
        return Flow::kNormal;
      case Node::Kind::kBreak:
        return Flow::kBreak;
      case Node::Kind::kContinue:
        return Flow::kContinue;
      case Node::Kind::kScope:
        return exec(n.body, out);
      case Node::Kind::kFilterBlock: {
        std::string captured;
        exec(n.body, captured);
        const Expr& f = *n.expr;
        CallArgs args = eval_args(f, 1);
        out += apply_filter(f.name, Value(captured), args, f.line).str();
        return Flow::kNormal;
      }
    }
    return Flow::kNormal;
  }

  Flow exec_for(const Node& n, std::string& out) {
    List items = iterate(eval(*n.expr), n.line);
    auto bind = [&](const Value& item) {
      if (n.targets.size() == 1) {
        assign(n.targets[0], item);
        return;
      }
      const List parts = iterate(item, n.line);
      if (parts.size() != n.targets.size())
        fail(n.line, "wrong number of values to unpack in for loop");
      for (size_t i = 0; i < parts.size(); ++i) assign(n.targets[i], parts[i]);
    };
    if (n.filter) {  // "for x in xs if cond": the loop sees only the kept items
      List kept;
      for (const auto& item : items) {
        scopes_.emplace_back();
        bind(item);
        const bool keep = eval(*n.filter).truthy();
        scopes_.pop_back();
        if (keep) kept.push_back(item);
      }
      items = std::move(kept);
    }
    if (items.empty()) return exec(n.else_body, out);
    const int64_t len = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < len; ++i) {
      scopes_.emplace_back();
      bind(items[i]);
      Dict loop;
      loop.set("index", Value(i + 1));
      loop.set("index0", Value(i));
      loop.set("revindex", Value(len - i));
      loop.set("revindex0", Value(len - i - 1));
      loop.set("first", Value(i == 0));
      loop.set("last", Value(i == len - 1));
      loop.set("length", Value(len));
      loop.set("depth", Value(int64_t{1}));
      loop.set("depth0", Value(int64_t{0}));
      loop.set("previtem", i > 0 ? items[i - 1] : Value::undefined("previtem"));
      loop.set("nextitem", i + 1 < len ? items[i + 1] : Value::undefined("nextitem"));
      loop.set("cycle", Value::function([i](CallArgs& a) -> Value {
                 if (a.positional.empty())
                   throw TemplateError("loop.cycle() needs at least one value");
                 return a.positional[static_cast<size_t>(i) % a.positional.size()];
               }));
      assign("loop", Value::dict(std::move(loop)));
      const Flow f = exec(n.body, out);
      scopes_.pop_back();
      if (f == Flow::kBreak) break;
    }
    return Flow::kNormal;
  }

  Value make_macro(const Node& n) {
    const Node* node = &n;
    return Value::function([this, node](CallArgs& a) -> Value {
      if (++depth_ > kMaxDepth) throw TemplateError("macro recursion is too deep");
      // A macro sees the globals and the template's top-level variables, plus its arguments.
      std::vector<Scope> saved(scopes_.begin() + 2, scopes_.end());
      scopes_.resize(2);
      scopes_.emplace_back();
      for (size_t i = 0; i < node->params.size(); ++i) {
        const auto& [pname, def] = node->params[i];
        Value v = Value::undefined(pname);
        if (i < a.positional.size())
          v = a.positional[i];
        else if (def)
          v = eval(*def);
        for (const auto& [k, kv] : a.keyword) {
          if (k == pname) v = kv;
        }
        assign(pname, v);
      }
      std::string out;
      exec(node->body, out);
      scopes_.resize(2);
      scopes_.insert(scopes_.end(), saved.begin(), saved.end());
      --depth_;
      return Value(out);
    });
  }

  // ---- expressions ----
  CallArgs eval_args(const Expr& e, size_t first) {
    CallArgs a;
    for (size_t i = first; i < e.args.size(); ++i) a.positional.push_back(eval(*e.args[i]));
    for (const auto& [k, v] : e.kwargs) a.keyword.emplace_back(k, eval(*v));
    return a;
  }

  Value eval(const Expr& e) {
    switch (e.kind) {
      case Expr::Kind::kLiteral:
        return e.value;
      case Expr::Kind::kName:
        return lookup(e.name);
      case Expr::Kind::kList:
      case Expr::Kind::kTuple: {
        List items;
        for (const auto& a : e.args) items.push_back(eval(*a));
        return Value::list(std::move(items));
      }
      case Expr::Kind::kDict: {
        Dict d;
        for (size_t i = 0; i + 1 < e.args.size(); i += 2) {
          const Value k = eval(*e.args[i]);
          if (!k.is_string()) fail(e.line, "dictionary keys must be strings");
          d.set(k.as_string(), eval(*e.args[i + 1]));
        }
        return Value::dict(std::move(d));
      }
      case Expr::Kind::kAttr:
        return get_attr(eval(*e.args[0]), e.name, e.line);
      case Expr::Kind::kIndex:
        return get_item(eval(*e.args[0]), eval(*e.args[1]), e.line);
      case Expr::Kind::kSlice:
        return slice(e);
      case Expr::Kind::kCall:
        return call(e);
      case Expr::Kind::kFilter: {
        // default() must see an undefined subject without an error
        Value subject = eval(*e.args[0]);
        CallArgs args = eval_args(e, 1);
        return apply_filter(e.name, subject, args, e.line);
      }
      case Expr::Kind::kTest: {
        Value subject = eval(*e.args[0]);
        CallArgs args = eval_args(e, 1);
        const bool r = apply_test(e.name, subject, args, e.line);
        return Value(e.negated ? !r : r);
      }
      case Expr::Kind::kUnary: {
        const Value v = eval(*e.args[0]);
        if (e.name == "not") return Value(!v.truthy());
        if (!v.is_number() && !v.is_bool())
          fail(e.line, cat("bad operand type for unary ", e.name, ": '", v.type_name(), "'"));
        if (e.name == "+") return v;
        if (v.is_float()) return Value(-v.as_double());
        return Value(-(v.is_bool() ? int64_t{v.as_bool()} : v.as_int()));
      }
      case Expr::Kind::kAnd: {
        Value a = eval(*e.args[0]);
        return a.truthy() ? eval(*e.args[1]) : a;
      }
      case Expr::Kind::kOr: {
        Value a = eval(*e.args[0]);
        return a.truthy() ? a : eval(*e.args[1]);
      }
      case Expr::Kind::kCond:
        if (eval(*e.args[0]).truthy()) return eval(*e.args[1]);
        return e.args[2] ? eval(*e.args[2]) : Value::undefined();
      case Expr::Kind::kBinary:
        return binary(e.name, eval(*e.args[0]), eval(*e.args[1]), e.line);
    }
    fail(e.line, "unknown expression");
  }

  static void require_defined(const Value& v, int line) {
    if (v.is_undefined())
      fail(line,
           cat("'", v.undefined_name().empty() ? "value" : v.undefined_name(), "' is undefined"));
  }

  Value binary(const std::string& op, const Value& a, const Value& b, int line) {
    if (op == "==") return Value(equals(a, b));
    if (op == "!=") return Value(!equals(a, b));
    if (op == "<") return Value(less(a, b));
    if (op == ">") return Value(less(b, a));
    if (op == "<=") return Value(!less(b, a));
    if (op == ">=") return Value(!less(a, b));
    if (op == "in" || op == "not in") {
      bool r;
      if (b.is_string()) {
        if (!a.is_string()) fail(line, "'in <string>' requires a string on the left");
        r = b.as_string().find(a.as_string()) != std::string::npos;
      } else if (b.is_list()) {
        r = std::any_of(b.as_list().begin(), b.as_list().end(),
                        [&](const Value& x) { return equals(a, x); });
      } else if (b.is_dict()) {
        r = a.is_string() && b.as_dict().find(a.as_string()) != nullptr;
      } else if (b.is_undefined()) {
        r = false;
      } else {
        fail(line, cat("argument of type '", b.type_name(), "' is not iterable"));
      }
      return Value(op == "in" ? r : !r);
    }
    if (op == "~") return Value(a.str() + b.str());
    require_defined(a, line);
    require_defined(b, line);
    if (op == "+") {
      if (a.is_string() && b.is_string()) return Value(a.as_string() + b.as_string());
      if (a.is_list() && b.is_list()) {
        List l = a.as_list();
        l.insert(l.end(), b.as_list().begin(), b.as_list().end());
        return Value::list(std::move(l));
      }
    }
    if (op == "*" && ((a.is_string() && b.is_int()) || (a.is_int() && b.is_string()))) {
      const std::string& s = a.is_string() ? a.as_string() : b.as_string();
      const int64_t n = a.is_int() ? a.as_int() : b.as_int();
      if (n > 0 && s.size() * static_cast<size_t>(n) > kMaxOutput)
        fail(line, "string repetition too large");
      std::string r;
      for (int64_t i = 0; i < n; ++i) r += s;
      return Value(r);
    }
    auto numeric = [](const Value& v) { return v.is_number() || v.is_bool(); };
    if (!numeric(a) || !numeric(b)) {
      fail(line, cat("unsupported operand type(s) for ", op, ": '", a.type_name(), "' and '",
                     b.type_name(), "'"));
    }
    auto as_i = [](const Value& v) { return v.is_bool() ? int64_t{v.as_bool()} : v.as_int(); };
    auto as_d = [](const Value& v) {
      return v.is_bool() ? (v.as_bool() ? 1.0 : 0.0) : v.as_double();
    };
    const bool ints = !a.is_float() && !b.is_float();
    if (op == "/") {
      if (as_d(b) == 0) fail(line, "division by zero");
      return Value(as_d(a) / as_d(b));
    }
    if (op == "//" || op == "%") {
      if (as_d(b) == 0) fail(line, "integer division or modulo by zero");
      if (ints) {
        const int64_t x = as_i(a), y = as_i(b);
        int64_t q = x / y, r = x % y;
        if (r != 0 && ((r < 0) != (y < 0))) {
          --q;
          r += y;
        }
        return op == "//" ? Value(q) : Value(r);
      }
      const double x = as_d(a), y = as_d(b);
      const double q = std::floor(x / y);
      return op == "//" ? Value(q) : Value(x - q * y);
    }
    if (op == "**") {
      if (ints && as_i(b) >= 0) {
        int64_t r = 1;
        for (int64_t i = 0; i < as_i(b) && i < 64; ++i) r *= as_i(a);
        return Value(r);
      }
      return Value(std::pow(as_d(a), as_d(b)));
    }
    if (ints) {
      if (op == "+") return Value(as_i(a) + as_i(b));
      if (op == "-") return Value(as_i(a) - as_i(b));
      if (op == "*") return Value(as_i(a) * as_i(b));
    } else {
      if (op == "+") return Value(as_d(a) + as_d(b));
      if (op == "-") return Value(as_d(a) - as_d(b));
      if (op == "*") return Value(as_d(a) * as_d(b));
    }
    fail(line, cat("unsupported operator ", op));
  }

  Value get_attr(const Value& obj, const std::string& name, int line) {
    if (obj.is_undefined()) {
      fail(line, cat("'", obj.undefined_name().empty() ? "value" : obj.undefined_name(),
                     "' is undefined (reading '.", name, "')"));
    }
    if (obj.is_dict()) {
      if (const Value* v = obj.as_dict().find(name)) return *v;
    }
    return Value::undefined(name);
  }

  static int64_t norm_index(int64_t i, int64_t n) { return i < 0 ? i + n : i; }

  Value get_item(const Value& obj, const Value& key, int line) {
    if (obj.is_undefined()) fail(line, cat("'", obj.undefined_name(), "' is undefined"));
    if (obj.is_dict()) {
      if (key.is_string()) {
        if (const Value* v = obj.as_dict().find(key.as_string())) return *v;
      }
      return Value::undefined(key.str());
    }
    if ((obj.is_list() || obj.is_string()) && key.is_int()) {
      if (obj.is_list()) {
        const auto& l = obj.as_list();
        const int64_t i = norm_index(key.as_int(), static_cast<int64_t>(l.size()));
        if (i < 0 || i >= static_cast<int64_t>(l.size())) return Value::undefined("index");
        return l[i];
      }
      const auto chars = utf8_chars(obj.as_string());
      const int64_t i = norm_index(key.as_int(), static_cast<int64_t>(chars.size()));
      if (i < 0 || i >= static_cast<int64_t>(chars.size())) return Value::undefined("index");
      return Value(chars[i]);
    }
    if (key.is_string()) return get_attr(obj, key.as_string(), line);
    return Value::undefined("item");
  }

  Value slice(const Expr& e) {
    const Value obj = eval(*e.args[0]);
    auto part = [&](int k) -> std::optional<int64_t> {
      if (!e.args[k]) return std::nullopt;
      const Value v = eval(*e.args[k]);
      if (v.is_none()) return std::nullopt;
      if (!v.is_int()) fail(e.line, "slice indices must be integers");
      return v.as_int();
    };
    const auto start = part(1), stop = part(2), step_v = part(3);
    const int64_t step = step_v.value_or(1);
    if (step == 0) fail(e.line, "slice step cannot be zero");
    List src;
    std::vector<std::string> chars;
    int64_t n;
    if (obj.is_list()) {
      n = static_cast<int64_t>(obj.as_list().size());
    } else if (obj.is_string()) {
      chars = utf8_chars(obj.as_string());
      n = static_cast<int64_t>(chars.size());
    } else {
      fail(e.line, cat("'", obj.type_name(), "' object is not subscriptable"));
    }
    auto clamp = [&](std::optional<int64_t> v, int64_t def) {
      if (!v) return def;
      int64_t x = *v < 0 ? *v + n : *v;
      if (step > 0) return std::clamp<int64_t>(x, 0, n);
      return std::clamp<int64_t>(x, -1, n - 1);
    };
    const int64_t b = clamp(start, step > 0 ? 0 : n - 1), en = clamp(stop, step > 0 ? n : -1);
    List out_list;
    std::string out_str;
    for (int64_t i = b; step > 0 ? i < en : i > en; i += step) {
      if (obj.is_list())
        out_list.push_back(obj.as_list()[i]);
      else
        out_str += chars[i];
    }
    return obj.is_list() ? Value::list(std::move(out_list)) : Value(out_str);
  }

  Value call(const Expr& e) {
    const Expr& callee = *e.args[0];
    CallArgs args = eval_args(e, 1);
    if (callee.kind == Expr::Kind::kAttr) {
      const Value obj = eval(*callee.args[0]);
      if (obj.is_dict() && !obj.is_namespace()) {
        const Value* member = obj.as_dict().find(callee.name);
        if (member && member->is_function()) return member->as_function()(args);
      }
      return method(obj, callee.name, args, e.line);
    }
    const Value f = eval(callee);
    if (!f.is_function()) {
      fail(e.line, f.is_undefined() ? cat("'", callee.name, "' is undefined")
                                    : cat("'", f.type_name(), "' object is not callable"));
    }
    try {
      return f.as_function()(args);
    } catch (const TemplateError&) {
      throw;
    } catch (const Error& err) {
      fail(e.line, err.what());
    }
  }

  // ---- iteration ----
  static List iterate(const Value& v, int line) {
    if (v.is_list()) return v.as_list();
    if (v.is_undefined() || v.is_none()) {
      if (v.is_none()) fail(line, "'NoneType' object is not iterable");
      return {};
    }
    if (v.is_dict()) {
      List keys;
      for (const auto& [k, _] : v.as_dict().items) keys.emplace_back(k);
      return keys;
    }
    if (v.is_string()) {
      List chars;
      for (auto& c : utf8_chars(v.as_string())) chars.emplace_back(c);
      return chars;
    }
    fail(line, cat("'", v.type_name(), "' object is not iterable"));
  }

  Value method(const Value& obj, const std::string& name, CallArgs& a, int line);
  Value apply_filter(const std::string& name, const Value& v, CallArgs& a, int line);
  bool apply_test(const std::string& name, const Value& v, CallArgs& a, int line);

  std::vector<Scope> scopes_;
  int depth_ = 0;
  friend class Builtins;
};

// ---- helpers for builtins ----

const Value* kwarg(CallArgs& a, const char* name) {
  for (auto& [k, v] : a.keyword) {
    if (k == name) return &v;
  }
  return nullptr;
}
// Positional i, else keyword `name`, else fallback.
Value arg(CallArgs& a, size_t i, const char* name, Value fallback = Value::undefined()) {
  if (i < a.positional.size()) return a.positional[i];
  if (const Value* v = kwarg(a, name)) return *v;
  return fallback;
}

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}
std::string upper(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}
bool py_space(unsigned char c) {
  return c == ' ' || (c >= '\t' && c <= '\r') || c == 0x1c || c == 0x1d || c == 0x1e || c == 0x1f;
}
std::string strip(const std::string& s, const Value& chars, bool left, bool right) {
  auto is_strip = [&](char c) {
    if (chars.is_string()) return chars.as_string().find(c) != std::string::npos;
    return py_space(static_cast<unsigned char>(c));
  };
  size_t b = 0, e = s.size();
  if (left)
    while (b < e && is_strip(s[b])) ++b;
  if (right)
    while (e > b && is_strip(s[e - 1])) --e;
  return s.substr(b, e - b);
}
std::string title(const std::string& s) {
  std::string out = s;
  bool start = true;
  for (auto& c : out) {
    const bool alpha = std::isalpha(static_cast<unsigned char>(c));
    c = static_cast<char>(start ? std::toupper(static_cast<unsigned char>(c))
                                : std::tolower(static_cast<unsigned char>(c)));
    start = !alpha;
  }
  return out;
}
std::string replace_all(std::string s, const std::string& from, const std::string& to,
                        int64_t count) {
  if (from.empty()) return s;
  size_t pos = 0;
  int64_t done = 0;
  while ((count < 0 || done < count) && (pos = s.find(from, pos)) != std::string::npos) {
    s.replace(pos, from.size(), to);
    pos += to.size();
    ++done;
  }
  return s;
}

Value Interpreter::method(const Value& obj, const std::string& name, CallArgs& a, int line) {
  if (obj.is_undefined())
    fail(line, cat("'", obj.undefined_name(), "' is undefined (calling .", name, "())"));
  if (obj.is_string()) {
    const std::string& s = obj.as_string();
    if (name == "startswith" || name == "endswith") {
      const Value p = arg(a, 0, "prefix");
      List options = p.is_list() ? p.as_list() : List{p};
      for (const auto& o : options) {
        if (!o.is_string()) fail(line, cat(name, " needs a string"));
        const auto& x = o.as_string();
        if (name == "startswith"
                ? s.compare(0, x.size(), x) == 0
                : s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0) {
          return Value(true);
        }
      }
      return Value(false);
    }
    if (name == "strip") return Value(strip(s, arg(a, 0, "chars"), true, true));
    if (name == "lstrip") return Value(strip(s, arg(a, 0, "chars"), true, false));
    if (name == "rstrip") return Value(strip(s, arg(a, 0, "chars"), false, true));
    if (name == "lower") return Value(lower(s));
    if (name == "upper") return Value(upper(s));
    if (name == "title") return Value(title(s));
    if (name == "capitalize")
      return Value(s.empty() ? s : upper(s.substr(0, 1)) + lower(s.substr(1)));
    if (name == "replace") {
      const Value from = arg(a, 0, "old"), to = arg(a, 1, "new"),
                  count = arg(a, 2, "count", Value(int64_t{-1}));
      if (!from.is_string() || !to.is_string()) fail(line, "replace() needs strings");
      return Value(
          replace_all(s, from.as_string(), to.as_string(), count.is_int() ? count.as_int() : -1));
    }
    if (name == "split" || name == "rsplit") {
      const Value sep = arg(a, 0, "sep", Value::none());
      const Value maxv = arg(a, 1, "maxsplit", Value(int64_t{-1}));
      const int64_t maxsplit = maxv.is_int() ? maxv.as_int() : -1;
      List parts;
      if (sep.is_none() || sep.is_undefined()) {  // runs of whitespace, no empty parts
        size_t i = 0;
        int64_t splits = 0;
        while (i < s.size()) {
          while (i < s.size() && py_space(static_cast<unsigned char>(s[i]))) ++i;
          if (i >= s.size()) break;
          if (maxsplit >= 0 && splits >= maxsplit) {
            parts.emplace_back(strip(s.substr(i), Value::undefined(), false, true));
            break;
          }
          size_t j = i;
          while (j < s.size() && !py_space(static_cast<unsigned char>(s[j]))) ++j;
          parts.emplace_back(s.substr(i, j - i));
          ++splits;
          i = j;
        }
      } else {
        if (!sep.is_string() || sep.as_string().empty())
          fail(line, "split() needs a non-empty separator");
        const std::string& d = sep.as_string();
        if (name == "split") {
          size_t start = 0, pos;
          int64_t splits = 0;
          while ((maxsplit < 0 || splits < maxsplit) &&
                 (pos = s.find(d, start)) != std::string::npos) {
            parts.emplace_back(s.substr(start, pos - start));
            start = pos + d.size();
            ++splits;
          }
          parts.emplace_back(s.substr(start));
        } else {
          size_t end = s.size();
          int64_t splits = 0;
          List rev;
          while (maxsplit < 0 || splits < maxsplit) {
            if (end < d.size()) break;
            const size_t pos = s.rfind(d, end - d.size());
            if (pos == std::string::npos) break;
            rev.emplace_back(s.substr(pos + d.size(), end - pos - d.size()));
            end = pos;
            ++splits;
          }
          rev.emplace_back(s.substr(0, end));
          parts.assign(rev.rbegin(), rev.rend());
        }
      }
      return Value::list(std::move(parts));
    }
    if (name == "find" || name == "rfind" || name == "count" || name == "index") {
      const Value sub = arg(a, 0, "sub");
      if (!sub.is_string()) fail(line, cat(name, "() needs a string"));
      const std::string& x = sub.as_string();
      if (name == "count") {
        if (x.empty()) return Value(static_cast<int64_t>(utf8_chars(s).size() + 1));
        int64_t n = 0;
        for (size_t p = s.find(x); p != std::string::npos; p = s.find(x, p + x.size())) ++n;
        return Value(n);
      }
      const size_t p = name == "rfind" ? s.rfind(x) : s.find(x);
      if (p == std::string::npos) {
        if (name == "index") fail(line, "substring not found");
        return Value(int64_t{-1});
      }
      return Value(static_cast<int64_t>(utf8_chars(s.substr(0, p)).size()));
    }
    if (name == "join") {
      const Value items = arg(a, 0, "iterable");
      std::string out;
      bool first = true;
      for (const auto& it : iterate(items, line)) {
        if (!it.is_string()) fail(line, "join() expects strings");
        if (!first) out += s;
        out += it.as_string();
        first = false;
      }
      return Value(out);
    }
    if (name == "isdigit" || name == "isalpha" || name == "isspace" || name == "isupper" ||
        name == "islower") {
      if (s.empty()) return Value(false);
      bool ok = true, cased = false;
      for (unsigned char c : s) {
        if (name == "isdigit") ok &= std::isdigit(c) != 0;
        if (name == "isalpha") ok &= std::isalpha(c) != 0;
        if (name == "isspace") ok &= py_space(c);
        if (name == "isupper") {
          ok &= !std::islower(c);
          cased |= std::isupper(c) != 0;
        }
        if (name == "islower") {
          ok &= !std::isupper(c);
          cased |= std::islower(c) != 0;
        }
      }
      return Value(ok && (cased || (name != "isupper" && name != "islower")));
    }
  }
  if (obj.is_dict() && !obj.is_namespace()) {
    const Dict& d = obj.as_dict();
    if (name == "items") {
      List out;
      for (const auto& [k, v] : d.items) out.push_back(Value::list({Value(k), v}));
      return Value::list(std::move(out));
    }
    if (name == "keys") {
      List out;
      for (const auto& [k, v] : d.items) out.emplace_back(k);
      return Value::list(std::move(out));
    }
    if (name == "values") {
      List out;
      for (const auto& [k, v] : d.items) out.push_back(v);
      return Value::list(std::move(out));
    }
    if (name == "get") {
      const Value key = arg(a, 0, "key");
      if (key.is_string()) {
        if (const Value* v = d.find(key.as_string())) return *v;
      }
      return arg(a, 1, "default", Value::none());
    }
  }
  if (obj.is_list()) {
    if (name == "index") {
      const Value x = arg(a, 0, "value");
      const auto& l = obj.as_list();
      for (size_t i = 0; i < l.size(); ++i) {
        if (equals(l[i], x)) return Value(static_cast<int64_t>(i));
      }
      fail(line, "value is not in list");
    }
    if (name == "count") {
      const Value x = arg(a, 0, "value");
      return Value(
          static_cast<int64_t>(std::count_if(obj.as_list().begin(), obj.as_list().end(),
                                             [&](const Value& v) { return equals(v, x); })));
    }
    if (name == "append" || name == "extend" || name == "pop" || name == "insert" ||
        name == "remove") {
      fail(line, cat("lists are immutable in chat templates (", name, "() is not allowed)"));
    }
  }
  fail(line, cat("'", obj.type_name(), "' object has no method '", name, "'"));
}

Value Interpreter::apply_filter(const std::string& name, const Value& v, CallArgs& a, int line) {
  auto need_string = [&](const Value& x) -> std::string {
    require_defined(x, line);
    return x.str();
  };
  if (name == "default" || name == "d") {
    const bool boolean = arg(a, 1, "boolean", Value(false)).truthy();
    if (v.is_undefined() || (boolean && !v.truthy()))
      return arg(a, 0, "default_value", Value(std::string()));
    return v;
  }
  if (name == "tojson") {
    const Value indent = arg(a, 0, "indent", Value::none());
    const bool sort = arg(a, 4, "sort_keys", Value(false)).truthy();
    if (kwarg(a, "separators") && !kwarg(a, "separators")->is_none())
      fail(line, "tojson(separators=...) is not supported");
    return Value(v.to_json(indent.is_int() ? static_cast<int>(indent.as_int()) : -1, sort));
  }
  if (name == "length" || name == "count") {
    if (v.is_string()) return Value(static_cast<int64_t>(utf8_chars(v.as_string()).size()));
    if (v.is_list()) return Value(static_cast<int64_t>(v.as_list().size()));
    if (v.is_dict()) return Value(static_cast<int64_t>(v.as_dict().items.size()));
    if (v.is_undefined()) return Value(int64_t{0});
    fail(line, cat("object of type '", v.type_name(), "' has no len()"));
  }
  if (name == "trim") return Value(strip(need_string(v), arg(a, 0, "chars"), true, true));
  if (name == "string") return Value(v.str());
  if (name == "lower") return Value(lower(need_string(v)));
  if (name == "upper") return Value(upper(need_string(v)));
  if (name == "title") return Value(title(need_string(v)));
  if (name == "capitalize") {
    const std::string s = need_string(v);
    return Value(s.empty() ? s : upper(s.substr(0, 1)) + lower(s.substr(1)));
  }
  if (name == "safe" || name == "e" || name == "escape" || name == "forceescape") {
    if (name == "safe") return v;
    std::string out;
    for (char c : v.str()) {
      switch (c) {
        case '&':
          out += "&amp;";
          break;
        case '<':
          out += "&lt;";
          break;
        case '>':
          out += "&gt;";
          break;
        case '"':
          out += "&#34;";
          break;
        case '\'':
          out += "&#39;";
          break;
        default:
          out.push_back(c);
      }
    }
    return Value(out);
  }
  if (name == "replace") {
    const Value from = arg(a, 0, "old"), to = arg(a, 1, "new"),
                count = arg(a, 2, "count", Value::none());
    return Value(
        replace_all(need_string(v), from.str(), to.str(), count.is_int() ? count.as_int() : -1));
  }
  if (name == "int") {
    const Value def = arg(a, 0, "default", Value(int64_t{0}));
    if (v.is_int()) return v;
    if (v.is_bool()) return Value(int64_t{v.as_bool()});
    if (v.is_float()) return Value(static_cast<int64_t>(v.as_double()));
    if (v.is_string()) {
      try {
        size_t used = 0;
        const std::string t = strip(v.as_string(), Value::undefined(), true, true);
        const int64_t i = std::stoll(t, &used);
        if (used == t.size()) return Value(i);
        return Value(static_cast<int64_t>(std::stod(t)));
      } catch (const std::exception&) {
      }
    }
    return def;
  }
  if (name == "float") {
    if (v.is_number()) return Value(v.as_double());
    if (v.is_string()) {
      try {
        return Value(std::stod(v.as_string()));
      } catch (const std::exception&) {
      }
    }
    return arg(a, 0, "default", Value(0.0));
  }
  if (name == "abs") {
    if (v.is_int()) return Value(v.as_int() < 0 ? -v.as_int() : v.as_int());
    if (v.is_float()) return Value(std::fabs(v.as_double()));
    fail(line, "abs() needs a number");
  }
  if (name == "round") {
    const int64_t prec = arg(a, 0, "precision", Value(int64_t{0})).as_int();
    const std::string method = arg(a, 1, "method", Value("common")).str();
    const double scale = std::pow(10.0, static_cast<double>(prec));
    double x = v.as_double() * scale;
    // "common" is Python round(): halves go to the even neighbour.
    x = method == "floor" ? std::floor(x) : method == "ceil" ? std::ceil(x) : std::nearbyint(x);
    return Value(x / scale);
  }
  if (name == "first" || name == "last") {
    const List items = iterate(v, line);
    if (items.empty()) return Value::undefined(name);
    return name == "first" ? items.front() : items.back();
  }
  if (name == "list") return Value::list(iterate(v, line));
  if (name == "reverse") {
    if (v.is_string()) {
      auto chars = utf8_chars(v.as_string());
      std::string out;
      for (auto it = chars.rbegin(); it != chars.rend(); ++it) out += *it;
      return Value(out);
    }
    List items = iterate(v, line);
    std::reverse(items.begin(), items.end());
    return Value::list(std::move(items));
  }
  if (name == "join") {
    const std::string sep = arg(a, 0, "d", Value(std::string())).str();
    const Value attribute = arg(a, 1, "attribute");
    std::string out;
    bool first = true;
    for (const auto& it : iterate(v, line)) {
      if (!first) out += sep;
      out += (attribute.is_undefined() ? it : get_attr(it, attribute.str(), line)).str();
      first = false;
    }
    return Value(out);
  }
  if (name == "items") {
    if (v.is_undefined()) return Value::list();
    if (!v.is_dict()) fail(line, "items() needs a mapping");
    CallArgs none;
    return method(v, "items", none, line);
  }
  if (name == "dictsort") {
    if (!v.is_dict()) fail(line, "dictsort needs a mapping");
    const bool by_value = arg(a, 2, "by", Value("key")).str() == "value";
    const bool reverse = arg(a, 3, "reverse", Value(false)).truthy();
    auto items = v.as_dict().items;
    std::stable_sort(items.begin(), items.end(), [&](auto& x, auto& y) {
      return by_value ? less(x.second, y.second) : lower(x.first) < lower(y.first);
    });
    if (reverse) std::reverse(items.begin(), items.end());
    List out;
    for (auto& [k, val] : items) out.push_back(Value::list({Value(k), val}));
    return Value::list(std::move(out));
  }
  if (name == "sort") {
    List items = iterate(v, line);
    const bool reverse = arg(a, 0, "reverse", Value(false)).truthy();
    const bool case_sensitive = arg(a, 1, "case_sensitive", Value(false)).truthy();
    const Value attribute = arg(a, 2, "attribute");
    auto key = [&](const Value& x) {
      Value k = attribute.is_undefined() ? x : get_attr(x, attribute.str(), line);
      if (!case_sensitive && k.is_string()) k = Value(lower(k.as_string()));
      return k;
    };
    std::stable_sort(items.begin(), items.end(), [&](const Value& x, const Value& y) {
      return reverse ? less(key(y), key(x)) : less(key(x), key(y));
    });
    return Value::list(std::move(items));
  }
  if (name == "unique") {
    List out;
    for (const auto& it : iterate(v, line)) {
      if (std::none_of(out.begin(), out.end(), [&](const Value& o) { return equals(o, it); }))
        out.push_back(it);
    }
    return Value::list(std::move(out));
  }
  if (name == "min" || name == "max") {
    const List items = iterate(v, line);
    if (items.empty()) return Value::undefined(name);
    Value best = items[0];
    for (const auto& it : items) {
      if (name == "min" ? less(it, best) : less(best, it)) best = it;
    }
    return best;
  }
  if (name == "sum") {
    Value total = arg(a, 1, "start", Value(int64_t{0}));
    const Value attribute = arg(a, 0, "attribute");
    for (const auto& it : iterate(v, line)) {
      total = binary("+", total,
                     attribute.is_undefined() ? it : get_attr(it, attribute.str(), line), line);
    }
    return total;
  }
  if (name == "map") {
    List out;
    if (const Value* attribute = kwarg(a, "attribute")) {
      const Value* def = kwarg(a, "default");
      for (const auto& it : iterate(v, line)) {
        Value x = get_attr(it, attribute->str(), line);
        out.push_back(x.is_undefined() && def ? *def : x);
      }
      return Value::list(std::move(out));
    }
    if (a.positional.empty()) fail(line, "map() needs a filter name or attribute=");
    const std::string filter = a.positional[0].str();
    CallArgs rest{{a.positional.begin() + 1, a.positional.end()}, a.keyword};
    for (const auto& it : iterate(v, line)) out.push_back(apply_filter(filter, it, rest, line));
    return Value::list(std::move(out));
  }
  if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
    const bool by_attr = name == "selectattr" || name == "rejectattr";
    const bool keep_true = name == "select" || name == "selectattr";
    size_t next = 0;
    std::string attribute;
    if (by_attr) {
      if (a.positional.empty()) fail(line, cat(name, "() needs an attribute"));
      attribute = a.positional[next++].str();
    }
    std::string test;
    if (next < a.positional.size()) test = a.positional[next++].str();
    CallArgs rest{{a.positional.begin() + static_cast<long>(next), a.positional.end()}, a.keyword};
    List out;
    for (const auto& it : iterate(v, line)) {
      const Value subject = by_attr ? get_attr(it, attribute, line) : it;
      const bool r = test.empty() ? subject.truthy() : apply_test(test, subject, rest, line);
      if (r == keep_true) out.push_back(it);
    }
    return Value::list(std::move(out));
  }
  if (name == "attr") return get_attr(v, arg(a, 0, "name").str(), line);
  if (name == "indent") {
    const Value w = arg(a, 0, "width", Value(int64_t{4}));
    const std::string pad =
        w.is_string() ? w.as_string()
                      : std::string(static_cast<size_t>(std::max<int64_t>(0, w.as_int())), ' ');
    const bool first = arg(a, 1, "first", Value(false)).truthy();
    const bool blank = arg(a, 2, "blank", Value(false)).truthy();
    const std::string s = need_string(v);
    std::string out;
    size_t start = 0;
    bool is_first = true;
    while (start <= s.size()) {
      size_t nl = s.find('\n', start);
      const std::string ln =
          s.substr(start, nl == std::string::npos ? std::string::npos : nl - start);
      if ((is_first ? first : true) && (blank || !ln.empty()) && !(is_first && !first)) out += pad;
      out += ln;
      if (nl == std::string::npos) break;
      out += "\n";
      start = nl + 1;
      is_first = false;
    }
    return Value(out);
  }
  if (name == "wordcount") {
    CallArgs none;
    return Value(
        static_cast<int64_t>(method(Value(need_string(v)), "split", none, line).as_list().size()));
  }
  if (name == "batch") {
    const int64_t n = arg(a, 0, "linecount").as_int();
    if (n <= 0) fail(line, "batch() needs a positive size");
    List out, cur;
    for (const auto& it : iterate(v, line)) {
      cur.push_back(it);
      if (static_cast<int64_t>(cur.size()) == n) {
        out.push_back(Value::list(cur));
        cur.clear();
      }
    }
    if (!cur.empty()) out.push_back(Value::list(cur));
    return Value::list(std::move(out));
  }
  fail(line, cat("unknown filter '", name, "'"));
}

bool Interpreter::apply_test(const std::string& name, const Value& v, CallArgs& a, int line) {
  if (name == "defined") return !v.is_undefined();
  if (name == "undefined") return v.is_undefined();
  if (name == "none") return v.is_none();
  if (name == "boolean") return v.is_bool();
  if (name == "true") return v.is_bool() && v.as_bool();
  if (name == "false") return v.is_bool() && !v.as_bool();
  if (name == "integer") return v.is_int();
  if (name == "float") return v.is_float();
  if (name == "number") return v.is_number() || v.is_bool();
  if (name == "string") return v.is_string();
  if (name == "mapping") return v.is_dict() && !v.is_namespace();
  if (name == "iterable") return v.is_list() || v.is_string() || v.is_dict();
  if (name == "sequence") return v.is_list() || v.is_string() || v.is_dict();
  if (name == "callable") return v.is_function();
  if (name == "lower") return v.is_string() && lower(v.as_string()) == v.as_string();
  if (name == "upper") return v.is_string() && upper(v.as_string()) == v.as_string();
  if (name == "even" || name == "odd") {
    if (!v.is_int()) fail(line, cat("'", name, "' test needs an integer"));
    return (v.as_int() % 2 == 0) == (name == "even");
  }
  if (name == "divisibleby") {
    const Value n = arg(a, 0, "num");
    if (!v.is_int() || !n.is_int() || n.as_int() == 0)
      fail(line, "divisibleby needs non-zero integers");
    return v.as_int() % n.as_int() == 0;
  }
  const Value other = arg(a, 0, "other");
  if (name == "eq" || name == "equalto" || name == "==") return equals(v, other);
  if (name == "ne" || name == "!=") return !equals(v, other);
  if (name == "lt" || name == "lessthan" || name == "<") return less(v, other);
  if (name == "le" || name == "<=") return !less(other, v);
  if (name == "gt" || name == "greaterthan" || name == ">") return less(other, v);
  if (name == "ge" || name == ">=") return !less(v, other);
  if (name == "in") return binary("in", v, other, line).as_bool();
  if (name == "sameas") {
    if (v.kind() != other.kind()) return false;
    if (v.is_none() || v.is_undefined()) return true;
    if (v.is_bool()) return v.as_bool() == other.as_bool();
    if (v.is_list()) return &v.as_list() == &other.as_list();
    if (v.is_dict()) return &v.as_dict() == &other.as_dict();
    return equals(v, other);
  }
  fail(line, cat("unknown test '", name, "'"));
}

// Globals every chat template may call.
Scope make_globals() {
  Scope g;
  g["range"] = Value::function([](CallArgs& a) -> Value {
    int64_t start = 0, stop, step = 1;
    auto get = [&](size_t i) {
      if (!a.positional[i].is_int()) throw TemplateError("range() needs integers");
      return a.positional[i].as_int();
    };
    if (a.positional.size() == 1) {
      stop = get(0);
    } else if (a.positional.size() == 2 || a.positional.size() == 3) {
      start = get(0);
      stop = get(1);
      if (a.positional.size() == 3) step = get(2);
    } else {
      throw TemplateError("range() takes 1 to 3 arguments");
    }
    if (step == 0) throw TemplateError("range() step must not be zero");
    List out;
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
      if (static_cast<int64_t>(out.size()) >= kMaxRange)
        throw TemplateError("range() is too large");
      out.emplace_back(i);
    }
    return Value::list(std::move(out));
  });
  g["namespace"] = Value::function([](CallArgs& a) -> Value {
    Dict d;
    for (const auto& p : a.positional) {
      if (!p.is_dict()) throw TemplateError("namespace() takes a mapping or keyword arguments");
      for (const auto& [k, v] : p.as_dict().items) d.set(k, v);
    }
    for (const auto& [k, v] : a.keyword) d.set(k, v);
    return Value::namespace_(std::move(d));
  });
  g["dict"] = Value::function([](CallArgs& a) -> Value {
    Dict d;
    for (const auto& [k, v] : a.keyword) d.set(k, v);
    return Value::dict(std::move(d));
  });
  g["raise_exception"] = Value::function([](CallArgs& a) -> Value {
    throw TemplateError(a.positional.empty() ? std::string("raise_exception() called")
                                             : a.positional[0].str());
  });
  g["strftime_now"] = Value::function([](CallArgs& a) -> Value {
    const std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
    std::tm tm{};
    localtime_r(&now, &tm);
    char buf[256];
    const std::string fmt = a.positional.empty() ? "%Y-%m-%d" : a.positional[0].str();
    const size_t n = std::strftime(buf, sizeof buf, fmt.c_str(), &tm);
    return Value(std::string(buf, n));
  });
  return g;
}

}  // namespace

Template::Template(std::string_view source) : body_(parse_template(source)) {}

std::string Template::render(const nlohmann::ordered_json& context) const {
  Scope globals = make_globals();
  if (!context.is_null() && !context.is_object())
    throw TemplateError("template context must be an object");
  if (context.is_object()) {
    for (auto it = context.begin(); it != context.end(); ++it)
      globals[it.key()] = Value::from_json(it.value());
  }
  Interpreter interp(std::move(globals));
  return interp.run(body_);
}

}  // namespace ernie::jinja
