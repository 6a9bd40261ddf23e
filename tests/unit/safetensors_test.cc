#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <cstring>

#include "common/check.h"
#include "common/rng.h"
#include "model/safetensors.h"
#include "test_util.h"

namespace ernie::model {
namespace {

using testing::TempDir;
namespace fs = std::filesystem;

// A file of `header` JSON followed by `data_bytes` bytes of data.
std::string raw_file(const std::string& header, size_t data_bytes, uint64_t claimed_len = 0) {
  const uint64_t n = claimed_len ? claimed_len : header.size();
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + std::string(data_bytes, '\x11');
}

std::string error_of(const fs::path& p) {
  try {
    SafetensorsFile f(p);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// Writes two tensors with fresh random values and returns them.
std::pair<std::vector<float>, std::vector<uint16_t>> write_pair(const fs::path& p, uint64_t seed) {
  Rng rng(seed);
  std::vector<float> a(6);
  std::vector<uint16_t> b(12);
  for (auto& v : a) v = static_cast<float>(rng.normal());
  for (auto& v : b) v = float_to_bf16(static_cast<float>(rng.normal()));
  write_safetensors(
      p, {{"a", DType::kF32, {2, 3}}, {"b", DType::kBF16, {3, 4}}},
      [&](size_t i, std::span<std::byte> out) {
        std::memcpy(out.data(), i == 0 ? static_cast<const void*>(a.data()) : b.data(), out.size());
      });
  return {a, b};
}

TEST(Safetensors, RoundTrip) {
  TempDir d;
  auto [a, b] = write_pair(d.path() / "m.safetensors", std::random_device{}());
  SafetensorsFile f(d.path() / "m.safetensors");
  ASSERT_EQ(f.tensors().size(), 2u);
  const TensorInfo* ia = f.find("a");
  ASSERT_NE(ia, nullptr);
  auto va = f.view(*ia);
  EXPECT_EQ(va.dtype(), DType::kF32);
  EXPECT_EQ(va.shape(), (Shape{2, 3}));
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(va.at(i), a[i]);
  auto vb = f.view(*f.find("b"));
  for (size_t i = 0; i < b.size(); ++i) EXPECT_EQ(vb.at(i), bf16_to_float(b[i]));
  EXPECT_EQ(f.find("c"), nullptr);
}

TEST(Safetensors, ShardedCheckpointAndErrorsNameFileAndTensor) {
  TempDir d;
  write_pair(d.path() / "s1.safetensors", 1);
  write_safetensors(
      d.path() / "s2.safetensors", {{"c", DType::kF16, {4}}},
      [](size_t, std::span<std::byte> out) { std::memset(out.data(), 0x3c, out.size()); });
  testing::write_file(
      d.path() / "model.safetensors.index.json",
      R"({"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}})");
  Checkpoint ck(d.path());
  EXPECT_TRUE(ck.has("c"));
  EXPECT_EQ(ck.names().size(), 3u);
  EXPECT_EQ(ck.get("c", {4}).dtype(), DType::kF16);
  try {
    ck.get("missing.weight");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("missing.weight"), std::string::npos);
  }
  try {
    ck.get("b", {4, 3});
    FAIL();
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("s1.safetensors"), std::string::npos) << m;
    EXPECT_NE(m.find("'b'"), std::string::npos) << m;
    EXPECT_NE(m.find("[3, 4]"), std::string::npos) << m;
  }
  // Index entries that lie.
  testing::write_file(d.path() / "model.safetensors.index.json",
                      R"({"weight_map": {"a": "s2.safetensors"}})");
  EXPECT_THROW(Checkpoint{d.path()}, Error);
  testing::write_file(d.path() / "model.safetensors.index.json",
                      R"({"weight_map": {"a": "../s1.safetensors"}})");
  EXPECT_THROW(Checkpoint{d.path()}, Error);
  testing::write_file(d.path() / "model.safetensors.index.json",
                      R"({"weight_map": {"a": "nope.safetensors"}})");
  EXPECT_THROW(Checkpoint{d.path()}, Error);
  testing::write_file(d.path() / "model.safetensors.index.json", R"({"weight_map": [1]})");
  EXPECT_THROW(Checkpoint{d.path()}, Error);
  testing::write_file(d.path() / "model.safetensors.index.json", "{");
  EXPECT_THROW(Checkpoint{d.path()}, Error);
}

TEST(Safetensors, UnindexedDirectory) {
  TempDir d;
  write_pair(d.path() / "model.safetensors", 2);
  EXPECT_TRUE(Checkpoint(d.path()).has("a"));
  TempDir empty;
  EXPECT_THROW(Checkpoint{empty.path()}, Error);
  EXPECT_THROW(Checkpoint{empty.path() / "absent"}, Error);
}

TEST(Safetensors, MalformedFilesAreErrors) {
  TempDir d;
  auto check = [&](const std::string& bytes, const std::string& expect) {
    const fs::path p = d.path() / "bad.safetensors";
    testing::write_file(p, bytes);
    const std::string msg = error_of(p);
    EXPECT_NE(msg.find(expect), std::string::npos) << "got: '" << msg << "' wanted: " << expect;
    EXPECT_NE(msg.find("bad.safetensors"), std::string::npos) << msg;
  };
  const std::string ok_header =
      R"({"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}})";
  check("", "shorter than");
  check("abc", "shorter than");
  check(raw_file(ok_header, 8, 1ull << 40), "exceeds");                // oversized length
  check(raw_file(ok_header, 8, ok_header.size() + 100), "runs past");  // length past EOF
  check(raw_file("{not json", 0), "not valid JSON");
  check(raw_file("[1,2]", 0), "not a JSON object");
  check(raw_file(ok_header, 4), "run past");  // truncated data
  check(raw_file(R"({"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 6]}})", 8), "'w'");
  check(raw_file(R"({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}})", 2),
        "unknown dtype");
  check(raw_file(R"({"w": {"dtype": "BF16", "shape": [-2], "data_offsets": [0, 4]}})", 4), "'w'");
  check(raw_file(R"({"w": {"dtype": "BF16", "shape": [2], "data_offsets": [4, 0]}})", 4),
        "reversed");
  check(raw_file(R"({"w": {"dtype": "BF16", "shape": [2]}})", 4), "data_offsets");
  check(
      raw_file(
          R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296, 16], "data_offsets": [0, 4]}})",
          4),
      "too large");
  check(
      raw_file(
          R"({"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}, "v": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}})",
          6),
      "overlap");
  check(raw_file(R"({"w": 5})", 0), "'w'");
}

TEST(Safetensors, UnsupportedDtypeIsAnErrorOnlyWhenUsed) {
  TempDir d;
  testing::write_file(
      d.path() / "x.safetensors",
      raw_file(R"({"ids": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}})", 8));
  SafetensorsFile f(d.path() / "x.safetensors");
  auto v = f.view(*f.find("ids"));
  EXPECT_THROW(v.dtype(), Error);
}

// Random corruptions of a valid file: every outcome is a parse or an ernie::Error.
TEST(Safetensors, MutatedHeadersNeverCrash) {
  TempDir d;
  write_pair(d.path() / "good.safetensors", 3);
  const std::string good = testing::read_file(d.path() / "good.safetensors");
  Rng rng(std::random_device{}());
  int rejected = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    std::string bytes = good;
    const int edits = 1 + static_cast<int>(rng.below(4));
    for (int e = 0; e < edits; ++e) {
      const size_t pos = rng.below(std::min<size_t>(bytes.size(), 140));
      bytes[pos] = static_cast<char>(rng.below(256));
    }
    if (rng.below(4) == 0) bytes.resize(rng.below(bytes.size()));
    try {
      auto h = parse_safetensors_header(std::as_bytes(std::span(bytes.data(), bytes.size())),
                                        bytes.size(), "mutant");
      for (const auto& t : h.tensors) ASSERT_LE(h.data_offset + t.end, bytes.size());
    } catch (const Error&) {
      ++rejected;
    }
  }
  EXPECT_GT(rejected, 0);
}

TEST(Safetensors, FuzzCorpusParsesOrFailsCleanly) {
  int n = 0;
  for (const auto& e : fs::directory_iterator(ERNIE_FUZZ_CORPUS)) {
    const std::string bytes = testing::read_file(e.path());
    try {
      parse_safetensors_header(std::as_bytes(std::span(bytes.data(), bytes.size())), bytes.size(),
                               e.path().filename().string());
    } catch (const Error&) {
    }
    ++n;
  }
  EXPECT_GT(n, 0);
}

}  // namespace
}  // namespace ernie::model
