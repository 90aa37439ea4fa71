// The SIMT execution layer's runtime (see simt.cuh): fibers, the block scheduler, warp
// collectives, barriers, divergence diagnosis and launch limits. Built only into the emulator
// library (tools/simt_build.py), never into dsmoe._C; depends on the C++ standard library only,
// so the broken-kernel tests build it without torch, under ThreadSanitizer too.
#include "simt.cuh"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

// DSMOE_SIMT_TSAN: the kernels are built with -fsanitize=thread and this file without it (its
// scheduler touches fiber state from another TSan fiber by design); it only annotates.
#if defined(DSMOE_SIMT_TSAN)
#include <sanitizer/tsan_interface.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define DSMOE_SIMT_ASAN 1
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace dsmoe {
namespace simt {
namespace {

// ------------------------------------------------------------------ context switch
#if defined(__x86_64__)
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores
// the stack pointer in *save, switches to `to` and restores the same from there.
extern "C" void dsmoe_simt_switch(void** save, void* to);
asm(R"(
.text
.globl dsmoe_simt_switch
.type dsmoe_simt_switch,@function
dsmoe_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size dsmoe_simt_switch,.-dsmoe_simt_switch
.section .note.GNU-stack,"",@progbits
)");
#endif

constexpr size_t kStackBytes = size_t(256) << 10;  // per fiber; ASan frames are large

enum class State { kReady, kBarrier, kWarp, kExited };

struct Block;

struct Fiber {
  Block* block = nullptr;
  char* stack = nullptr;  // lowest usable address (a guard page lies below)
  void* sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t ctx;
#endif
#if defined(DSMOE_SIMT_TSAN)
  void* tsan = nullptr;
#endif
#if defined(DSMOE_SIMT_ASAN)
  void* asan_fake = nullptr;
#endif
  uint3 tid{0, 0, 0};
  int linear = 0;
  unsigned barriers = 0;   // __syncthreads passed
  unsigned syncwarps = 0;  // __syncwarp passed
  State state = State::kReady;
  // Where it waits, and the operands of its warp collective.
  const char* file = "";
  int line = 0;
  WarpOp op = WarpOp::kSyncWarp;
  unsigned mask = 0;
  uint64_t value = 0;
  int value_bytes = 0;
  int arg = 0;
  int width = 32;
  uint64_t result = 0;
};

struct Block {
  const char* kernel = "";
  uint3 idx{0, 0, 0};
  dim3 dim;
  dim3 grid;
  const std::function<void()>* body = nullptr;
  std::vector<Fiber>* fibers = nullptr;
  int nthreads = 0;
  void* scheduler_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t scheduler_ctx;
#endif
#if defined(DSMOE_SIMT_TSAN)
  // Addresses TSan synchronises on: the launch before the kernel, the kernel before the launch's
  // return, and barriers. Barrier n uses slot n % 2: a thread releases into slot n before it
  // waits and acquires slot n after, and nobody can release slot n again (at barrier n + 2)
  // before every thread has acquired it, so a thread's accesses after a barrier never leak to
  // another thread through it.
  void* scheduler_tsan = nullptr;
  char launch_sync = 0;
  char exit_sync = 0;
  char barrier_sync[2] = {};
  char warp_sync[32][2] = {};
#endif
#if defined(DSMOE_SIMT_ASAN)
  const void* scheduler_stack = nullptr;  // the worker thread's stack, learnt at the first switch
  size_t scheduler_stack_bytes = 0;
#endif
  std::string error;
  unsigned char* smem = nullptr;
};

thread_local Block* tl_block = nullptr;
thread_local Fiber* tl_fiber = nullptr;

std::atomic<bool> g_reverse{false};
std::atomic<int> g_workers{0};
std::atomic<int64_t> g_launches{0};
std::atomic<int64_t> g_blocks{0};
std::mutex g_limits_mutex;
std::map<const void*, size_t>& smem_limits() {
  static std::map<const void*, size_t> limits;
  return limits;
}

[[noreturn]] void fail_in_kernel(const std::string& what);

// Per worker thread: fiber stacks, reused from block to block.
struct StackPool {
  std::vector<char*> stacks;
  size_t page = size_t(sysconf(_SC_PAGESIZE));
  char* get(size_t i) {
    while (stacks.size() <= i) {
      void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("dsmoe SIMT: out of memory for fiber stacks");
      mprotect(p, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
      stacks.push_back(static_cast<char*>(p) + page);
    }
    return stacks[i];
  }
  ~StackPool() {
    for (char* s : stacks) munmap(s - page, kStackBytes + page);
  }
};

thread_local StackPool tl_stacks;
thread_local std::vector<unsigned char> tl_smem;

// Fiber -> scheduler. `exiting`: the fiber's stack is done (ASan forgets its fake frames).
void switch_to_scheduler(Fiber* f, bool exiting) {
  Block* b = f->block;
#if defined(DSMOE_SIMT_ASAN)
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f->asan_fake, b->scheduler_stack, b->scheduler_stack_bytes);
#else
  (void)exiting;
#endif
#if defined(DSMOE_SIMT_TSAN)
  __tsan_switch_to_fiber(b->scheduler_tsan, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(__x86_64__)
  dsmoe_simt_switch(&f->sp, b->scheduler_sp);
#else
  swapcontext(&f->ctx, &b->scheduler_ctx);
#endif
#if defined(DSMOE_SIMT_ASAN)
  __sanitizer_finish_switch_fiber(f->asan_fake, nullptr, nullptr);
#endif
}

void fiber_main() {
  Fiber* f = tl_fiber;
#if defined(DSMOE_SIMT_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &f->block->scheduler_stack, &f->block->scheduler_stack_bytes);
#endif
#if defined(DSMOE_SIMT_TSAN)
  __tsan_acquire(&f->block->launch_sync);  // the launch happens before the kernel
#endif
  try {
    (*f->block->body)();
  } catch (const std::exception& e) {
    if (f->block->error.empty()) f->block->error = e.what();
  } catch (...) {
    if (f->block->error.empty()) f->block->error = "unknown exception";
  }
#if defined(DSMOE_SIMT_TSAN)
  __tsan_release(&f->block->exit_sync);  // the kernel happens before the launch returns
#endif
  f->state = State::kExited;
  switch_to_scheduler(f, true);
  std::abort();  // never resumed
}

void resume(Block* b, Fiber* f) {
  tl_fiber = f;
#if defined(DSMOE_SIMT_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f->stack, kStackBytes);
#endif
#if defined(DSMOE_SIMT_TSAN)
  __tsan_switch_to_fiber(f->tsan, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(__x86_64__)
  dsmoe_simt_switch(&b->scheduler_sp, f->sp);
#else
  swapcontext(&b->scheduler_ctx, &f->ctx);
#endif
#if defined(DSMOE_SIMT_ASAN)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  tl_fiber = nullptr;
}

void init_fiber(Fiber& f, char* stack) {
  f.stack = stack;
#if defined(DSMOE_SIMT_ASAN)
  __asan_unpoison_memory_region(stack, kStackBytes);  // frames of an abandoned fiber
#endif
#if defined(__x86_64__)
  // Initial frame, as dsmoe_simt_switch leaves one: [mxcsr|fcw][r15..rbp][fiber_main][0].
  auto* top = reinterpret_cast<uint64_t*>(stack + kStackBytes);  // 16-byte aligned
  uint64_t* sp = top;
  *--sp = 0;                                           // fiber_main's return address (never used)
  *--sp = reinterpret_cast<uint64_t>(&fiber_main);     // popped by ret
  for (int r = 0; r < 6; ++r) *--sp = 0;               // rbp rbx r12 r13 r14 r15
  *--sp = uint64_t(0x1F80) | (uint64_t(0x037F) << 32);  // default MXCSR, x87 control word
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, &fiber_main, 0);
#endif
#if defined(DSMOE_SIMT_TSAN)
  if (f.tsan == nullptr) f.tsan = __tsan_create_fiber(0);
#endif
}

std::string lanes_text(unsigned bits) {
  std::ostringstream s;
  bool first = true;
  for (int l = 0; l < 32; ++l) {
    if (bits & (1u << l)) {
      s << (first ? "" : ",") << l;
      first = false;
    }
  }
  return first ? std::string("none") : s.str();
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kShflIdx: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kMatchAny: return "__match_any_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
    case WarpOp::kSyncWarp: return "__syncwarp";
  }
  return "?";
}

std::string where(const Fiber& f) {
  std::ostringstream s;
  const char* base = std::strrchr(f.file, '/');
  s << (base ? base + 1 : f.file) << ":" << f.line;
  return s.str();
}

std::string block_text(const Block& b) {
  std::ostringstream s;
  s << "block (" << b.idx.x << "," << b.idx.y << "," << b.idx.z << ")";
  return s.str();
}

[[noreturn]] void divergence(Block& b, const std::string& what) {
  throw std::runtime_error(block_text(b) + ": " + what);
}

// The lanes of warp w that exist in the block.
unsigned existing_lanes(const Block& b, int w) {
  const int first = w * 32, n = std::min(32, b.nthreads - first);
  return n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
}

// Source lane of a shuffle, or -1 when the lane keeps its own value.
int shuffle_source(const Fiber& f, int lane) {
  const int w = f.width, base = lane & ~(w - 1);
  switch (f.op) {
    case WarpOp::kShflIdx: return base + (f.arg & (w - 1));
    case WarpOp::kShflUp: return lane - base >= f.arg ? lane - f.arg : -1;
    case WarpOp::kShflDown: return lane - base + f.arg < w ? lane + f.arg : -1;
    case WarpOp::kShflXor: {
      const int src = lane ^ f.arg;
      return src >= base + w ? -1 : src;
    }
    default: return -1;
  }
}

// Resolves the warp collectives of warp w whose lanes have all arrived. Returns whether any did.
bool resolve_warp(Block& b, int w) {
  std::vector<Fiber>& fs = *b.fibers;
  const int first = w * 32;
  const unsigned exist = existing_lanes(b, w);
  bool progressed = false;
  unsigned seen = 0;
  for (int l = 0; l < 32; ++l) {
    if (!(exist & (1u << l)) || (seen & (1u << l))) continue;
    Fiber& lead = fs[first + l];
    if (lead.state != State::kWarp) continue;
    const unsigned mask = lead.mask;
    seen |= mask | (1u << l);
    if (!(mask & (1u << l))) {
      std::ostringstream hex;
      hex << std::hex << mask;
      divergence(b, std::string(op_name(lead.op)) + " at " + where(lead) + ": lane " + std::to_string(l) +
                        " calls it with mask 0x" + hex.str() + ", which does not name the lane itself");
    }
    if (mask & ~exist) {
      divergence(b, std::string(op_name(lead.op)) + " at " + where(lead) + ": mask names lanes " +
                        lanes_text(mask & ~exist) + " of warp " + std::to_string(w) + " that the block does not have");
    }
    bool all_here = true;
    for (int j = 0; j < 32; ++j) {
      if (!(mask & (1u << j))) continue;
      const Fiber& o = fs[first + j];
      if (o.state != State::kWarp) {
        all_here = false;
        continue;
      }
      const bool same_site =
          lead.op == WarpOp::kSyncWarp || (o.line == lead.line && std::strcmp(o.file, lead.file) == 0);
      if (o.op != lead.op || o.mask != lead.mask || !same_site || o.width != lead.width) {
        divergence(b, "warp " + std::to_string(w) + " diverged: lane " + std::to_string(l) + " is at " +
                          op_name(lead.op) + " (" + where(lead) + "), lane " + std::to_string(j) + " at " +
                          op_name(o.op) + " (" + where(o) + ") with the same mask");
      }
    }
    if (!all_here) continue;
    if (lead.width < 1 || lead.width > 32 || (lead.width & (lead.width - 1)) != 0) {
      divergence(b, std::string(op_name(lead.op)) + " at " + where(lead) + ": width " + std::to_string(lead.width) +
                        " is not a power of two in [1, 32]");
    }
    // Every lane of the mask is here: compute the results.
    uint64_t ballot = 0;
    for (int j = 0; j < 32; ++j) {
      if ((mask & (1u << j)) && fs[first + j].value != 0) ballot |= 1u << j;
    }
    for (int j = 0; j < 32; ++j) {
      if (!(mask & (1u << j))) continue;
      Fiber& o = fs[first + j];
      switch (o.op) {
        case WarpOp::kShflIdx:
        case WarpOp::kShflUp:
        case WarpOp::kShflDown:
        case WarpOp::kShflXor: {
          const int src = shuffle_source(o, j);
          if (src < 0) {
            o.result = o.value;
          } else if (!(mask & (1u << src))) {
            divergence(b, std::string(op_name(o.op)) + " at " + where(o) + ": lane " + std::to_string(j) +
                              " reads lane " + std::to_string(src) + ", which is not in the mask (undefined on a GPU)");
          } else {
            o.result = fs[first + src].value;
          }
          break;
        }
        case WarpOp::kBallot: o.result = ballot; break;
        case WarpOp::kAny: o.result = ballot != 0; break;
        case WarpOp::kAll: o.result = ballot == (mask & exist); break;
        case WarpOp::kMatchAny: {
          uint64_t same = 0;
          for (int q = 0; q < 32; ++q) {
            if ((mask & (1u << q)) && fs[first + q].value == o.value) same |= 1u << q;
          }
          o.result = same;
          break;
        }
        case WarpOp::kSyncWarp: o.result = 0; break;
      }
    }
    for (int j = 0; j < 32; ++j) {
      if (mask & (1u << j)) fs[first + j].state = State::kReady;
    }
    progressed = true;
  }
  return progressed;
}

// Explains why the block cannot go on, then throws.
[[noreturn]] void diagnose_deadlock(Block& b) {
  std::vector<Fiber>& fs = *b.fibers;
  // A warp collective whose lanes are elsewhere.
  for (int t = 0; t < b.nthreads; ++t) {
    const Fiber& f = fs[t];
    if (f.state != State::kWarp) continue;
    const int w = t / 32, first = w * 32;
    unsigned exited = 0, at_barrier = 0, elsewhere = 0;
    for (int j = 0; j < 32; ++j) {
      if (!(f.mask & (1u << j)) || first + j >= b.nthreads) continue;
      const Fiber& o = fs[first + j];
      if (o.state == State::kExited) exited |= 1u << j;
      else if (o.state == State::kBarrier) at_barrier |= 1u << j;
      else if (o.state != State::kWarp) elsewhere |= 1u << j;
    }
    std::string why = std::string(op_name(f.op)) + " at " + where(f) + " in warp " + std::to_string(w) +
                      " reached by a subset of its mask's lanes:";
    if (exited) why += " lanes " + lanes_text(exited) + " exited;";
    if (at_barrier) why += " lanes " + lanes_text(at_barrier) + " wait at __syncthreads;";
    if (elsewhere) why += " lanes " + lanes_text(elsewhere) + " never arrived;";
    divergence(b, why + " (a warp intrinsic under a lane-dependent branch?)");
  }
  int at_barrier = 0, exited = 0;
  const Fiber* some = nullptr;
  for (const Fiber& f : fs) {
    if (f.state == State::kBarrier) {
      ++at_barrier;
      some = &f;
    } else if (f.state == State::kExited) {
      ++exited;
    }
  }
  if (some != nullptr) {
    divergence(b, "__syncthreads at " + where(*some) + " reached by " + std::to_string(at_barrier) + " of " +
                      std::to_string(b.nthreads) + " threads (" + std::to_string(exited) +
                      " exited before it): a barrier under a thread-dependent branch?");
  }
  divergence(b, "no thread can make progress");
}

void run_block(Block& b) {
  std::vector<Fiber>& fs = *b.fibers;
  for (int t = 0; t < b.nthreads; ++t) {
    Fiber& f = fs[t];
    f.block = &b;
    f.state = State::kReady;
    f.linear = t;
    f.barriers = 0;
    f.syncwarps = 0;
    f.tid = uint3{unsigned(t % b.dim.x), unsigned((t / b.dim.x) % b.dim.y), unsigned(t / (b.dim.x * b.dim.y))};
    init_fiber(f, tl_stacks.get(t));
  }
#if defined(DSMOE_SIMT_TSAN)
  b.scheduler_tsan = __tsan_get_current_fiber();
  __tsan_release(&b.launch_sync);
#endif
  const bool reverse = g_reverse.load(std::memory_order_relaxed);
  tl_block = &b;
  for (;;) {
    bool ran = false;
    for (int i = 0; i < b.nthreads; ++i) {
      Fiber& f = fs[reverse ? b.nthreads - 1 - i : i];
      if (f.state != State::kReady) continue;
      resume(&b, &f);
      ran = true;
      if (!b.error.empty()) {
        tl_block = nullptr;
        throw std::runtime_error(block_text(b) + ", thread (" + std::to_string(f.tid.x) + "," +
                                 std::to_string(f.tid.y) + "," + std::to_string(f.tid.z) + "): " + b.error);
      }
    }
    if (ran) continue;
    bool progressed = false;
    for (int w = 0; w * 32 < b.nthreads; ++w) progressed |= resolve_warp(b, w);
    if (progressed) continue;
    int at_barrier = 0, exited = 0;
    const Fiber* first_at = nullptr;
    for (const Fiber& f : fs) {
      if (f.state == State::kBarrier) {
        if (first_at == nullptr) first_at = &f;
        if (f.line != first_at->line || std::strcmp(f.file, first_at->file) != 0) {
          divergence(b, "threads wait at different __syncthreads: " + where(*first_at) + " and " + where(f));
        }
        ++at_barrier;
      } else if (f.state == State::kExited) {
        ++exited;
      }
    }
    if (exited == b.nthreads) break;
    if (at_barrier == b.nthreads) {
      for (Fiber& f : fs) f.state = State::kReady;
      continue;
    }
    diagnose_deadlock(b);
  }
  tl_block = nullptr;
#if defined(DSMOE_SIMT_TSAN)
  __tsan_acquire(&b.exit_sync);
#endif
}

Fiber& current_fiber() {
  if (tl_fiber == nullptr) throw std::runtime_error("dsmoe SIMT: a device intrinsic was called outside a kernel");
  return *tl_fiber;
}

// Suspends the calling fiber until the scheduler makes it ready again.
void wait_here(Fiber& f) {
  switch_to_scheduler(&f, false);
}

}  // namespace

const uint3& thread_idx() { return current_fiber().tid; }
const uint3& block_idx() { return current_fiber().block->idx; }
const dim3& block_dim() { return current_fiber().block->dim; }
const dim3& grid_dim() { return current_fiber().block->grid; }
unsigned lane_id() { return unsigned(current_fiber().linear % 32); }
void* dynamic_shared() { return current_fiber().block->smem; }

void syncthreads(const char* file, int line) {
  Fiber& f = current_fiber();
  f.state = State::kBarrier;
  f.file = file;
  f.line = line;
#if defined(DSMOE_SIMT_TSAN)
  __tsan_release(&f.block->barrier_sync[f.barriers % 2]);
#endif
  wait_here(f);
#if defined(DSMOE_SIMT_TSAN)
  __tsan_acquire(&f.block->barrier_sync[f.barriers % 2]);
#endif
  ++f.barriers;
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int value_bytes, int arg, int width,
                         const char* file, int line) {
  Fiber& f = current_fiber();
  f.state = State::kWarp;
  f.op = op;
  f.mask = mask;
  f.value = value;
  f.value_bytes = value_bytes;
  f.arg = arg;
  f.width = width;
  f.file = file;
  f.line = line;
#if defined(DSMOE_SIMT_TSAN)
  // __syncwarp orders memory among its lanes (same parity rule as barriers); shuffles move values.
  if (op == WarpOp::kSyncWarp) __tsan_release(&f.block->warp_sync[f.linear / 32][f.syncwarps % 2]);
#endif
  wait_here(f);
#if defined(DSMOE_SIMT_TSAN)
  if (op == WarpOp::kSyncWarp) __tsan_acquire(&f.block->warp_sync[f.linear / 32][f.syncwarps % 2]);
#endif
  if (op == WarpOp::kSyncWarp) ++f.syncwarps;
  return f.result;
}

void fault(const char* what, const char* file, int line) {
  const char* base = std::strrchr(file, '/');
  throw std::runtime_error(std::string(what) + " at " + (base ? base + 1 : file) + ":" + std::to_string(line));
}

void set_max_dynamic_smem(const void* kernel_id, size_t bytes) {
  std::lock_guard<std::mutex> lock(g_limits_mutex);
  smem_limits()[kernel_id] = bytes;
}

void set_reverse_schedule(bool reverse) { g_reverse.store(reverse); }
bool reverse_schedule() { return g_reverse.load(); }
void set_workers(int workers) { g_workers.store(workers); }
int64_t launch_count() { return g_launches.load(); }
int64_t block_count() { return g_blocks.load(); }

void launch(const char* name, dim3 grid, dim3 block, size_t dynamic_smem, const void* kernel_id,
            const std::function<void()>& body) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  size_t limit = kDefaultDynamicSmemLimit;
  {
    std::lock_guard<std::mutex> lock(g_limits_mutex);
    auto it = smem_limits().find(kernel_id);
    if (it != smem_limits().end()) limit = it->second;
  }
  const std::string config_error = launch_config_error(grid, block, dynamic_smem, limit);
  if (!config_error.empty()) throw std::runtime_error(std::string("launch of ") + name + ": " + config_error);
  g_launches.fetch_add(1);

  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  int workers = g_workers.load();
  if (workers <= 0) {
    const char* env = std::getenv("DSMOE_SIMT_WORKERS");
    workers = env != nullptr ? std::atoi(env) : std::min(4, int(std::thread::hardware_concurrency()));
  }
  workers = int(std::max<uint64_t>(1, std::min<uint64_t>(uint64_t(std::max(workers, 1)), nblocks)));
  std::atomic<uint64_t> next{0};
  std::atomic<bool> stop{false};
  std::mutex error_mutex;
  std::string first_error;

  auto work = [&] {
    std::vector<Fiber> fibers(threads);
    Block b;
    b.kernel = name;
    b.dim = block;
    b.grid = grid;
    b.body = &body;
    b.fibers = &fibers;
    b.nthreads = int(threads);
    tl_smem.assign(std::max<size_t>(dynamic_smem, 16) + 16, 0);
    b.smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(tl_smem.data()) + 15) & ~uintptr_t(15));
    for (;;) {
      if (stop.load()) break;
      const uint64_t i = next.fetch_add(1);
      if (i >= nblocks) break;
      b.idx = uint3{unsigned(i % grid.x), unsigned((i / grid.x) % grid.y), unsigned(i / (uint64_t(grid.x) * grid.y))};
      b.error.clear();
      std::memset(b.smem, 0xff, dynamic_smem);  // uninitialised shared memory reads as NaN / -1
      try {
        run_block(b);
        g_blocks.fetch_add(1);
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (first_error.empty()) first_error = e.what();
        stop.store(true);
        break;
      }
    }
#if defined(DSMOE_SIMT_TSAN)
    for (Fiber& f : fibers) {
      if (f.tsan != nullptr) __tsan_destroy_fiber(f.tsan);
    }
#endif
  };
  if (workers == 1) {
    work();
  } else {
    std::vector<std::thread> pool;
    for (int w = 0; w < workers; ++w) pool.emplace_back(work);
    for (auto& t : pool) t.join();
  }
  if (!first_error.empty()) throw std::runtime_error(std::string("kernel ") + name + ", " + first_error);
}

}  // namespace simt
}  // namespace dsmoe
