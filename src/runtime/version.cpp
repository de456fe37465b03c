// build_info(): kiln's version, the commit it was configured from, and the CUDA libraries it runs
// on (KILN_VERSION / KILN_COMMIT come from CMake, on this file alone so a new commit does not
// rebuild the library).
#include "graph/backend.h"
#include "kiln/kiln.h"
#include "runtime/engine_impl.h"

#ifndef KILN_VERSION
#define KILN_VERSION "unknown"
#endif
#ifndef KILN_COMMIT
#define KILN_COMMIT "unknown"
#endif

namespace kiln {

BuildInfo build_info() {
  return {KILN_VERSION, KILN_COMMIT, cuda_versions(), kEngineFormatVersion};
}

}  // namespace kiln
