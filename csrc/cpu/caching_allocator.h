// Memory for the CPU ops' large outputs (activations, gradients, weight gradients), kept for reuse
// like CUDA's caching allocator. Why: each training step (and each forward of the same shape)
// allocates the same large tensors again, and fresh memory costs a page fault per 4 KiB on first
// touch. glibc serves blocks over 32 MB (and, depending on its heap state, smaller ones) with new
// mmaps: on this VM first touch runs at ~2.3 GB/s, so the 2B layer's fp32 permute (36 MB out)
// took 13 ms instead of 1, and the weight gradient of its w_gate_up 164 ms instead of 60-90.
//
// Blocks of at least 1 MiB are rounded up (to 2 MiB multiples from 2 MiB on, put on transparent
// huge pages with madvise, a no-op where THP is off); a freed block is kept and handed to the
// next request it fits with at most 1/8 to spare. The cache holds only what freed tensors held,
// so it never raises the peak; it keeps up to DSMOE_CPU_CACHE_MB of it between uses (default a
// quarter of physical memory, at most 4 GiB; 0 turns caching off), dropping the least recently
// freed blocks first. Smaller blocks are plain aligned allocations.
#pragma once

#include <ATen/ATen.h>

namespace dsmoe::cpu {

// A contiguous CPU tensor (uninitialised) whose memory comes from the cache above.
at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options);

// Like at::empty_like for a contiguous result.
inline at::Tensor empty_cached_like(const at::Tensor& t) { return empty_cached(t.sizes(), t.options()); }

}  // namespace dsmoe::cpu
