// dl.h: load a library that is not linked at build time (cuBLAS, NCCL), trying several names.
//
// open_first(names, resolve, lacks, why) dlopens each name in turn; `resolve(handle)` looks up the caller's
// functions and says whether all of them were found. Returns the first name that opened and resolved
// (the handle stays open for the process), or nullptr with `why` listing what went wrong for each name.
#pragma once

#include <dlfcn.h>

#include <initializer_list>
#include <string>

namespace nx {
namespace dl {

template <class Resolve>
const char* open_first(std::initializer_list<const char*> names, Resolve resolve, const char* lacks, std::string& why) {
  for (const char* name : names) {
    void* h = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) {
      const char* e = dlerror();
      why += std::string(why.empty() ? "" : "; ") + (e ? e : name);
      continue;
    }
    if (resolve(h)) return name;
    why += std::string(why.empty() ? "" : "; ") + name + " lacks " + lacks;
    dlclose(h);
  }
  return nullptr;
}

}  // namespace dl
}  // namespace nx
