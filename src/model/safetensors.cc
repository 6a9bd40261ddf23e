#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "common/check.h"

namespace ernie::model {
namespace {

using nlohmann::json;

// Element sizes of every safetensors dtype, so files holding tensors ernie does not compute
// with (an I64 buffer, say) still validate.
std::optional<size_t> element_size(const std::string& dtype) {
  static const std::map<std::string, size_t, std::less<>> kSizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E4M3", 1}, {"F8_E5M2", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
      {"U32", 4},  {"F32", 4}, {"I64", 8}, {"U64", 8},     {"F64", 8}};
  auto it = kSizes.find(dtype);
  if (it == kSizes.end()) return std::nullopt;
  return it->second;
}

bool mul_overflows(uint64_t a, uint64_t b, uint64_t& out) {
  return __builtin_mul_overflow(a, b, &out);
}

}  // namespace

std::string shape_str(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

ParsedHeader parse_safetensors_header(std::span<const std::byte> bytes, uint64_t file_size,
                                      const std::string& file) {
  auto fail = [&](const std::string& what) -> Error {
    return Error(cat(file, ": invalid safetensors file: ", what));
  };
  if (file_size < 8 || bytes.size() < 8) throw fail("shorter than the 8-byte header length");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>(bytes[i]);
  if (header_len > kMaxHeaderBytes) {
    throw fail(cat("header length ", header_len, " exceeds the ", kMaxHeaderBytes, "-byte limit"));
  }
  if (header_len > file_size - 8) {
    throw fail(cat("header length ", header_len, " runs past the end of the ", file_size,
                   "-byte file (truncated?)"));
  }
  if (bytes.size() < 8 + header_len) throw fail("header not fully available");
  const char* text = reinterpret_cast<const char*>(bytes.data() + 8);
  json j;
  try {
    j = json::parse(text, text + header_len);
  } catch (const json::exception& e) {
    throw fail(cat("header is not valid JSON: ", e.what()));
  }
  if (!j.is_object()) throw fail("header is not a JSON object");

  ParsedHeader out;
  out.data_offset = 8 + header_len;
  const uint64_t data_size = file_size - out.data_offset;
  for (auto& item : j.items()) {
    const std::string name = item.key();
    const json& entry = item.value();
    if (name == "__metadata__") {
      if (!entry.is_object()) throw fail("__metadata__ is not an object");
      continue;
    }
    auto bad = [&](const std::string& what) -> Error {
      return Error(cat(file, ": tensor '", name, "': ", what));
    };
    if (!entry.is_object()) throw bad("header entry is not an object");
    auto dt = entry.find("dtype");
    auto sh = entry.find("shape");
    auto off = entry.find("data_offsets");
    if (dt == entry.end() || !dt->is_string()) throw bad("missing or non-string 'dtype'");
    if (sh == entry.end() || !sh->is_array()) throw bad("missing or non-array 'shape'");
    if (off == entry.end() || !off->is_array() || off->size() != 2) {
      throw bad("'data_offsets' must be an array of two integers");
    }
    TensorInfo info;
    info.name = name;
    info.dtype_name = dt->get<std::string>();
    info.dtype = parse_dtype(info.dtype_name);
    auto esize = element_size(info.dtype_name);
    if (!esize) throw bad(cat("unknown dtype '", info.dtype_name, "'"));
    uint64_t numel = 1;
    for (const auto& d : *sh) {
      if (!d.is_number_unsigned())
        throw bad(cat("shape ", sh->dump(), " has a non-integer or negative dimension"));
      uint64_t v = d.get<uint64_t>();
      if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
          mul_overflows(numel, v, numel)) {
        throw bad(cat("shape ", sh->dump(), " is too large"));
      }
      info.shape.push_back(static_cast<int64_t>(v));
    }
    if (!(*off)[0].is_number_unsigned() || !(*off)[1].is_number_unsigned()) {
      throw bad("'data_offsets' must be non-negative integers");
    }
    info.begin = (*off)[0].get<uint64_t>();
    info.end = (*off)[1].get<uint64_t>();
    if (info.begin > info.end)
      throw bad(cat("data_offsets [", info.begin, ", ", info.end, "] are reversed"));
    if (info.end > data_size) {
      throw bad(cat("data_offsets [", info.begin, ", ", info.end, "] run past the ", data_size,
                    "-byte data section (file truncated?)"));
    }
    uint64_t want = 0;
    if (mul_overflows(numel, *esize, want) || want != info.end - info.begin) {
      throw bad(cat("shape ", shape_str(info.shape), " of ", info.dtype_name, " needs ", want,
                    " bytes but data_offsets span ", info.end - info.begin));
    }
    out.tensors.push_back(std::move(info));
  }
  // Tensors must not overlap (the format also forbids holes, which we tolerate).
  std::vector<const TensorInfo*> sorted;
  for (const auto& t : out.tensors) sorted.push_back(&t);
  std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  for (size_t i = 1; i < sorted.size(); ++i) {
    if (sorted[i]->begin < sorted[i - 1]->end) {
      throw Error(
          cat(file, ": tensors '", sorted[i - 1]->name, "' and '", sorted[i]->name, "' overlap"));
    }
  }
  return out;
}

DType TensorView::dtype() const {
  if (!info->dtype) {
    throw Error(cat(*file, ": tensor '", info->name, "' has dtype ", info->dtype_name,
                    ", which ernie cannot compute with (BF16, F16, F32, F8_E4M3)"));
  }
  return *info->dtype;
}

SafetensorsFile::SafetensorsFile(const std::filesystem::path& path) : path_(path.string()) {
  int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(cat(path_, ": cannot open: ", std::strerror(errno)));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(cat(path_, ": not a regular file"));
  }
  map_size_ = static_cast<size_t>(st.st_size);
  if (map_size_ > 0) {
    void* p = ::mmap(nullptr, map_size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      ::close(fd);
      throw Error(cat(path_, ": mmap failed: ", std::strerror(err)));
    }
    map_ = static_cast<const std::byte*>(p);
  }
  ::close(fd);
  try {
    header_ = parse_safetensors_header(std::span(map_, map_size_), map_size_, path_);
  } catch (...) {
    if (map_) ::munmap(const_cast<std::byte*>(map_), map_size_);
    throw;
  }
  for (size_t i = 0; i < header_.tensors.size(); ++i) index_[header_.tensors[i].name] = i;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(const_cast<std::byte*>(map_), map_size_);
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &header_.tensors[it->second];
}

TensorView SafetensorsFile::view(const TensorInfo& info) const {
  return TensorView{&info, map_ + header_.data_offset + info.begin, &path_};
}

Checkpoint::Checkpoint(const std::filesystem::path& dir) : dir_(dir) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(dir)) throw Error(cat(dir.string(), ": not a directory"));
  const fs::path index_path = dir / "model.safetensors.index.json";
  std::map<std::string, const SafetensorsFile*> by_name;
  auto open_file = [&](const std::string& fname) -> const SafetensorsFile* {
    auto it = by_name.find(fname);
    if (it != by_name.end()) return it->second;
    files_.push_back(std::make_unique<SafetensorsFile>(dir / fname));
    return by_name[fname] = files_.back().get();
  };
  if (fs::exists(index_path)) {
    std::ifstream in(index_path);
    json j;
    try {
      j = json::parse(in);
    } catch (const json::exception& e) {
      throw Error(cat(index_path.string(), ": not valid JSON: ", e.what()));
    }
    auto wm = j.is_object() ? j.find("weight_map") : j.end();
    if (wm == j.end() || !wm->is_object()) {
      throw Error(cat(index_path.string(), ": missing object 'weight_map'"));
    }
    for (auto& [name, fval] : wm->items()) {
      if (!fval.is_string())
        throw Error(cat(index_path.string(), ": weight_map['", name, "'] is not a string"));
      std::string fname = fval.get<std::string>();
      if (fname.empty() || fname.find('/') != std::string::npos || fname == "." || fname == "..") {
        throw Error(cat(index_path.string(), ": weight_map['", name, "'] names '", fname,
                        "', which is not a file in the checkpoint directory"));
      }
      const SafetensorsFile* f = open_file(fname);
      const TensorInfo* info = f->find(name);
      if (!info) {
        throw Error(cat(f->path(), ": tensor '", name, "' is listed in ",
                        index_path.filename().string(), " but missing from the file"));
      }
      where_[name] = {f, info};
    }
  } else {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(dir)) {
      if (e.path().extension() == ".safetensors") names.push_back(e.path().filename().string());
    }
    std::sort(names.begin(), names.end());
    if (names.empty())
      throw Error(
          cat(dir.string(), ": no *.safetensors files and no model.safetensors.index.json"));
    for (const auto& fname : names) {
      const SafetensorsFile* f = open_file(fname);
      for (const auto& t : f->tensors()) {
        if (where_.count(t.name)) {
          throw Error(cat(f->path(), ": tensor '", t.name, "' also appears in ",
                          where_[t.name].first->path()));
        }
        where_[t.name] = {f, &t};
      }
    }
  }
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  for (const auto& [name, _] : where_) out.push_back(name);
  return out;
}

TensorView Checkpoint::get(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end())
    throw Error(cat(dir_.string(), ": checkpoint has no tensor '", name, "'"));
  return it->second.first->view(*it->second.second);
}

TensorView Checkpoint::get(const std::string& name, const Shape& expected) const {
  TensorView v = get(name);
  if (v.shape() != expected) {
    throw Error(cat(*v.file, ": tensor '", name, "' has shape ", shape_str(v.shape()),
                    ", expected ", shape_str(expected)));
  }
  return v;
}

void write_safetensors(const std::filesystem::path& path, const std::vector<TensorSpec>& specs,
                       const std::function<void(size_t, std::span<std::byte>)>& fill) {
  json header = json::object();
  header["__metadata__"] = {{"format", "pt"}};
  uint64_t offset = 0;
  for (const auto& s : specs) {
    header[s.name] = {{"dtype", std::string(dtype_name(s.dtype))},
                      {"shape", s.shape},
                      {"data_offsets", {offset, offset + s.nbytes()}}};
    offset += s.nbytes();
  }
  std::string text = header.dump();
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');  // align the data section
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw Error(cat(path.string(), ": cannot create"));
  uint64_t n = text.size();
  char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  out.write(len, 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  std::vector<std::byte> buf;
  for (size_t i = 0; i < specs.size(); ++i) {
    buf.assign(specs[i].nbytes(), std::byte{0});
    fill(i, buf);
    out.write(reinterpret_cast<const char*>(buf.data()), static_cast<std::streamsize>(buf.size()));
  }
  out.close();
  if (!out) throw Error(cat(path.string(), ": write failed (disk full?)"));
}

}  // namespace ernie::model
