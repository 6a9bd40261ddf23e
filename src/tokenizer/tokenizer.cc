#include "tokenizer/tokenizer.h"

#include <sentencepiece_processor.h>

#include <algorithm>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "common/check.h"
#include "tokenizer/sp_proto.h"

namespace ernie::tokenizer {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

std::string read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  if (!f) throw Error(cat(p.string(), ": cannot open"));
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Parsed JSON of an optional file (null when absent).
json read_json(const fs::path& p) {
  if (!fs::exists(p)) return nullptr;
  try {
    return json::parse(read_bytes(p));
  } catch (const json::exception& e) {
    throw Error(cat(p.string(), ": not valid JSON: ", e.what()));
  }
}

// A special token is written either as "<s>" or as {"content": "<s>", ...}.
std::optional<std::string> token_string(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) {
    return v["content"].get<std::string>();
  }
  return std::nullopt;
}

bool flag(const json& o, const char* key, bool fallback) {
  auto it = o.find(key);
  return it != o.end() && it->is_boolean() ? it->get<bool>() : fallback;
}

AddedToken parse_added(const json& o, int64_t id, const std::string& source) {
  if (!o.is_object() || !o.contains("content") || !o["content"].is_string() ||
      o["content"].get<std::string>().empty()) {
    throw Error(cat(source, ": added token ", id, " has no string 'content'"));
  }
  if (id < 0 || id > (1 << 30))
    throw Error(cat(source, ": added token id ", id, " is out of range"));
  AddedToken t;
  t.id = static_cast<int32_t>(id);
  t.content = o["content"].get<std::string>();
  t.special = flag(o, "special", true);
  t.lstrip = flag(o, "lstrip", false);
  t.rstrip = flag(o, "rstrip", false);
  t.single_word = flag(o, "single_word", false);
  return t;
}

bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}
bool is_word(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
         static_cast<unsigned char>(c) >= 0x80;
}

// The metaspace scheme of a tokenizer.json: Metaspace's prepend_scheme (or its legacy
// add_prefix_space), or a Prepend("▁") normalizer.
PrefixSpace prefix_from_tokenizer_json(const json& tj) {
  PrefixSpace mode = PrefixSpace::kNever;
  auto visit = [&](const json& node, auto&& self) -> void {
    if (node.is_array()) {
      for (const auto& n : node) self(n, self);
      return;
    }
    if (!node.is_object()) return;
    const std::string type = node.value("type", "");
    if (type == "Sequence") {
      for (const char* key : {"normalizers", "pretokenizers"}) {
        if (node.contains(key)) self(node[key], self);
      }
    } else if (type == "Prepend") {
      mode = PrefixSpace::kAlways;
    } else if (type == "Metaspace") {
      const std::string scheme = node.value("prepend_scheme", "");
      if (scheme == "always") mode = PrefixSpace::kAlways;
      if (scheme == "first") mode = PrefixSpace::kFirst;
      if (scheme.empty() && flag(node, "add_prefix_space", false)) mode = PrefixSpace::kAlways;
    }
  };
  if (tj.contains("normalizer")) visit(tj["normalizer"], visit);
  if (tj.contains("pre_tokenizer")) visit(tj["pre_tokenizer"], visit);
  return mode;
}

}  // namespace

Tokenizer::Tokenizer() : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {}
Tokenizer::~Tokenizer() = default;

std::shared_ptr<const Tokenizer> Tokenizer::load(const fs::path& dir) {
  try {
    return load_checked(dir);
  } catch (const nlohmann::json::exception& e) {
    // A field of an unexpected type in one of the JSON files.
    throw Error(cat(dir.string(), ": malformed tokenizer files: ", e.what()));
  }
}

std::shared_ptr<const Tokenizer> Tokenizer::load_checked(const fs::path& dir) {
  std::shared_ptr<Tokenizer> t(new Tokenizer());
  const fs::path model_path = dir / "tokenizer.model";
  if (!fs::exists(model_path)) {
    throw Error(
        cat(dir.string(), ": no tokenizer.model (a SentencePiece model) in the model directory"));
  }
  const json tok_json = read_json(dir / "tokenizer.json");
  const json cfg = read_json(dir / "tokenizer_config.json");
  const json map = read_json(dir / "special_tokens_map.json");
  const json gen = read_json(dir / "generation_config.json");
  if (!cfg.is_null() && !cfg.is_object())
    throw Error(cat((dir / "tokenizer_config.json").string(), ": expected an object"));

  // transformers builds ERNIE's fast tokenizer without SentencePiece's dummy prefix and without
  // whitespace folding; make SentencePiece do exactly that, and prepend ourselves if asked.
  t->prefix_ = tok_json.is_object() ? prefix_from_tokenizer_json(tok_json) : PrefixSpace::kNever;
  const std::string proto = set_normalizer_flags(read_bytes(model_path), false, false);
  if (auto st = t->sp_->LoadFromSerializedProto(proto); !st.ok()) {
    throw Error(cat(model_path.string(), ": not a valid SentencePiece model: ", st.ToString()));
  }

  // Added tokens: tokenizer.json's list, then tokenizer_config.json's decoder (which wins).
  std::map<int32_t, AddedToken> added;
  if (tok_json.is_object() && tok_json.contains("added_tokens") &&
      tok_json["added_tokens"].is_array()) {
    for (const auto& o : tok_json["added_tokens"]) {
      if (!o.is_object() || !o.contains("id") || !o["id"].is_number_integer()) {
        throw Error(cat((dir / "tokenizer.json").string(), ": an added token has no integer 'id'"));
      }
      const auto a = parse_added(o, o["id"].get<int64_t>(), (dir / "tokenizer.json").string());
      added[a.id] = a;
    }
  }
  if (cfg.is_object() && cfg.contains("added_tokens_decoder")) {
    const auto& dec = cfg["added_tokens_decoder"];
    const std::string src = (dir / "tokenizer_config.json").string();
    if (!dec.is_object()) throw Error(cat(src, ": 'added_tokens_decoder' must be an object"));
    for (auto& [key, o] : dec.items()) {
      int64_t id = -1;
      try {
        size_t used = 0;
        id = std::stoll(key, &used);
        if (used != key.size()) id = -1;
      } catch (const std::exception&) {
      }
      if (id < 0) throw Error(cat(src, ": added_tokens_decoder key '", key, "' is not a token id"));
      const auto a = parse_added(o, id, src);
      added[a.id] = a;
    }
  }
  // Named special tokens.
  for (const char* name : {"bos_token", "eos_token", "unk_token", "pad_token", "cls_token",
                           "sep_token", "mask_token"}) {
    for (const json* src : {&map, &cfg}) {
      if (src->is_object() && src->contains(name)) {
        if (auto s = token_string((*src)[name])) t->named_[name] = *s;
      }
    }
  }
  t->add_bos_ = cfg.is_object() && flag(cfg, "add_bos_token", false);
  t->add_eos_ = cfg.is_object() && flag(cfg, "add_eos_token", false);

  for (auto& [id, a] : added) {
    t->added_.push_back(a);
    t->added_by_content_[a.content] = id;
  }
  std::stable_sort(
      t->added_.begin(), t->added_.end(),
      [](const AddedToken& a, const AddedToken& b) { return a.content.size() > b.content.size(); });
  for (const auto& a : t->added_)
    t->by_first_byte_[static_cast<unsigned char>(a.content[0])].push_back(&a);

  // Pieces by id.
  const int32_t sp_size = t->sp_->GetPieceSize();
  int32_t size = sp_size;
  for (const auto& a : t->added_) size = std::max(size, a.id + 1);
  t->vocab_size_ = size;
  t->base_vocab_size_ = sp_size;
  t->pieces_.assign(size, Piece{"", false, false, false});
  for (int32_t id = 0; id < sp_size; ++id) {
    Piece& p = t->pieces_[id];
    p.known = true;
    const std::string& s = t->sp_->IdToPiece(id);
    if (t->sp_->IsByte(id)) {
      p.is_byte = true;
      p.text.assign(1, static_cast<char>(std::stoi(s.substr(3, 2), nullptr, 16)));  // "<0xNN>"
    } else if (t->sp_->IsControl(id) || t->sp_->IsUnknown(id)) {
      p.text = s;
      p.special = true;
    } else {
      // "▁" (U+2581, e2 96 81) is the metaspace.
      for (size_t i = 0; i < s.size();) {
        if (s.compare(i, 3, "\xe2\x96\x81") == 0) {
          p.text.push_back(' ');
          i += 3;
        } else {
          p.text.push_back(s[i++]);
        }
      }
    }
  }
  for (const auto& a : t->added_) t->pieces_[a.id] = Piece{a.content, false, a.special, true};
  for (const auto& [name, s] : t->named_) {
    if (auto id = t->token_to_id(s)) t->pieces_[*id].special = true;
  }

  if (t->named_.count("bos_token")) t->bos_id_ = t->token_to_id(t->named_["bos_token"]);
  if (t->named_.count("eos_token")) t->eos_id_ = t->token_to_id(t->named_["eos_token"]);
  if (t->eos_id_) t->eos_ids_.push_back(*t->eos_id_);
  if (gen.is_object() && gen.contains("eos_token_id")) {
    const json& e = gen["eos_token_id"];
    std::vector<json> ids =
        e.is_array() ? std::vector<json>(e.begin(), e.end()) : std::vector<json>{e};
    for (const auto& v : ids) {
      if (!v.is_number_integer()) {
        throw Error(cat((dir / "generation_config.json").string(),
                        ": eos_token_id must be an integer or a list of integers"));
      }
      const int32_t id = v.get<int32_t>();
      if (std::find(t->eos_ids_.begin(), t->eos_ids_.end(), id) == t->eos_ids_.end())
        t->eos_ids_.push_back(id);
    }
  }

  // Chat template: chat_template.jinja wins over tokenizer_config.json's field.
  if (fs::exists(dir / "chat_template.jinja")) {
    t->chat_template_ = read_bytes(dir / "chat_template.jinja");
  } else if (cfg.is_object() && cfg.contains("chat_template")) {
    const json& ct = cfg["chat_template"];
    if (ct.is_string()) {
      t->chat_template_ = ct.get<std::string>();
    } else if (ct.is_array()) {  // [{"name": "default", "template": "..."}, ...]
      for (const auto& e : ct) {
        if (e.is_object() && e.value("name", "") == "default" && e.contains("template") &&
            e["template"].is_string()) {
          t->chat_template_ = e["template"].get<std::string>();
        }
      }
    }
  }
  return t;
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  if (auto it = added_by_content_.find(token); it != added_by_content_.end()) return it->second;
  const int id = sp_->PieceToId(std::string(token));
  if (id != sp_->unk_id() || token == sp_->IdToPiece(sp_->unk_id())) return id;
  return std::nullopt;
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && id < vocab_size_ && pieces_[id].special;
}

const Tokenizer::Piece& Tokenizer::piece(int32_t id) const {
  static const Piece kUnknown{"", false, false, false};
  return id >= 0 && id < vocab_size_ ? pieces_[id] : kUnknown;
}

void Tokenizer::encode_plain(std::string_view text, bool prefix, std::vector<int32_t>& out) const {
  if (text.empty()) return;
  std::vector<int> ids;
  std::string input;
  input.reserve(text.size() + 1);
  if (prefix) input.push_back(' ');
  input.append(text);
  if (auto st = sp_->Encode(input, &ids); !st.ok()) throw Error(cat("tokenizer: ", st.ToString()));
  out.insert(out.end(), ids.begin(), ids.end());
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  std::vector<int32_t> out;
  if (add_special_tokens && add_bos_ && bos_id_) out.push_back(*bos_id_);
  size_t seg_start = 0, i = 0;
  bool first = true;
  while (i < text.size()) {
    const AddedToken* hit = nullptr;
    for (const AddedToken* ap :
         by_first_byte_[static_cast<unsigned char>(text[i])]) {  // longest first
      const AddedToken& a = *ap;
      if (text.compare(i, a.content.size(), a.content) != 0) continue;
      if (a.single_word &&
          ((i > 0 && is_word(text[i - 1])) ||
           (i + a.content.size() < text.size() && is_word(text[i + a.content.size()])))) {
        continue;
      }
      hit = &a;
      break;
    }
    if (!hit) {
      ++i;
      continue;
    }
    size_t seg_end = i;
    if (hit->lstrip) {
      while (seg_end > seg_start && is_space(text[seg_end - 1])) --seg_end;
    }
    const bool prefix = prefix_ == PrefixSpace::kAlways ||
                        (prefix_ == PrefixSpace::kFirst && first && seg_start == 0);
    encode_plain(text.substr(seg_start, seg_end - seg_start), prefix, out);
    first = false;
    out.push_back(hit->id);
    i += hit->content.size();
    if (hit->rstrip) {
      while (i < text.size() && is_space(text[i])) ++i;
    }
    seg_start = i;
  }
  const bool prefix = prefix_ == PrefixSpace::kAlways || (prefix_ == PrefixSpace::kFirst && first);
  encode_plain(text.substr(seg_start), prefix, out);
  if (add_special_tokens && add_eos_ && eos_id_) out.push_back(*eos_id_);
  return out;
}

namespace {

// Bytes of a byte-fallback run: the UTF-8 text when valid, else one U+FFFD per byte (what the
// Hugging Face ByteFallback decoder does).
void flush_bytes(std::string& bytes, std::string& out) {
  if (bytes.empty()) return;
  if (is_valid_utf8(bytes)) {
    out += bytes;
  } else {
    for (size_t i = 0; i < bytes.size(); ++i) out += "\xef\xbf\xbd";
  }
  bytes.clear();
}

}  // namespace

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  std::string out, bytes;
  for (int32_t id : ids) {
    const Piece& p = piece(id);
    if (!p.known || (skip_special_tokens && p.special)) continue;
    if (p.is_byte) {
      bytes += p.text;
      continue;
    }
    flush_bytes(bytes, out);
    out += p.text;
  }
  flush_bytes(bytes, out);
  return out;
}

// Length of the well-formed UTF-8 sequence starting at s[i], or 0.
static size_t utf8_sequence_length(std::string_view s, size_t i) {
  const auto b = static_cast<unsigned char>(s[i]);
  size_t n;
  uint32_t min;
  if (b < 0x80) return 1;
  if ((b & 0xe0) == 0xc0) {
    n = 2;
    min = 0x80;
  } else if ((b & 0xf0) == 0xe0) {
    n = 3;
    min = 0x800;
  } else if ((b & 0xf8) == 0xf0) {
    n = 4;
    min = 0x10000;
  } else {
    return 0;
  }
  if (i + n > s.size()) return 0;
  uint32_t cp = b & (0x7f >> n);
  for (size_t k = 1; k < n; ++k) {
    const auto c = static_cast<unsigned char>(s[i + k]);
    if ((c & 0xc0) != 0x80) return 0;
    cp = (cp << 6) | (c & 0x3f);
  }
  if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
  return n;
}

bool is_valid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const size_t n = utf8_sequence_length(s, i);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

}  // namespace ernie::tokenizer
