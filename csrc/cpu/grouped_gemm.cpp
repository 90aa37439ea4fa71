// CPU grouped GEMM and its weight gradient, on views of the activations (no copies, but for the
// slices the AVX512 weight gradient transposes into per-thread scratch): per part of a group,
// avx512_gemm.h's kernel (bf16 and fp32 on CPUs with AVX512-BF16 and no AMX) or a BLAS call
// (at::mm_out / oneDNN: oneDNN for bf16/fp16 and, by default, fp32; MKL for the fp32 weight
// gradient).
//
// Threads: each thread takes an equal contiguous range of the M rows (groups are contiguous in
// rows) and runs single-threaded GEMMs on the parts of the groups inside its range; a group that
// straddles two ranges is split by rows. So work is balanced to within a row whatever the group
// sizes (many small experts, or one hot expert), and no GEMM has to scale over threads on its own
// (a threaded GEMM of ~100 rows scales poorly). Measured on 2 cores (docs/cpu_performance.md):
// 1.1-1.6x faster than running the groups one after the other with threaded GEMMs.
// The weight gradient cannot split a group by rows (they are its reduction dimension), so there a
// group that straddles two ranges is split by output columns, in proportion.
//
// A part of at most kSmallGemmRows rows (decode; experts that got a few tokens) with an
// nn.Linear-layout b runs vec_kernels.h's small_gemm_nt, which streams b once instead of packing
// it; when every group has at most kColumnSplitRows rows (decode) threads split columns instead
// of rows. GEMMs on oneDNN get their shapes from a small fixed set (kRowChunk), since oneDNN
// builds a kernel per shape. Outputs come from caching_allocator.h (reused between steps).
#include "../check.h"
#include "../index_math.h"
#include "../op_checks.h"

#include "avx512_gemm.h"
#include "caching_allocator.h"
#include "vec_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <functional>
#include <string>
#include <type_traits>

#include <algorithm>
#include <vector>

namespace dsmoe {
namespace {

// Offsets must start at 0, never decrease and end at most at the row count (rows past
// expert_offsets[-1] belong to no group: permute's dropped rows); on CPU they are read.
std::vector<int64_t> read_offsets(const char* op, const at::Tensor& offsets, int64_t rows) {
  const auto off = offsets.contiguous();
  const int32_t* p = off.data_ptr<int32_t>();
  const int64_t n = off.numel();
  std::vector<int64_t> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    out[i] = p[i];
    TORCH_CHECK(i > 0 || p[0] == 0, "dsmoe.", op, ": expert_offsets[0] must be 0, got ", p[0]);
    TORCH_CHECK(i == 0 || p[i] >= p[i - 1], "dsmoe.", op,
                ": expert_offsets must be non-decreasing, got expert_offsets[", i, "]=", p[i],
                " < expert_offsets[", i - 1, "]=", p[i - 1]);
  }
  TORCH_CHECK(out[n - 1] <= rows, "dsmoe.", op, ": expert_offsets[-1]=", out[n - 1],
              " must not exceed the number of rows (", rows, ")");
  return out;
}

// Fewer rows than this per thread: fewer threads (a GEMM of a few rows is latency, not work).
constexpr int64_t kMinRowsPerThread = 8;

// oneDNN, which at::mm runs for bf16/fp16, builds and JIT-compiles a primitive for every new GEMM
// shape (~0.4 ms each, measured here), and in training the group sizes change every step: a bf16
// step of the `dsmoe train` model's layer took ~40 ms with fresh routing each step against ~25 ms
// with the same routing repeated. So for those types the shapes handed to it come from a small
// fixed set: a part's rows in equal chunks of at most kRowChunk rows, each padded up to a multiple
// of kRowQuantum (the padded rows computed into scratch and dropped). fp32 on oneDNN (below) takes
// the same buckets; MKL has no per-shape cost. (oneDNN at 256 rows was 12% slower than at 512 for
// K = N = 256, hence the large chunks.)
constexpr int64_t kRowChunk = 512;
constexpr int64_t kRowQuantum = 16;

// Parts whose rows of a take at most this many bytes run avx512_gemm.h's streamed kernel (a is
// re-read from L2 for every 64-column panel; the weight's reads overlap the arithmetic); larger
// parts pack the whole weight first. Measured at the 2B layer's expert GEMMs (114 rows, K 1280
// or 352): streamed 31-34 ms against 36-37 for pack + gemm over 63 experts.
constexpr int64_t kStreamedMaxBytes = 512 * 1024;

// Up to this many rows in every group, grouped_gemm splits columns over threads, not rows.
constexpr int64_t kColumnSplitRows = 16;

// bf16 parts of at least this many rows (every part small_gemm_nt does not take) run in fp32 where
// the CPU has no bf16 arithmetic (see grouped_gemm_cpu). Measured on the 2B layer's gate|up GEMM
// (63 experts, h 1280, I 880) on a 2-core AVX2 EPYC: 5 rows per expert 129 -> 66 ms, 28 rows 469
// -> 139 ms (2 threads).
constexpr int64_t kFp32MinRows = cpu::kSmallGemmRows + 1;

// fp32 GEMMs of the forward and the input gradient go to oneDNN's matmul rather than MKL's sgemm:
// measured single-threaded on this AMD Zen 4 machine at the expert shapes (114-512 rows, K and N
// 128-1280) 81-98 GFLOP/s against 71-87 for MKL. ATen runs oneDNN matmuls through
// at::native::mkldnn_matmul (at::mm uses it for bf16), which writes into a given output; it is
// exported by libtorch_cpu but not declared in the installed headers, so it is looked up at run
// time and a torch without it keeps MKL, as does DSMOE_CPU_FP32_GEMM=mkl. The weight gradient
// stays on MKL (no per-shape cost for its varying reduction length) unless the AVX512 kernel runs.
using MkldnnMatmulFn = void (*)(const at::Tensor& mat1, const at::Tensor& mat2,
                                const at::Tensor& result, float beta, float alpha);

MkldnnMatmulFn onednn_fp32_matmul() {
  static const MkldnnMatmulFn fn = []() -> MkldnnMatmulFn {
    if (std::string(cpu::fp32_blas_choice()) == "mkl" || !at::hasMKLDNN()) return nullptr;
    // Already loaded (this extension links it); RTLD_NOLOAD only takes a handle.
    void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    if (lib == nullptr) return nullptr;
    return reinterpret_cast<MkldnnMatmulFn>(
        dlsym(lib, "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff"));
  }();
  return fn;
}

// out = x @ bg: oneDNN for fp32 when onednn_fp32_matmul() has it, else at::mm_out.
void gemm_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& bg) {
  if (x.scalar_type() == at::kFloat && onednn_fp32_matmul() != nullptr) {
    onednn_fp32_matmul()(x, bg, out, 0.0f, 1.0f);
  } else {
    at::mm_out(out, x, bg);
  }
}

// at::mm runs bf16/fp16 on oneDNN.
bool is_reduced_float(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

int64_t round_up(int64_t n, int64_t q) { return (n + q - 1) / q * q; }

// A reduction length rounded up to one of 8 steps per power of two (<= 12.5% padding), so the
// weight gradient's GEMMs, whose reduction is a group's rows, also come in few shapes.
int64_t round_up_geometric(int64_t n) {
  int64_t pow2 = 1;
  while (pow2 * 2 <= n) pow2 *= 2;
  return round_up(n, std::max<int64_t>(kRowQuantum, pow2 / 8));
}

// t as a contiguous copy with zero rows appended up to padded rows.
at::Tensor zero_padded_rows(const at::Tensor& t, int64_t padded) {
  auto out = at::zeros({padded, t.size(1)}, t.options());
  out.narrow(0, 0, t.size(0)).copy_(t);
  return out;
}

// c[r:r+m] = a[r:r+m] @ bg through a GEMM of round_up(m, kRowQuantum) rows. The extra rows of a
// are read in place when they exist (the next group's rows; their results are dropped, so
// whatever they hold cannot reach c) and are zeros in a scratch copy past the end of a.
void mm_rows_padded(const at::Tensor& a, int64_t r, int64_t m, const at::Tensor& bg, at::Tensor& c) {
  const int64_t padded = round_up(m, kRowQuantum);
  const at::Tensor a_pad = r + padded <= a.size(0) ? a.narrow(0, r, padded)
                                                   : zero_padded_rows(a.narrow(0, r, m), padded);
  auto rows_c = c.narrow(0, r, m);
  if (padded == m) {
    gemm_out(rows_c, a_pad, bg);
  } else {
    auto c_pad = at::empty({padded, c.size(1)}, c.options());
    gemm_out(c_pad, a_pad, bg);
    rows_c.copy_(c_pad.narrow(0, 0, m));
  }
}

// Calls fn(r, m) for the chunks [r, r + m) of rows [lo, hi) that go to oneDNN: equal chunks of at
// most kRowChunk rows (each then padded to a multiple of kRowQuantum by mm_rows_padded).
template <typename Fn>
void for_each_onednn_chunk(int64_t lo, int64_t hi, const Fn& fn) {
  const int64_t pieces = (hi - lo + kRowChunk - 1) / kRowChunk;
  const int64_t chunk = round_up((hi - lo + pieces - 1) / pieces, kRowQuantum);
  for (int64_t r = lo; r < hi;) {
    const int64_t m = std::min(chunk, hi - r);
    fn(r, m);
    r += m;
  }
}

// c = a @ b, all fp32, through the fp32 BLAS in force: MKL as one GEMM, oneDNN in the shapes of
// for_each_onednn_chunk.
void fp32_gemm(at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
  if (onednn_fp32_matmul() == nullptr) {
    at::mm_out(c, a, b);
    return;
  }
  for_each_onednn_chunk(0, a.size(0), [&](int64_t r, int64_t m) { mm_rows_padded(a, r, m, b, c); });
}

// Calls fn(g, lo, hi) for each thread's part [lo, hi) of each thread's equal share of the rows
// [0, off.back()), as described at the top. The GEMMs dispatch below autograd (the op's own
// formula in dsmoe/ops.py differentiates it; mm_out refuses inputs that require grad); the guard
// is thread-local, so each worker sets it.
template <typename Fn>
void for_each_row_share(const std::vector<int64_t>& off, const Fn& fn) {
  const int64_t G = static_cast<int64_t>(off.size()) - 1;
  const int64_t rows = off[G];
  if (rows == 0) return;
  const int64_t threads =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / kMinRowsPerThread));
  const auto run_share = [&](int64_t lo, int64_t hi) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    // The group holding row lo: off[g] <= lo < off[g+1].
    int64_t g = std::upper_bound(off.begin(), off.end(), lo) - off.begin() - 1;
    for (; g < G && off[g] < hi; ++g) {
      const int64_t b = std::max(lo, off[g]), e = std::min(hi, off[g + 1]);
      if (e > b) fn(g, b, e);
    }
  };
  if (threads == 1) {
    run_share(0, rows);
    return;
  }
  at::parallel_for(0, threads, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) run_share(c * rows / threads, (c + 1) * rows / threads);
  });
}

// c[M, cols] (row stride ldc) = a[M, K] (row stride lda) @ B with avx512_gemm.h's kernel:
// streamed (B packed a panel at a time under the arithmetic) when the rows of a fit
// kStreamedMaxBytes, else the whole of B packed first. Scratch is per thread.
template <typename T>
void avx512_gemm(const cpu::Avx512Gemm<T>& kernel, const T* ap, int64_t lda, const T* bp, int64_t ldb,
                 bool b_nk, int64_t cols, int64_t K, T* cp, int64_t ldc, int64_t M) {
  thread_local std::vector<uint32_t> packed;
  if (M * K * static_cast<int64_t>(sizeof(T)) <= kStreamedMaxBytes) {
    packed.resize(cpu::panel_words<T>(K));
    kernel.gemm_streamed(ap, lda, bp, ldb, b_nk, cols, K, cp, ldc, M, packed.data());
  } else {
    packed.resize(cpu::packed_words<T>(cols, K));
    kernel.pack(bp, ldb, b_nk, cols, K, packed.data());
    kernel.gemm(ap, lda, packed.data(), cols, K, cp, ldc, M);
  }
}

// c[lo:hi, n0:n1] = a[lo:hi] @ (group g of b)[:, n0:n1] with avx512_gemm.h's kernel.
template <typename T>
void avx512_gemm_part(const cpu::Avx512Gemm<T>& kernel, const at::Tensor& a, const at::Tensor& b,
                      at::Tensor& c, int64_t g, int64_t lo, int64_t hi, bool trans_b, int64_t n0,
                      int64_t n1) {
  const int64_t K = a.size(1), N = c.size(1);
  const T* ap = a.const_data_ptr<T>() + lo * K;
  const T* bp = b.const_data_ptr<T>() + g * N * K + (trans_b ? n0 * K : n0);
  T* cp = c.mutable_data_ptr<T>() + lo * N + n0;
  avx512_gemm(kernel, ap, K, bp, trans_b ? K : N, trans_b, n1 - n0, K, cp, N, hi - lo);
}

// Rows [r0, r1) of group g's weight gradient x_g^T @ y_g (x, y: [M, R] and [M, C], the group's
// rows_g rows from row0; out [E, R, C]) with avx512_gemm.h's kernel. The kernel's a needs the
// reduction (here the group's rows) contiguous, so x_g's columns [r0, r1) are transposed into
// per-thread scratch first (1/C of the product's work); y_g is the [K, N]-layout b.
template <typename T>
void avx512_wgrad_part(const cpu::Avx512Gemm<T>& kernel, const at::Tensor& x, const at::Tensor& y,
                       at::Tensor& out, int64_t g, int64_t row0, int64_t rows_g, int64_t r0, int64_t r1) {
  const int64_t R = x.size(1), C = y.size(1);
  thread_local std::vector<T> xt;
  xt.resize(static_cast<size_t>((r1 - r0) * rows_g));
  kernel.transpose(x.const_data_ptr<T>() + row0 * R + r0, R, rows_g, r1 - r0, xt.data(), rows_g);
  avx512_gemm(kernel, xt.data(), rows_g, y.const_data_ptr<T>() + row0 * C, C, /*b_nk=*/false, C,
              rows_g, out.mutable_data_ptr<T>() + (g * R + r0) * C, C, r1 - r0);
}

// avx512_gemm.h's kernels for a dtype where they run (bf16 or fp32), else none. Every choice is
// read when made, so that a bad DSMOE_CPU_FP32_GEMM or DSMOE_CPU_BF16_GEMM is refused on every
// path.
struct OwnKernels {
  const cpu::Avx512Gemm<at::BFloat16>* bf16;
  const cpu::Avx512Gemm<float>* fp32;

  explicit OwnKernels(at::ScalarType dtype)
      : bf16(dtype == at::kBFloat16 ? cpu::bf16_gemm_kernel() : nullptr),
        fp32(dtype == at::kFloat ? cpu::fp32_gemm_kernel() : nullptr) {}

  bool any() const { return bf16 != nullptr || fp32 != nullptr; }

  // fn(the kernel that runs); only when any().
  template <typename Fn>
  void with(const Fn& fn) const {
    if (bf16 != nullptr) {
      fn(*bf16);
    } else {
      fn(*fp32);
    }
  }

  // small_gemm_nt for T when it runs here, else nullptr (a template, so that the branches for
  // other types are discarded inside AT_DISPATCH).
  template <typename T>
  auto small_gemm_nt() const -> decltype(cpu::VecKernels<T>::small_gemm_nt) {
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      return bf16 != nullptr ? bf16->small_gemm_nt : nullptr;
    } else if constexpr (std::is_same_v<T, float>) {
      return fp32 != nullptr ? fp32->small_gemm_nt : nullptr;
    } else {
      return nullptr;
    }
  }
};

at::Tensor grouped_gemm_cpu(const at::Tensor& a_in, const at::Tensor& b, const at::Tensor& offsets,
                            bool trans_b) {
  check_grouped_gemm_args(a_in, b, offsets, trans_b);
  const auto a = a_in.contiguous();
  const int64_t M = a.size(0), N = trans_b ? b.size(1) : b.size(2);
  const auto off = read_offsets("grouped_gemm", offsets, M);
  auto c = cpu::empty_cached({M, N}, a.options());
  if (M == 0 || N == 0) return c;
  if (off.back() < M) c.narrow(0, off.back(), M - off.back()).zero_();  // rows of no group
  // On AVX512-BF16 CPUs without AMX, bf16 and fp32 run avx512_gemm.h's kernel (no shape
  // buckets needed: it has no per-shape cost). Chosen before any GEMM (see OwnKernels).
  const OwnKernels kernels(a.scalar_type());
  const bool own_kernel = b.is_contiguous() && kernels.any();
  const auto own_part = [&](int64_t g, int64_t lo, int64_t hi, int64_t n0, int64_t n1) {
    kernels.with([&](const auto& kernel) {
      avx512_gemm_part(kernel, a, b, c, g, lo, hi, trans_b, n0, n1);
    });
  };
  // bf16 where the CPU has no bf16 arithmetic (no AVX512-BF16, no AMX; setting cpu_bf16_gemm):
  // oneDNN emulates it (~10 GFLOP/s per core on an AVX2 EPYC against 40-70 for fp32), so a part of
  // kFp32MinRows rows or more converts its rows of a and its slice of the weight to fp32,
  // multiplies in fp32 and rounds c once: the same products, summed in fp32 as oneDNN sums them.
  // The conversion reads the weight once more, paid back from a few rows on.
  const bool in_fp32 = a.scalar_type() == at::kBFloat16 && cpu::bf16_gemm_in_fp32();
  const auto fp32_part = [&](int64_t g, int64_t lo, int64_t hi, int64_t n0, int64_t n1) {
    const at::Tensor af = a.narrow(0, lo, hi - lo).to(at::kFloat);
    const at::Tensor bf = trans_b ? b.select(0, g).narrow(0, n0, n1 - n0).to(at::kFloat).t()
                                  : b.select(0, g).narrow(1, n0, n1 - n0).to(at::kFloat);
    at::Tensor cf = at::empty({hi - lo, n1 - n0}, af.options());
    fp32_gemm(cf, af, bf);
    c.narrow(0, lo, hi - lo).narrow(1, n0, n1 - n0).copy_(cf);
  };
  // Parts of a few rows: one pass over b's rows (see vec_kernels.h; avx512_gemm.h's where it
  // runs), when b is nn.Linear-layout.
  std::function<void(int64_t, int64_t, int64_t, int64_t, int64_t)> small;  // g, rows, columns
  if (trans_b && b.is_contiguous()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "dsmoe_grouped_gemm_small", [&] {
      if (const auto* vec = cpu::vec_kernels_or_null<scalar_t>()) {
        auto fn = vec->small_gemm_nt;
        if (const auto own = kernels.small_gemm_nt<scalar_t>()) fn = own;
        const scalar_t* ap = a.data_ptr<scalar_t>();
        const scalar_t* bp = b.data_ptr<scalar_t>();
        scalar_t* cp = c.data_ptr<scalar_t>();
        const int64_t K = a.size(1);
        small = [=](int64_t g, int64_t lo, int64_t hi, int64_t n0, int64_t n1) {
          fn(ap + lo * K, bp + (g * N + n0) * K, cp + lo * N + n0, N, hi - lo, n1 - n0, K);
        };
      }
    });
  }
  const bool on_onednn = is_reduced_float(a.scalar_type()) ||
                         (a.scalar_type() == at::kFloat && onednn_fp32_matmul() != nullptr);
  // Decode (every group a few rows): the work is reading the weights of the groups that got rows,
  // whatever their row counts, so threads split every group's output columns (each weight row is
  // read once, and every thread reads the same amount) instead of the rows. Measured on the decode
  // shape (T16 h1280 I352 E63 k7, routed experts, 2 threads): bf16 7.2 -> 6.3 ms, fp32 even.
  int64_t max_rows = 0;
  for (size_t g = 0; g + 1 < off.size(); ++g) max_rows = std::max(max_rows, off[g + 1] - off[g]);
  if (small && max_rows <= kColumnSplitRows) {
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / 16));
    at::parallel_for(0, threads, 1, [&](int64_t t_begin, int64_t t_end) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t t = t_begin; t < t_end; ++t) {
        const int64_t n0 = t * N / threads, n1 = (t + 1) * N / threads;
        for (size_t g = 0; g + 1 < off.size(); ++g) {
          const int64_t lo = off[g], hi = off[g + 1];
          if (hi == lo) continue;
          if (hi - lo <= cpu::kSmallGemmRows) {
            small(g, lo, hi, n0, n1);
          } else if (own_kernel) {
            own_part(g, lo, hi, n0, n1);
          } else if (in_fp32 && hi - lo >= kFp32MinRows) {
            fp32_part(g, lo, hi, n0, n1);
          } else {
            auto part = c.narrow(0, lo, hi - lo).narrow(1, n0, n1 - n0);
            at::mm_out(part, a.narrow(0, lo, hi - lo), b.select(0, g).narrow(0, n0, n1 - n0).t());
          }
        }
      }
    });
    return c;
  }
  for_each_row_share(off, [&](int64_t g, int64_t lo, int64_t hi) {
    if (small && hi - lo <= cpu::kSmallGemmRows) {
      small(g, lo, hi, 0, N);
      return;
    }
    if (own_kernel) {
      own_part(g, lo, hi, 0, N);
      return;
    }
    const auto bg = trans_b ? b.select(0, g).t() : b.select(0, g);
    if (!on_onednn) {  // MKL: one GEMM per part, no per-shape cost
      auto rows_c = c.narrow(0, lo, hi - lo);
      at::mm_out(rows_c, a.narrow(0, lo, hi - lo), bg);
      return;
    }
    if (in_fp32 && hi - lo >= kFp32MinRows) {
      fp32_part(g, lo, hi, 0, N);
      return;
    }
    for_each_onednn_chunk(lo, hi, [&](int64_t r, int64_t m) {
      if (small && m <= cpu::kSmallGemmRows) {
        small(g, r, r + m, 0, N);
      } else {
        mm_rows_padded(a, r, m, bg, c);
      }
    });
  });
  return c;
}

at::Tensor grouped_gemm_wgrad_cpu(const at::Tensor& a_in, const at::Tensor& grad_c_in,
                                  const at::Tensor& offsets, bool trans_b) {
  check_grouped_gemm_wgrad_args(a_in, grad_c_in, offsets);
  const auto a = a_in.contiguous();
  const auto grad_c = grad_c_in.contiguous();
  const int64_t E = offsets.size(0) - 1, K = a.size(1), N = grad_c.size(1);
  const auto off = read_offsets("grouped_gemm_wgrad", offsets, a.size(0));
  auto out = trans_b ? cpu::empty_cached({E, N, K}, a.options())
                     : cpu::empty_cached({E, K, N}, a.options());
  if (K == 0 || N == 0) return out;
  // Empty groups get a zero gradient; the others are written whole below.
  for (int64_t g = 0; g < E; ++g) {
    if (off[g + 1] == off[g]) out.select(0, g).zero_();
  }
  // avx512_gemm.h's kernel where the forward runs it: the gradient's rows are the columns of x,
  // a share of a group is a slice of them, in proportion (as below).
  const OwnKernels kernels(a.scalar_type());
  if (kernels.any()) {
    const auto& x = trans_b ? grad_c : a;  // out[g] = x_g^T @ y_g: [N, K] with trans_b, else [K, N]
    const auto& y = trans_b ? a : grad_c;
    const int64_t R = x.size(1);
    for_each_row_share(off, [&](int64_t g, int64_t lo, int64_t hi) {
      const int64_t rows_g = off[g + 1] - off[g];
      const int64_t r0 = (lo - off[g]) * R / rows_g, r1 = (hi - off[g]) * R / rows_g;
      if (r1 <= r0) return;
      kernels.with([&](const auto& kernel) {
        avx512_wgrad_part(kernel, x, y, out, g, off[g], rows_g, r0, r1);
      });
    });
    return out;
  }
  // Split over threads like the forward, but a group's share is a slice of its N output columns
  // (rows are the reduction dimension): the columns of rows [lo, hi) of group g are
  // [(lo - off[g]) * N / rows_g, (hi - off[g]) * N / rows_g), which tile [0, N) exactly.
  // For bf16/fp16 (oneDNN) the column boundaries are multiples of col_q (few distinct widths)
  // and the reduction is zero-padded to round_up_geometric rows (few lengths); see kRowChunk.
  // bf16 in fp32 where the forward does so (converted rows, fp32 BLAS, c rounded once).
  const bool in_fp32 = a.scalar_type() == at::kBFloat16 && cpu::bf16_gemm_in_fp32();
  const bool bucketed = is_reduced_float(a.scalar_type()) && !in_fp32;
  const int64_t col_q = std::max<int64_t>(kRowQuantum, round_up((N + 7) / 8, kRowQuantum));
  for_each_row_share(off, [&](int64_t g, int64_t lo, int64_t hi) {
    const int64_t rows_g = off[g + 1] - off[g];
    const auto split_col = [&](int64_t row) {
      const int64_t col = row * N / rows_g;
      if (!bucketed || row == rows_g) return col;
      return std::min(N, (col + col_q / 2) / col_q * col_q);
    };
    const int64_t n0 = split_col(lo - off[g]), n1 = split_col(hi - off[g]);
    if (n1 <= n0) return;
    auto ag = a.narrow(0, off[g], rows_g);
    auto dg = grad_c.narrow(0, off[g], rows_g).narrow(1, n0, n1 - n0);
    const int64_t reduction = bucketed ? round_up_geometric(rows_g) : rows_g;
    if (reduction != rows_g) {
      ag = zero_padded_rows(ag, reduction);
      dg = zero_padded_rows(dg, reduction);
    }
    if (in_fp32) {
      ag = ag.to(at::kFloat);
      dg = dg.to(at::kFloat);
    }
    auto og = trans_b ? out.select(0, g).narrow(0, n0, n1 - n0) : out.select(0, g).narrow(1, n0, n1 - n0);
    const auto& lhs = trans_b ? dg : ag;
    const auto& rhs = trans_b ? ag : dg;
    if (in_fp32) {
      og.copy_(at::mm(lhs.t(), rhs));
    } else {
      at::mm_out(og, lhs.t(), rhs);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dsmoe, CPU, m) {
  m.impl("grouped_gemm", &grouped_gemm_cpu);
  m.impl("grouped_gemm_wgrad", &grouped_gemm_wgrad_cpu);
}

}  // namespace dsmoe
