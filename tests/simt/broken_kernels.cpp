// Deliberately broken CUDA kernels (and their correct twins) for the SIMT emulator's own tests
// (tests/test_simt_harness.py): each bug must be reported with the kernel's name, never hang, and
// each twin must run clean. Built with the emulator runtime alone (no torch), plain and under
// ThreadSanitizer. Usage: broken_kernels CASE; exit 0 and "ok" when the launch succeeded, exit 3
// and the error on stderr when the emulator refused it.
#include "../../csrc/cuda/simt.cuh"
#include "../../csrc/cuda/vec_access.cuh"

#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using dsmoe::cuda::load_vec;
using dsmoe::cuda::Vec;

constexpr int kThreads = 64;

// Each thread writes its slot of shared memory and reads its neighbour's: needs a barrier between.
__global__ void neighbour_kernel(const int* in, int* out, bool with_barrier) {
  __shared__ int slots[kThreads];
  const int t = threadIdx.x;
  slots[t] = in[t] * 2;
  if (with_barrier) __syncthreads();
  out[t] = slots[(t + 1) % kThreads];
}

// A warp sum where only half the lanes reach the shuffle (or all of them).
__global__ void shuffle_kernel(const int* in, int* out, bool divergent) {
  const int lane = threadIdx.x % 32;
  int v = in[threadIdx.x];
  if (!divergent || lane < 16) v += __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// A barrier that threads past the first warp skip by returning early (or reach).
__global__ void early_exit_kernel(const int* in, int* out, bool early_exit) {
  __shared__ int total;
  if (threadIdx.x == 0) total = 0;
  if (early_exit && threadIdx.x >= 32) return;
  __syncthreads();
  atomicAdd(&total, in[threadIdx.x]);
  __syncthreads();
  out[threadIdx.x] = total;
}

// A 16-byte vector load at `offset` floats from a 16-byte aligned buffer.
__global__ void vector_load_kernel(const float* in, float* out, int offset) {
  const Vec<float, 4> v = load_vec<4>(in + offset + 4 * threadIdx.x);
  out[threadIdx.x] = v.v[0] + v.v[1] + v.v[2] + v.v[3];
}

// Warp shuffle with the whole warp: the reference of a butterfly sum (must give 32 * value).
__global__ void butterfly_kernel(int* out) {
  int v = 1;
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[blockIdx.x * 32 + threadIdx.x] = v;
}

template <typename Kernel, typename... Args>
void launch(const char* name, dim3 grid, dim3 block, size_t smem, Kernel kernel, Args... args) {
  dsmoe::simt::launch(name, grid, block, smem, reinterpret_cast<const void*>(kernel), [&] { kernel(args...); });
}

int run(const std::string& c) {
  std::vector<int> in(kThreads), out(kThreads, -1);
  for (int i = 0; i < kThreads; ++i) in[i] = i + 1;
  alignas(16) static float fin[4 * kThreads + 8];
  static float fout[kThreads];
  for (float& f : fin) f = 1.0f;
  if (c == "missing_barrier" || c == "barrier") {
    launch("neighbour_kernel", 1, kThreads, 0, neighbour_kernel, in.data(), out.data(), c == "barrier");
    for (int t = 0; t < kThreads; ++t) {
      if (out[t] != in[(t + 1) % kThreads] * 2) {
        std::fprintf(stderr, "wrong result: out[%d] = %d\n", t, out[t]);
        return 4;
      }
    }
  } else if (c == "divergent_shuffle" || c == "shuffle") {
    launch("shuffle_kernel", 1, kThreads, 0, shuffle_kernel, in.data(), out.data(), c == "divergent_shuffle");
  } else if (c == "early_exit_barrier" || c == "full_barrier") {
    launch("early_exit_kernel", 1, kThreads, 0, early_exit_kernel, in.data(), out.data(), c == "early_exit_barrier");
  } else if (c == "odd_vector_load" || c == "vector_load") {
    launch("vector_load_kernel", 1, kThreads, 0, vector_load_kernel, static_cast<const float*>(fin), fout,
           c == "odd_vector_load" ? 1 : 4);
  } else if (c == "too_many_threads") {
    launch("butterfly_kernel", 1, 2048, 0, butterfly_kernel, out.data());
  } else if (c == "too_much_smem") {
    launch("butterfly_kernel", 1, 32, 64 << 10, butterfly_kernel, out.data());
  } else if (c == "raised_smem_limit") {
    dsmoe::simt::set_max_dynamic_smem(reinterpret_cast<const void*>(&butterfly_kernel), 100 << 10);
    launch("butterfly_kernel", 1, 32, 64 << 10, butterfly_kernel, out.data());
  } else if (c == "butterfly") {
    launch("butterfly_kernel", 2, 32, 0, butterfly_kernel, out.data());
    for (int t = 0; t < 64; ++t) {
      if (out[t] != 32) return 4;
    }
  } else {
    std::fprintf(stderr, "unknown case %s\n", c.c_str());
    return 2;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  if (argc > 2 && std::strcmp(argv[2], "reverse") == 0) dsmoe::simt::set_reverse_schedule(true);
  try {
    const int rc = run(argv[1]);
    if (rc == 0) std::printf("ok\n");
    return rc;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 3;
  }
}
