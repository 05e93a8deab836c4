// mmap_file.h: read-only memory mapping of a file as a Storage (safetensors weights use it in place).
//
//   auto s = nx::map_file("/models/x/model.safetensors");   // Storage{mapped = true}
#pragma once
#include <memory>
#include <string>

#include "tensor.h"

namespace nx {
std::shared_ptr<Storage> map_file(const std::string& path);
// Drop the resident pages that lie wholly inside [p, p + n) of a read-only file mapping from this
// process (madvise MADV_DONTNEED): they stop counting in its RSS, and a later read maps them again from
// the page cache (or the file), so the data stays valid. Partial pages at both ends are kept.
void drop_mapped_pages(const void* p, size_t n);
}  // namespace nx
