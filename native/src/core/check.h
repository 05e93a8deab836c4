// check.h: argument checks that throw `nx::Error{code, message}`; never abort the process.
//
//   NX_CHECK(a.ndim == 2, "SHAPE", "matmul expects a 2-D weight, got " << a.ndim << " dims");
//
// Only native/src/napi catches these and turns them into JS errors with `.code`.
#pragma once
#include <sstream>

#include "../../../kernels/common.h"

#define NX_CHECK(cond, code, msg)                         \
  do {                                                    \
    if (!(cond)) {                                        \
      std::ostringstream nx_check_os_;                    \
      nx_check_os_ << msg;                                \
      throw ::nx::Error((code), nx_check_os_.str());      \
    }                                                     \
  } while (0)

#define NX_FAIL(code, msg) NX_CHECK(false, code, msg)
