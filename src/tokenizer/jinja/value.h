// Values of the Jinja subset that chat templates use, with Python's semantics where templates
// can see them (truthiness, str(), repr(), equality and ordering, json.dumps).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "common/check.h"

namespace ernie::jinja {

// A template that cannot be parsed or rendered (also what raise_exception() throws).
class TemplateError : public Error {
 public:
  using Error::Error;
};

class Value;
using List = std::vector<Value>;

// Insertion-ordered string-keyed map (Python dicts keep insertion order).
struct Dict {
  std::vector<std::pair<std::string, Value>> items;
  const Value* find(std::string_view key) const;
  void set(const std::string& key, Value v);
};

struct CallArgs {
  std::vector<Value> positional;
  std::vector<std::pair<std::string, Value>> keyword;
};
using Function = std::function<Value(CallArgs&)>;

class Value {
 public:
  enum class Kind { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kFunction };

  Value() = default;  // undefined
  static Value undefined(std::string name = {});
  static Value none();
  Value(bool b);
  Value(int64_t i);
  Value(int i) : Value(static_cast<int64_t>(i)) {}
  Value(double d);
  Value(std::string s);
  Value(const char* s) : Value(std::string(s)) {}
  static Value list(List items = {});
  static Value dict(Dict d = {});
  static Value namespace_(Dict d = {});
  static Value function(Function f);
  static Value from_json(const nlohmann::ordered_json& j);

  Kind kind() const { return kind_; }
  bool is_undefined() const { return kind_ == Kind::kUndefined; }
  bool is_none() const { return kind_ == Kind::kNone; }
  bool is_bool() const { return kind_ == Kind::kBool; }
  bool is_int() const { return kind_ == Kind::kInt; }
  bool is_float() const { return kind_ == Kind::kFloat; }
  bool is_number() const { return kind_ == Kind::kInt || kind_ == Kind::kFloat; }
  bool is_string() const { return kind_ == Kind::kString; }
  bool is_list() const { return kind_ == Kind::kList; }
  bool is_dict() const { return kind_ == Kind::kDict; }
  bool is_namespace() const { return kind_ == Kind::kDict && namespace_flag_; }
  bool is_function() const { return kind_ == Kind::kFunction; }

  bool as_bool() const { return b_; }
  int64_t as_int() const { return i_; }
  double as_double() const { return kind_ == Kind::kInt ? static_cast<double>(i_) : f_; }
  const std::string& as_string() const { return s_; }
  List& as_list() const { return *list_; }
  Dict& as_dict() const { return *dict_; }
  const Function& as_function() const { return *fn_; }
  const std::string& undefined_name() const { return s_; }

  bool truthy() const;
  // Python str(): what {{ value }} prints.
  std::string str() const;
  // Python repr(): how values print inside lists and dicts.
  std::string repr() const;
  // json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=...); indent < 0: one line.
  std::string to_json(int indent = -1, bool sort_keys = false) const;
  std::string type_name() const;

 private:
  Kind kind_ = Kind::kUndefined;
  bool b_ = false;
  bool namespace_flag_ = false;
  int64_t i_ = 0;
  double f_ = 0;
  std::string s_;  // string value, or the name of an undefined variable
  std::shared_ptr<List> list_;
  std::shared_ptr<Dict> dict_;
  std::shared_ptr<Function> fn_;
};

// Python ==, and < for sort/min/max (throws TemplateError for unorderable types).
bool equals(const Value& a, const Value& b);
bool less(const Value& a, const Value& b);

// Python's float repr (shortest round-trip digits, "1.0", "1e-05", "1e+16").
std::string python_float(double d);

// UTF-8 <-> code points, for Python string indexing and slicing.
std::vector<std::string> utf8_chars(std::string_view s);

}  // namespace ernie::jinja
