// Kernel timeline of any CUDA program, CUDA graphs included, without Nsight Systems (which the
// device machines lack): a CUPTI activity tracer loaded by the driver through
// CUDA_INJECTION64_PATH. It records every kernel's start and end (CUPTI's concurrent-kernel
// activity, which does not serialize launches, so programmatic dependent launch still overlaps)
// and writes them as CSV to $KILN_TRACE_OUT at exit; bench/trace_summary.py turns that into the
// per-kernel time of one decode step. For measuring only; kiln never loads it.
//
//   cmake --build build --target kiln_trace      # build/libkiln_trace.so (CMakeLists.txt)
//   CUDA_INJECTION64_PATH=$PWD/build/libkiln_trace.so KILN_TRACE_OUT=trace.csv kiln bench ...
#include <cupti.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

namespace {

struct Rec {
  uint64_t start, end;
  uint32_t corr, graph, stream;
  int32_t grid, block;
  uint16_t regs;
  std::string name;
};

std::mutex g_mu;
std::vector<Rec>* g_recs = nullptr;

void CUPTIAPI buffer_requested(uint8_t** buf, size_t* size, size_t* max_records) {
  *size = size_t(8) << 20;
  *buf = static_cast<uint8_t*>(aligned_alloc(8, *size));
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buf, size_t, size_t valid) {
  CUpti_Activity* rec = nullptr;
  std::lock_guard<std::mutex> lock(g_mu);
  while (cuptiActivityGetNextRecord(buf, valid, &rec) == CUPTI_SUCCESS) {
    if (rec->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) continue;
    const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(rec);
    g_recs->push_back({k->start, k->end, k->correlationId, k->graphId, k->streamId,
                       k->gridX * k->gridY * k->gridZ, k->blockX * k->blockY * k->blockZ,
                       k->registersPerThread, k->name ? k->name : "?"});
  }
  free(buf);
}

void dump() {
  cuptiActivityFlushAll(1);
  const char* path = std::getenv("KILN_TRACE_OUT");
  FILE* f = std::fopen(path ? path : "kiln_trace.csv", "w");
  if (!f) return;
  std::lock_guard<std::mutex> lock(g_mu);
  std::fprintf(f, "start,end,corr,graph,stream,grid,block,regs,name\n");
  for (const Rec& r : *g_recs)
    std::fprintf(f, "%llu,%llu,%u,%u,%u,%d,%d,%u,%s\n", (unsigned long long)r.start,
                 (unsigned long long)r.end, r.corr, r.graph, r.stream, r.grid, r.block,
                 unsigned(r.regs), r.name.c_str());
  std::fclose(f);
  std::fprintf(stderr, "cupti_trace: %zu kernels to %s\n", g_recs->size(),
               path ? path : "kiln_trace.csv");
}

}  // namespace

extern "C" int InitializeInjection() {
  g_recs = new std::vector<Rec>();
  g_recs->reserve(1 << 20);
  if (cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS ||
      cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) != CUPTI_SUCCESS) {
    std::fprintf(stderr, "cupti_trace: CUPTI activity tracing unavailable\n");
    return 0;
  }
  std::atexit(dump);
  return 1;
}
