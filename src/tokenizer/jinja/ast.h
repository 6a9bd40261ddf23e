// The parsed form of a template: expressions and statements.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "tokenizer/jinja/value.h"

namespace ernie::jinja {

struct Expr;
using ExprPtr = std::shared_ptr<Expr>;

struct Expr {
  enum class Kind {
    kLiteral,  // value
    kName,     // name
    kList,     // args
    kTuple,    // args (a tuple behaves as a list here)
    kDict,     // kwargs keys are expressions: args = [k0, v0, k1, v1, ...]
    kAttr,     // args[0].name
    kIndex,    // args[0][args[1]]
    kSlice,    // args[0][args[1]:args[2]:args[3]] (null parts allowed)
    kCall,     // args[0](args[1:], kwargs)
    kFilter,   // args[0] | name(args[1:], kwargs)
    kTest,     // args[0] is [not] name(args[1:])
    kUnary,    // name in {"-", "+", "not"} applied to args[0]
    kBinary,   // args[0] name args[1]; name in + - * / // % ** ~ == != < <= > >= in "not in"
    kAnd,
    kOr,
    kCond,  // args[1] if args[0] else args[2] (args[2] may be null)
  };
  Kind kind;
  int line = 0;
  Value value;
  std::string name;
  bool negated = false;
  std::vector<ExprPtr> args;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
};

struct Node;
using NodePtr = std::shared_ptr<Node>;
using Body = std::vector<NodePtr>;

struct Node {
  enum class Kind {
    kText,      // text
    kOutput,    // {{ expr }}
    kIf,        // branches: (condition or null for else, body)
    kFor,       // targets in expr [if filter] body / else_body
    kSet,       // targets = expr, or attr_target.attr = expr
    kSetBlock,  // targets[0] = rendered body
    kMacro,     // name(params) body
    kBreak,
    kContinue,
    kScope,        // body rendered as is ({% generation %})
    kFilterBlock,  // body piped through the filter in expr (expr.args[0] is a placeholder)
  };
  Kind kind;
  int line = 0;
  std::string text;
  ExprPtr expr;
  ExprPtr filter;
  std::vector<std::pair<ExprPtr, Body>> branches;
  std::vector<std::string> targets;
  ExprPtr attr_target;  // set ns.attr = ...: the namespace expression
  std::string attr;
  Body body, else_body;
  std::string name;
  std::vector<std::pair<std::string, ExprPtr>> params;  // macro parameters and defaults
};

// Parses a template (transformers' settings: trim_blocks and lstrip_blocks on, a single
// trailing newline dropped). Throws TemplateError with the line number.
Body parse_template(std::string_view source);

}  // namespace ernie::jinja
