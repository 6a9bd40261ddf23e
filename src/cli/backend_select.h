// The backend for --device: cpu, cuda, or auto (cuda when this build has it and a GPU is
// usable, else cpu).
#pragma once

#include <memory>
#include <string>

#include "backend/backend.h"

namespace ernie::cli {

std::unique_ptr<backend::Backend> make_backend(const std::string& device);

}  // namespace ernie::cli
