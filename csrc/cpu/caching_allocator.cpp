// caching_allocator.h.
#include "caching_allocator.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#include <sys/mman.h>
#include <unistd.h>

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25  // Linux >= 6.1; older glibc headers lack it, older kernels refuse it
#endif

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>

namespace dsmoe::cpu {
namespace {

class CachingCpuAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kMinCached = size_t(1) << 20;
  static constexpr size_t kHugePage = size_t(2) << 20;

  // The caching instance, and one that caches nothing (cap 0: long-lived tensors).
  static CachingCpuAllocator& get() {
    static auto* instance = new CachingCpuAllocator(cache_cap());  // never destroyed: outlives every tensor
    return *instance;
  }
  static CachingCpuAllocator& uncached() {
    static auto* instance = new CachingCpuAllocator(0);
    return *instance;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, deleter_, c10::Device(c10::DeviceType::CPU)};
    const size_t align = n >= kHugePage ? kHugePage : 64;
    size_t bytes = (n + align - 1) / align * align;
    void* p = nullptr;
    if (bytes >= kMinCached && cap_ > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.lower_bound(bytes);  // the smallest cached block that fits
      if (it != free_.end() && it->first <= bytes + bytes / 8) {
        bytes = it->first;
        p = it->second.ptr;
        free_.erase(it);
        cached_ -= bytes;
      }
    }
    if (p == nullptr) {
      TORCH_CHECK(posix_memalign(&p, align, bytes) == 0, "dsmoe: out of CPU memory allocating ",
                  n, " bytes");
      if (align == kHugePage) madvise(p, bytes, MADV_HUGEPAGE);
    }
    if (bytes >= kMinCached) {
      std::lock_guard<std::mutex> lock(mu_);
      live_[p] = bytes;
    }
    return {p, p, deleter_, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return deleter_; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

 private:
  struct Block {
    void* ptr;
    uint64_t freed_at;  // for least-recently-freed eviction
  };

  explicit CachingCpuAllocator(size_t cap) : cap_(cap) {}

  static size_t cache_cap() {
    // DSMOE_CPU_GRAD_CACHE_MB: the name of the weight-gradient-only cache this replaced.
    for (const char* name : {"DSMOE_CPU_CACHE_MB", "DSMOE_CPU_GRAD_CACHE_MB"}) {
      if (const char* env = std::getenv(name)) {
        return static_cast<size_t>(std::max(0LL, std::atoll(env))) << 20;
      }
    }
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    const size_t quarter = pages > 0 && page > 0 ? size_t(pages) * size_t(page) / 4 : 0;
    return std::min(quarter, size_t(4) << 30);
  }

  static void release(void* p) {
    if (p != nullptr) get().give_back(p);
  }
  static void release_uncached(void* p) {
    if (p != nullptr) uncached().give_back(p);
  }

  void give_back(void* p) {
    std::vector<void*> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = live_.find(p);
      if (it != live_.end()) {
        const size_t bytes = it->second;
        live_.erase(it);
        if (bytes <= cap_) {  // (never with cap_ 0)
          free_.emplace(bytes, Block{p, ++clock_});
          cached_ += bytes;
          p = nullptr;
          while (cached_ > cap_) {  // drop the least recently freed (a handful of blocks)
            auto oldest = std::min_element(free_.begin(), free_.end(), [](const auto& x, const auto& y) {
              return x.second.freed_at < y.second.freed_at;
            });
            cached_ -= oldest->first;
            evicted.push_back(oldest->second.ptr);
            free_.erase(oldest);
          }
        }
      }
    }
    for (void* q : evicted) std::free(q);
    std::free(p);
  }

  std::mutex mu_;
  std::unordered_map<void*, size_t> live_;  // cacheable blocks in use, with their size
  std::multimap<size_t, Block> free_;       // cached blocks by size
  size_t cached_ = 0;
  uint64_t clock_ = 0;
  const size_t cap_;
  // Each instance's blocks go back to it (the deleter is a plain function pointer).
  const c10::DeleterFnPtr deleter_ = cap_ > 0 ? &release : &release_uncached;
};

}  // namespace

at::Tensor empty_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::detail::empty_generic(sizes, &CachingCpuAllocator::uncached(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), c10::MemoryFormat::Contiguous);
}

bool advise_huge_pages(const at::Tensor& t, bool collapse) {
  TORCH_CHECK(t.device().is_cpu(), "advise_huge_pages: expected a CPU tensor, got ", t.device());
  const size_t huge = CachingCpuAllocator::kHugePage;
  const auto begin = reinterpret_cast<uintptr_t>(t.storage().data());
  const auto end = begin + t.storage().nbytes();
  const uintptr_t lo = (begin + huge - 1) / huge * huge, hi = end / huge * huge;
  if (hi <= lo) return false;
  void* p = reinterpret_cast<void*>(lo);
  bool ok = madvise(p, hi - lo, MADV_HUGEPAGE) == 0;
  if (ok && collapse) ok = madvise(p, hi - lo, MADV_COLLAPSE) == 0;
  return ok;
}

at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::detail::empty_generic(sizes, &CachingCpuAllocator::get(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), c10::MemoryFormat::Contiguous);
}

}  // namespace dsmoe::cpu
