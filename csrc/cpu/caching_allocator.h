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

// A contiguous CPU tensor on transparent huge pages where it spans 2 MiB or more (2 MiB-aligned,
// madvise(MADV_HUGEPAGE) before first touch; not cached when freed), for long-lived tensors that
// are streamed from memory: the expert weights. Streaming 4 KiB pages, the hardware prefetchers
// stop at every page boundary: the decode shape's routed GEMMs read their weights at ~20 GB/s on
// 4 KiB pages and ~30-40 GB/s on huge pages here.
at::Tensor empty_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options);

// Asks the kernel to back the 2 MiB-aligned part of t's memory with huge pages
// (MADV_HUGEPAGE, and with collapse also MADV_COLLAPSE, Linux >= 6.1: now, at ~3 ms per MB). A
// hint: returns whether the kernel took it; t's contents are unchanged.
bool advise_huge_pages(const at::Tensor& t, bool collapse);

}  // namespace dsmoe::cpu
