// mmap_file.h: read-only memory mapping of a file as a Storage (safetensors weights use it in place).
//
//   auto s = nx::map_file("/models/x/model.safetensors");   // Storage{mapped = true}
#pragma once
#include <memory>
#include <string>

#include "tensor.h"

namespace nx {
std::shared_ptr<Storage> map_file(const std::string& path);
}  // namespace nx
