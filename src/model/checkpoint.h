// Finding a model: a local directory, a Hugging Face id in the local Hugging Face cache
// (HF_HUB_CACHE, HF_HOME/hub or ~/.cache/huggingface/hub), or a download from the hub
// (HF_ENDPOINT, HF_TOKEN; resumable; with progress) into that cache layout.
#pragma once

#include <filesystem>
#include <string>

namespace ernie::model {

struct ResolveOptions {
  std::string revision = "main";
  std::string cache_dir;  // --download-dir; empty: the Hugging Face cache
  bool allow_download = true;
};

// Returns a directory holding config.json and the weights. Throws ernie::Error saying what was
// tried when the model cannot be found or fetched.
std::filesystem::path resolve_model(const std::string& name, const ResolveOptions& opts);

// The hub cache directory that would be used (for messages and tests).
std::filesystem::path hub_cache_dir(const std::string& override_dir);

}  // namespace ernie::model
