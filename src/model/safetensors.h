// safetensors: a memory-mapped reader (one file, or a sharded checkpoint with
// model.safetensors.index.json) and a streaming writer. Every malformed input gives an
// ernie::Error naming the file and, where there is one, the tensor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/dtype.h"

namespace ernie::model {

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);

// One entry of a safetensors header. Offsets are relative to the start of the data section.
struct TensorInfo {
  std::string name;
  std::string dtype_name;      // as written in the header ("BF16", "I64", ...)
  std::optional<DType> dtype;  // set when ernie can compute with this dtype
  Shape shape;
  uint64_t begin = 0, end = 0;
  uint64_t nbytes() const { return end - begin; }
};

struct ParsedHeader {
  std::vector<TensorInfo> tensors;  // in header order
  uint64_t data_offset = 0;         // 8 + header length
};

// Largest header accepted (the safetensors format caps it at 100 MB too).
inline constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

// Parses the 8-byte length, the JSON header and checks every tensor against a file of
// `file_size` bytes, of which `bytes` holds at least the first min(file_size, 8 + header) bytes.
// `file` names the source in messages. This is the fuzzed entry point.
ParsedHeader parse_safetensors_header(std::span<const std::byte> bytes, uint64_t file_size,
                                      const std::string& file);

// A read-only tensor inside a mapped file.
struct TensorView {
  const TensorInfo* info = nullptr;
  const std::byte* data = nullptr;  // not necessarily aligned: read with memcpy
  const std::string* file = nullptr;
  DType dtype() const;  // throws if the dtype is not one ernie computes with
  const Shape& shape() const { return info->shape; }
  int64_t numel() const { return shape_numel(info->shape); }
  float at(size_t i) const { return load_as_float(data, dtype(), i); }
};

class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::filesystem::path& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return header_.tensors; }
  const TensorInfo* find(const std::string& name) const;
  TensorView view(const TensorInfo& info) const;

 private:
  std::string path_;
  const std::byte* map_ = nullptr;
  size_t map_size_ = 0;
  ParsedHeader header_;
  std::map<std::string, size_t, std::less<>> index_;
};

// All tensors of a checkpoint directory: model.safetensors.index.json (sharded) when present,
// else every *.safetensors file in the directory. Nothing is read until a tensor's bytes are.
class Checkpoint {
 public:
  explicit Checkpoint(const std::filesystem::path& dir);

  const std::filesystem::path& dir() const { return dir_; }
  bool has(const std::string& name) const { return where_.count(name) != 0; }
  std::vector<std::string> names() const;
  // Throws naming the tensor when absent.
  TensorView get(const std::string& name) const;
  // Also checks the shape; throws naming file, tensor, actual and expected shapes.
  TensorView get(const std::string& name, const Shape& expected) const;

 private:
  std::filesystem::path dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::pair<const SafetensorsFile*, const TensorInfo*>> where_;
};

// Streaming writer: tensors are declared up front, then their bytes are produced one tensor at
// a time by `fill(index, out)` so a 40 GB checkpoint never sits in memory at once.
struct TensorSpec {
  std::string name;
  DType dtype;
  Shape shape;
  uint64_t nbytes() const { return static_cast<uint64_t>(shape_numel(shape)) * dtype_size(dtype); }
};
void write_safetensors(const std::filesystem::path& path, const std::vector<TensorSpec>& specs,
                       const std::function<void(size_t, std::span<std::byte>)>& fill);

}  // namespace ernie::model
