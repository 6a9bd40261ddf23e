// Helpers shared by the tests.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include "backend/backend.h"
#include "model/ernie45.h"
#include "model/synthetic.h"

namespace ernie::testing {

// A fresh directory under $TMPDIR, removed with everything in it at scope exit.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/ernie-test-XXXXXX";
    if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

inline void write_file(const std::filesystem::path& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

inline std::string read_file(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// A loaded synthetic model on the CPU backend.
struct LoadedModel {
  std::unique_ptr<backend::Backend> be;
  std::unique_ptr<model::Ernie45> model;
};

inline LoadedModel load_model(const std::filesystem::path& dir,
                              std::unique_ptr<backend::Backend> be) {
  LoadedModel m;
  auto cfg = model::load_config(dir);
  model::Checkpoint ck(dir);
  m.be = std::move(be);
  m.model = std::make_unique<model::Ernie45>(cfg, model::load_weights(cfg, ck, *m.be), *m.be);
  return m;
}

inline LoadedModel load_cpu_model(const std::filesystem::path& dir) {
  return load_model(dir, backend::make_cpu_backend());
}

}  // namespace ernie::testing
