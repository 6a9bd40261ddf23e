#include "tokenizer/sp_proto.h"

#include <cstdint>
#include <optional>
#include <vector>

#include "common/check.h"

namespace ernie::tokenizer {
namespace {

constexpr uint32_t kNormalizerSpec = 3;  // ModelProto.normalizer_spec
constexpr uint32_t kAddDummyPrefix = 3;  // NormalizerSpec.add_dummy_prefix
constexpr uint32_t kRemoveExtraWhitespaces = 4;

struct Field {
  uint32_t number;
  uint32_t wire_type;
  std::string_view raw;      // the whole field: tag + payload
  std::string_view payload;  // length-delimited payload, or the varint bytes
  uint64_t varint = 0;
};

uint64_t read_varint(std::string_view s, size_t& pos) {
  uint64_t v = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    if (pos >= s.size()) throw Error("tokenizer.model: truncated protobuf varint");
    const uint8_t b = static_cast<uint8_t>(s[pos++]);
    v |= static_cast<uint64_t>(b & 0x7f) << shift;
    if (!(b & 0x80)) return v;
  }
  throw Error("tokenizer.model: malformed protobuf varint");
}

void write_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}

std::vector<Field> parse(std::string_view s) {
  std::vector<Field> out;
  size_t pos = 0;
  while (pos < s.size()) {
    const size_t start = pos;
    const uint64_t tag = read_varint(s, pos);
    Field f{static_cast<uint32_t>(tag >> 3), static_cast<uint32_t>(tag & 7), {}, {}};
    const size_t body = pos;
    switch (f.wire_type) {
      case 0:
        f.varint = read_varint(s, pos);
        break;
      case 1:
        pos += 8;
        break;
      case 2: {
        const uint64_t len = read_varint(s, pos);
        if (len > s.size() - pos) throw Error("tokenizer.model: protobuf field runs past the end");
        pos += len;
        break;
      }
      case 5:
        pos += 4;
        break;
      default:
        throw Error("tokenizer.model: unsupported protobuf wire type (not a SentencePiece model?)");
    }
    if (pos > s.size()) throw Error("tokenizer.model: truncated protobuf field");
    f.raw = s.substr(start, pos - start);
    f.payload = s.substr(body, pos - body);
    if (f.wire_type == 2) {
      size_t p = body;
      const uint64_t len = read_varint(s, p);
      f.payload = s.substr(p, len);
    }
    out.push_back(f);
  }
  return out;
}

}  // namespace

std::string set_normalizer_flags(std::string_view model, bool add_dummy_prefix,
                                 bool remove_extra_whitespaces) {
  std::string out, spec;
  bool found = false;
  for (const Field& f : parse(model)) {
    if (f.number != kNormalizerSpec || f.wire_type != 2) {
      out.append(f.raw);
      continue;
    }
    found = true;
    for (const Field& g : parse(f.payload)) {
      if (g.number != kAddDummyPrefix && g.number != kRemoveExtraWhitespaces) spec.append(g.raw);
    }
  }
  if (!found) throw Error("tokenizer.model: no normalizer_spec (not a SentencePiece model?)");
  write_varint(spec, (kAddDummyPrefix << 3) | 0);
  write_varint(spec, add_dummy_prefix ? 1 : 0);
  write_varint(spec, (kRemoveExtraWhitespaces << 3) | 0);
  write_varint(spec, remove_extra_whitespaces ? 1 : 0);
  write_varint(out, (kNormalizerSpec << 3) | 2);
  write_varint(out, spec.size());
  out.append(spec);
  return out;
}

bool dummy_prefix_of(std::string_view model) {
  bool value = true;
  for (const Field& f : parse(model)) {
    if (f.number != kNormalizerSpec || f.wire_type != 2) continue;
    for (const Field& g : parse(f.payload)) {
      if (g.number == kAddDummyPrefix && g.wire_type == 0) value = g.varint != 0;
    }
  }
  return value;
}

}  // namespace ernie::tokenizer
