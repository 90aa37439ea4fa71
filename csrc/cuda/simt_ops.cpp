// Control and statistics of the SIMT emulator library (tools/simt_build.py): how many kernel
// launches and blocks ran (CI prints them), the fiber order within blocks (tests run every kernel
// in both orders: a missing barrier changes the result), the number of worker threads, and
// poisoned outputs: while on, every new CPU tensor is filled with 0xff bytes (NaN in every float
// dtype, -1 in int32), as the CUDA tests poison the caching allocator, so an output element a
// kernel never wrote cannot pass for a right one.
#include "simt.cuh"

#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <vector>

namespace {

std::atomic<bool> g_poison{false};

struct PoisoningAllocator final : c10::Allocator {
  c10::Allocator* base;
  explicit PoisoningAllocator(c10::Allocator* b) : base(b) {}
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr p = base->allocate(n);
    if (n > 0 && g_poison.load(std::memory_order_relaxed)) std::memset(p.get(), 0xff, n);
    return p;
  }
  c10::DeleterFnPtr raw_deleter() const override { return base->raw_deleter(); }
  void copy_data(void* dest, const void* src, std::size_t count) const override { base->copy_data(dest, src, count); }
};

void set_poison(bool on) {
  static PoisoningAllocator* allocator = [] {
    auto* a = new PoisoningAllocator(c10::GetCPUAllocator());
    c10::SetCPUAllocator(a, /*priority=*/1);
    return a;
  }();
  (void)allocator;
  g_poison.store(on);
}

std::vector<int64_t> simt_stats() { return {dsmoe::simt::launch_count(), dsmoe::simt::block_count()}; }

void simt_configure(bool reverse_schedule, int64_t workers, bool poison_outputs) {
  dsmoe::simt::set_reverse_schedule(reverse_schedule);
  dsmoe::simt::set_workers(static_cast<int>(workers));
  set_poison(poison_outputs);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsmoe_simt, m) {
  // [kernel launches, blocks] executed by the emulator in this process.
  m.def("simt_stats() -> int[]", &simt_stats);
  // Fiber order (decreasing thread index when reverse_schedule), block workers (0: default),
  // and whether new CPU tensors are filled with 0xff bytes.
  m.def("simt_configure(bool reverse_schedule=False, int workers=0, bool poison_outputs=False) -> ()",
        &simt_configure);
}
