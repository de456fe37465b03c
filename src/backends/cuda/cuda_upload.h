// Bulk upload of host weights to the GPU (engine load): one device allocation for all tensors,
// the source bytes read by several threads into pinned staging buffers while earlier buffers
// are being copied to the device.
#pragma once

#include <cuda_runtime.h>

#include <vector>

#include "core/tensor.h"

namespace kiln::cuda {

// Copies every host tensor to the current device and returns the device tensors, in the order
// of `host` (same dtype and shape, device = Device::CUDA; a quantized weight keeps its scheme,
// and its scales and zeros come up in the same copy). All share one owner: a single
// cudaMalloc'ed block, each tensor at a 256-byte-aligned offset (laid out in source-address
// order), freed when the last of them goes away. Zero-byte tensors get a valid, aligned, non-null
// pointer. When it returns the copies are complete and no host memory is referenced any more.
//
// Reading: tensors are processed in source-address order (file order for an mmapped
// safetensors file) in chunks that reader threads fill concurrently; each filled staging buffer
// is copied to the device on stream `s` and reused only after its copy's event has completed.
// Sources inside a read-only file mapping are read from the file with pread (no page faults, no
// page-table setup to tear down at munmap); others are memcpy'd from memory. For file sources a
// prefetch thread reads the file once, sequentially, into the page cache (skipping what is
// cached already), at most 1 GiB ahead, and the reader threads follow it: one sequential stream
// is what the disk reads fastest; interleaved reads by many threads were 10-20% slower.
// Environment switches, for measurements:
//   KILN_UPLOAD_THREADS=N   reader threads (default: min(hardware threads, 8))
//   KILN_UPLOAD_PREAD=0     always memcpy from the mapping (page faults) instead of pread
//   KILN_UPLOAD_PREFETCH=0  no prefetch thread (the readers' preads hit the disk themselves)
//   KILN_UPLOAD_VERBOSE=1   one line on stderr: bytes, threads, seconds, GB/s
//
// Errors (CUDA failures, short reads) throw kiln::Error after the threads are joined, the
// in-flight copies drained and every allocation released.
std::vector<Tensor> upload_all(const std::vector<const Tensor*>& host, cudaStream_t s);

}  // namespace kiln::cuda
