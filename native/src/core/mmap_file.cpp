// mmap_file.cpp: see mmap_file.h.
#include "mmap_file.h"

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace nx {

std::shared_ptr<Storage> map_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  NX_CHECK(fd >= 0, "IO", "cannot open " << path << ": " << std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    NX_FAIL("IO", "cannot stat " << path << ": " << std::strerror(e));
  }
  size_t n = static_cast<size_t>(st.st_size);
  void* p = nullptr;
  if (n > 0) {
    p = ::mmap(nullptr, n, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int e = errno;
      ::close(fd);
      NX_FAIL("IO", "cannot map " << path << ": " << std::strerror(e));
    }
  }
  ::close(fd);
  auto s = std::make_shared<Storage>();
  s->data = p;
  s->nbytes = n;
  s->mapped = true;
  memory_stats().storages++;
  memory_stats().mapped_bytes += static_cast<int64_t>(n);
  s->release = [p, n] {
    if (p) ::munmap(p, n);
    memory_stats().mapped_bytes -= static_cast<int64_t>(n);
  };
  return s;
}

void drop_mapped_pages(const void* p, size_t n) {
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(p) + page - 1) / page * page;
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + n) / page * page;
  if (hi > lo) ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);  // advisory: errors ignored
}

}  // namespace nx
