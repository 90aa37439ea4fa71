// bench_ops: times every dsmoe operator through the c10 dispatcher (no Python, no autograd), on the
// CPU and, where a GPU and the CUDA kernels are both present, on CUDA (timed with CUDA events).
//
// For each shape and dtype it runs one routed-expert MoE layer, forward and backward, built only
// from dsmoe ops (gate -> permute -> grouped_gemm gate|up -> swiglu -> grouped_gemm down ->
// unpermute, then the backward ops in reverse), times each op call on the tensors of that layer,
// then the whole forward and forward+backward chains. Router logits are an input (the router
// GEMM and the shared experts are not part of it). Each number is the median of --iters runs
// after --warmup runs; GFLOP/s and GB/s are computed from the median (GB/s counts each tensor
// read or written once).
//
// The binary also checks that it times every op the library registers: an op it does not know
// makes it exit with status 3, so a new op cannot go unbenchmarked.
//
//   bench_ops [--shape T2048,h512,I256,E64,k6]... [--dtype fp32,bf16] [--device cpu,cuda]
//             [--iters 10] [--warmup 2] [--threads N] [--routing uniform|skewed] [--seed 0]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/Event.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/cuda.h>
#include <torch/version.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;

// ---- the ops, as typed dispatcher handles (the signatures must match csrc/registration.cpp) ----

// Every op this binary times; compared with what the library registers.
const std::vector<std::string> kTimedOps = {
    "dsmoe::gate",         "dsmoe::gate_backward",     "dsmoe::permute",
    "dsmoe::permute_backward", "dsmoe::unpermute",     "dsmoe::unpermute_backward",
    "dsmoe::grouped_gemm", "dsmoe::grouped_gemm_wgrad", "dsmoe::swiglu",
    "dsmoe::swiglu_backward", "dsmoe::pack_decode_weights", "dsmoe::moe_decode"};

template <class Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

struct Ops {
  c10::TypedOperatorHandle<std::tuple<Tensor, Tensor, Tensor, Tensor>(
      const Tensor&, int64_t, bool, const std::optional<Tensor>&, int64_t)>
      gate = op_handle<std::tuple<Tensor, Tensor, Tensor, Tensor>(
          const Tensor&, int64_t, bool, const std::optional<Tensor>&, int64_t)>("dsmoe::gate");
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool,
                                  int64_t)>
      gate_backward = op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                       bool, int64_t)>("dsmoe::gate_backward");
  c10::TypedOperatorHandle<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, int64_t)>
      permute = op_handle<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, int64_t)>(
          "dsmoe::permute");
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, int64_t)> permute_backward =
      op_handle<Tensor(const Tensor&, const Tensor&, int64_t)>("dsmoe::permute_backward");
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const Tensor&)> unpermute =
      op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&)>("dsmoe::unpermute");
  c10::TypedOperatorHandle<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                      const Tensor&)>
      unpermute_backward = op_handle<std::tuple<Tensor, Tensor>(
          const Tensor&, const Tensor&, const Tensor&, const Tensor&)>("dsmoe::unpermute_backward");
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const Tensor&, bool)> grouped_gemm =
      op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&, bool)>("dsmoe::grouped_gemm");
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const Tensor&, bool)>
      grouped_gemm_wgrad = op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&, bool)>(
          "dsmoe::grouped_gemm_wgrad");
  c10::TypedOperatorHandle<Tensor(const Tensor&)> swiglu =
      op_handle<Tensor(const Tensor&)>("dsmoe::swiglu");
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&)> swiglu_backward =
      op_handle<Tensor(const Tensor&, const Tensor&)>("dsmoe::swiglu_backward");
  c10::TypedOperatorHandle<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&)> pack_decode_weights =
      op_handle<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&)>("dsmoe::pack_decode_weights");
  c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                  const std::optional<Tensor>&, const std::optional<Tensor>&)>
      moe_decode = op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                    const std::optional<Tensor>&, const std::optional<Tensor>&)>("dsmoe::moe_decode");
};

// ---- command line ----------------------------------------------------------------------------

struct Shape {
  int64_t T = 0, h = 0, I = 0, E = 0, k = 0;
  std::string str() const {
    std::ostringstream s;
    s << "T" << T << " h" << h << " I" << I << " E" << E << " k" << k;
    return s.str();
  }
};

struct Options {
  std::vector<Shape> shapes;
  std::vector<at::ScalarType> dtypes = {at::kFloat, at::kBFloat16};
  std::vector<c10::DeviceType> devices;  // empty: CPU, plus CUDA when usable
  int iters = 10;
  int warmup = 2;
  int threads = 0;  // 0: torch's default
  bool skewed = false;
  uint64_t seed = 0;
};

// The CPU shapes of DESIGN.md (and a decode step of the 2B layer).
std::vector<Shape> default_shapes() {
  return {{2048, 512, 256, 64, 6}, {1024, 1280, 352, 63, 7}, {2048, 512, 1024, 16, 2},
          {16, 1280, 352, 63, 7}};
}

[[noreturn]] void usage_error(const std::string& message) {
  std::cerr << "bench_ops: " << message << "\n"
            << "usage: bench_ops [--shape T2048,h512,I256,E64,k6]... [--dtype fp32,bf16,fp16,fp64]\n"
            << "                 [--device cpu,cuda] [--iters N] [--warmup N] [--threads N]\n"
            << "                 [--routing uniform|skewed] [--seed N]\n";
  std::exit(2);
}

std::vector<std::string> split(const std::string& text, const std::string& separators) {
  std::vector<std::string> parts;
  std::string current;
  for (char c : text) {
    if (separators.find(c) != std::string::npos) {
      if (!current.empty()) parts.push_back(current);
      current.clear();
    } else {
      current += c;
    }
  }
  if (!current.empty()) parts.push_back(current);
  return parts;
}

int64_t parse_int(const std::string& text, const std::string& what, int64_t min_value) {
  size_t used = 0;
  long long value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    usage_error(what + " must be an integer, got '" + text + "'");
  }
  if (used != text.size()) usage_error(what + " must be an integer, got '" + text + "'");
  if (value < min_value) usage_error(what + " must be >= " + std::to_string(min_value) + ", got " + text);
  return value;
}

// "T2048,h512,I256,E64,k6" (any order, ',' or ':' between fields, letters case-insensitive).
Shape parse_shape(const std::string& spec) {
  Shape shape;
  for (const auto& field : split(spec, ",:")) {
    const char key = static_cast<char>(std::tolower(static_cast<unsigned char>(field[0])));
    const int64_t value = parse_int(field.substr(1), "--shape field '" + field + "'", 1);
    switch (key) {
      case 't': shape.T = value; break;
      case 'h': shape.h = value; break;
      case 'i': shape.I = value; break;
      case 'e': shape.E = value; break;
      case 'k': shape.k = value; break;
      default: usage_error("--shape field '" + field + "' must start with T, h, I, E or k");
    }
  }
  if (!shape.T || !shape.h || !shape.I || !shape.E || !shape.k)
    usage_error("--shape '" + spec + "' must give all of T, h, I, E and k, e.g. T2048,h512,I256,E64,k6");
  if (shape.k > shape.E) usage_error("--shape '" + spec + "': k must be <= E");
  return shape;
}

at::ScalarType parse_dtype(const std::string& name) {
  if (name == "fp32" || name == "float32" || name == "float") return at::kFloat;
  if (name == "bf16" || name == "bfloat16") return at::kBFloat16;
  if (name == "fp16" || name == "float16" || name == "half") return at::kHalf;
  if (name == "fp64" || name == "float64" || name == "double") return at::kDouble;
  usage_error("--dtype must be fp32, bf16, fp16 or fp64, got '" + name + "'");
}

Options parse_args(int argc, char** argv) {
  Options options;
  auto value_of = [&](int& i) -> std::string {
    if (i + 1 >= argc) usage_error(std::string(argv[i]) + " needs a value");
    return argv[++i];
  };
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      usage_error("times every dsmoe op through the dispatcher");
    } else if (arg == "--shape") {
      for (const auto& spec : split(value_of(i), ";")) options.shapes.push_back(parse_shape(spec));
    } else if (arg == "--dtype") {
      options.dtypes.clear();
      for (const auto& name : split(value_of(i), ",")) options.dtypes.push_back(parse_dtype(name));
    } else if (arg == "--device") {
      for (const auto& name : split(value_of(i), ",")) {
        if (name == "cpu") options.devices.push_back(c10::DeviceType::CPU);
        else if (name == "cuda") options.devices.push_back(c10::DeviceType::CUDA);
        else usage_error("--device must be cpu or cuda, got '" + name + "'");
      }
    } else if (arg == "--iters") {
      options.iters = static_cast<int>(parse_int(value_of(i), "--iters", 1));
    } else if (arg == "--warmup") {
      options.warmup = static_cast<int>(parse_int(value_of(i), "--warmup", 0));
    } else if (arg == "--threads") {
      options.threads = static_cast<int>(parse_int(value_of(i), "--threads", 1));
    } else if (arg == "--routing") {
      const std::string routing = value_of(i);
      if (routing != "uniform" && routing != "skewed")
        usage_error("--routing must be uniform or skewed, got '" + routing + "'");
      options.skewed = routing == "skewed";
    } else if (arg == "--seed") {
      options.seed = static_cast<uint64_t>(parse_int(value_of(i), "--seed", 0));
    } else {
      usage_error("unknown argument '" + arg + "'");
    }
  }
  if (options.shapes.empty()) options.shapes = default_shapes();
  return options;
}

// ---- timing ----------------------------------------------------------------------------------

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

struct Timing {
  double median_ms = 0, min_ms = 0;
};

// CPU: wall clock around each call (the CPU kernels are synchronous). CUDA: events on the
// current stream around each call, waited for after each run.
Timing time_it(c10::DeviceType device, const std::function<void()>& fn, int warmup, int iters) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> ms;
  ms.reserve(iters);
  if (device == c10::DeviceType::CUDA) {
    const auto* guard = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    const c10::Stream stream = guard->getStream(c10::Device(c10::DeviceType::CUDA, 0));
    c10::Event start(c10::DeviceType::CUDA, c10::EventFlag::BACKEND_DEFAULT);
    c10::Event stop(c10::DeviceType::CUDA, c10::EventFlag::BACKEND_DEFAULT);
    guard->synchronizeStream(stream);
    for (int i = 0; i < iters; ++i) {
      start.record(stream);
      fn();
      stop.record(stream);
      stop.synchronize();
      ms.push_back(start.elapsedTime(stop));
    }
  } else {
    for (int i = 0; i < iters; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      fn();
      const auto t1 = std::chrono::steady_clock::now();
      ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    }
  }
  return {median(ms), *std::min_element(ms.begin(), ms.end())};
}

// ---- the table -------------------------------------------------------------------------------

struct Row {
  std::string device, dtype, shape, op, what;
  Timing timing;
  double flops = 0, bytes = 0;
};

void print_header() {
  std::printf("%-5s %-5s %-28s %-26s %-16s %11s %11s %10s %9s\n", "dev", "dtype", "shape", "op",
              "case", "median_ms", "min_ms", "GFLOP/s", "GB/s");
}

void print_row(const Row& row) {
  char flops[32] = "-", bandwidth[32] = "-";
  const double seconds = row.timing.median_ms * 1e-3;
  if (row.flops > 0 && seconds > 0) std::snprintf(flops, sizeof flops, "%.4g", row.flops / seconds * 1e-9);
  if (row.bytes > 0 && seconds > 0) std::snprintf(bandwidth, sizeof bandwidth, "%.4g", row.bytes / seconds * 1e-9);
  std::printf("%-5s %-5s %-28s %-26s %-16s %11.4f %11.4f %10s %9s\n", row.device.c_str(),
              row.dtype.c_str(), row.shape.c_str(), row.op.c_str(), row.what.c_str(),
              row.timing.median_ms, row.timing.min_ms, flops, bandwidth);
  std::fflush(stdout);
}

std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "fp32";
    case at::kBFloat16: return "bf16";
    case at::kHalf: return "fp16";
    case at::kDouble: return "fp64";
    default: return c10::toString(dtype);
  }
}

std::string cpu_name() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(colon + 2);
    }
  }
  return "unknown CPU";
}

// ---- one layer of ops at one shape, dtype and device -----------------------------------------

void bench_layer(const Ops& ops, const Shape& s, at::ScalarType dtype, c10::DeviceType device,
                 const Options& options) {
  const auto on = at::TensorOptions().device(device);
  const auto act = on.dtype(dtype);
  const int64_t T = s.T, h = s.h, I = s.I, E = s.E, k = s.k, M = T * k;
  const double es = static_cast<double>(c10::elementSize(dtype));

  // Inputs: unit-variance activations, weights scaled by 1/sqrt(fan_in) as nn.Linear would.
  auto logits = at::randn({T, E}, on.dtype(at::kFloat));
  if (options.skewed) logits.select(1, 0).add_(4.0);  // one hot expert takes most tokens
  logits = logits.to(dtype);
  const auto x = at::randn({T, h}, act);
  const auto w_gate_up = at::randn({E, 2 * I, h}, act).mul_(1.0 / std::sqrt(double(h)));
  const auto w_down = at::randn({E, h, I}, act).mul_(1.0 / std::sqrt(double(I)));
  const auto grad_y = at::randn({T, h}, act);

  // One forward and backward pass gives every op its real inputs.
  auto [weights, expert_ids, tokens_per_expert, score_sums] =
      ops.gate.call(logits, k, false, std::nullopt, 1);
  auto [x_perm, row_map, offsets] = ops.permute.call(x, expert_ids, E);
  const auto gate_up = ops.grouped_gemm.call(x_perm, w_gate_up, offsets, true);  // [M, 2I]
  const auto hidden = ops.swiglu.call(gate_up);                                  // [M, I]
  const auto y_perm = ops.grouped_gemm.call(hidden, w_down, offsets, true);      // [M, h]
  const auto y = ops.unpermute.call(y_perm, row_map, weights);                   // [T, h]
  auto [grad_y_perm, grad_weights] = ops.unpermute_backward.call(grad_y, y_perm, row_map, weights);
  const auto grad_hidden = ops.grouped_gemm.call(grad_y_perm, w_down, offsets, false);  // [M, I]
  const auto grad_gate_up = ops.swiglu_backward.call(grad_hidden, gate_up);             // [M, 2I]
  const auto grad_x_perm = ops.grouped_gemm.call(grad_gate_up, w_gate_up, offsets, false);  // [M, h]
  const auto grad_score_sums = at::zeros_like(score_sums);

  const std::string dev = device == c10::DeviceType::CUDA ? "cuda" : "cpu";
  const std::string dt = dtype_name(dtype);
  const std::string shape = s.str() + (options.skewed ? " skew" : "");
  const double idx = 4;  // bytes of an int32 index
  auto run = [&](const std::string& op, const std::string& what, double flops, double bytes,
                 const std::function<void()>& fn) {
    Row row{dev, dt, shape, op, what, time_it(device, fn, options.warmup, options.iters), flops, bytes};
    print_row(row);
  };
  const double gemm_up = 2.0 * M * h * 2 * I, gemm_down = 2.0 * M * I * h;

  run("dsmoe::gate", "fwd", 0, T * E * es + T * k * (4 + idx) + 2.0 * E * 4,
      [&] { ops.gate.call(logits, k, false, std::nullopt, 1); });
  run("dsmoe::permute", "fwd", 0, T * h * es + T * k * idx + M * h * es + M * idx,
      [&] { ops.permute.call(x, expert_ids, E); });
  run("dsmoe::grouped_gemm", "gate_up fwd", gemm_up, (M * h + E * 2.0 * I * h + M * 2.0 * I) * es,
      [&] { ops.grouped_gemm.call(x_perm, w_gate_up, offsets, true); });
  run("dsmoe::swiglu", "fwd", 0, M * 3.0 * I * es, [&] { ops.swiglu.call(gate_up); });
  run("dsmoe::grouped_gemm", "down fwd", gemm_down, (M * I + E * 1.0 * h * I + M * h) * es,
      [&] { ops.grouped_gemm.call(hidden, w_down, offsets, true); });
  run("dsmoe::unpermute", "fwd", 0, M * h * es + M * idx + T * k * 4.0 + T * h * es,
      [&] { ops.unpermute.call(y_perm, row_map, weights); });
  run("dsmoe::unpermute_backward", "bwd", 0, T * h * es + 2.0 * M * h * es + M * idx + 2.0 * T * k * 4,
      [&] { ops.unpermute_backward.call(grad_y, y_perm, row_map, weights); });
  run("dsmoe::grouped_gemm", "down dgrad", gemm_down, (M * h + E * 1.0 * h * I + M * I) * es,
      [&] { ops.grouped_gemm.call(grad_y_perm, w_down, offsets, false); });
  run("dsmoe::grouped_gemm_wgrad", "down wgrad", gemm_down, (M * I + M * h + E * 1.0 * h * I) * es,
      [&] { ops.grouped_gemm_wgrad.call(hidden, grad_y_perm, offsets, true); });
  run("dsmoe::swiglu_backward", "bwd", 0, (M * I + 2.0 * M * 2 * I) * es,
      [&] { ops.swiglu_backward.call(grad_hidden, gate_up); });
  run("dsmoe::grouped_gemm", "gate_up dgrad", gemm_up, (M * 2.0 * I + E * 2.0 * I * h + M * h) * es,
      [&] { ops.grouped_gemm.call(grad_gate_up, w_gate_up, offsets, false); });
  run("dsmoe::grouped_gemm_wgrad", "gate_up wgrad", gemm_up, (M * h + M * 2.0 * I + E * 2.0 * I * h) * es,
      [&] { ops.grouped_gemm_wgrad.call(x_perm, grad_gate_up, offsets, true); });
  run("dsmoe::permute_backward", "bwd", 0, M * h * es + M * idx + T * h * es,
      [&] { ops.permute_backward.call(grad_x_perm, row_map, k); });
  run("dsmoe::gate_backward", "bwd", 0, 2.0 * T * E * es + T * k * (4 + idx) + E * 4.0,
      [&] { ops.gate_backward.call(grad_weights, grad_score_sums, logits, expert_ids, false, 1); });
  // The CPU decode path (inference, fp32/bf16/fp16): routed experts on weights packed once.
  if (device == c10::DeviceType::CPU && dtype != at::kDouble) {
    const double weight_bytes = E * 3.0 * I * h * es;
    run("dsmoe::pack_decode_weights", "pack", 0, 2 * weight_bytes,
        [&] { ops.pack_decode_weights.call(w_gate_up, w_down); });
    auto [packed_gate_up, packed_down] = ops.pack_decode_weights.call(w_gate_up, w_down);
    run("dsmoe::moe_decode", "fwd", gemm_up + gemm_down, weight_bytes + 2.0 * T * h * es, [&] {
      ops.moe_decode.call(x, weights, expert_ids, packed_gate_up, packed_down, std::nullopt, std::nullopt);
    });
  }

  auto forward = [&] {
    auto [w, ids, counts, sums] = ops.gate.call(logits, k, false, std::nullopt, 1);
    auto [xp, rows, offs] = ops.permute.call(x, ids, E);
    auto gu = ops.grouped_gemm.call(xp, w_gate_up, offs, true);
    auto hid = ops.swiglu.call(gu);
    auto yp = ops.grouped_gemm.call(hid, w_down, offs, true);
    return std::make_tuple(ops.unpermute.call(yp, rows, w), w, ids, xp, rows, offs, gu, hid, yp);
  };
  run("layer", "fwd", gemm_up + gemm_down, 0, [&] { forward(); });
  run("layer", "fwd+bwd", 3 * (gemm_up + gemm_down), 0, [&] {
    auto [out, w, ids, xp, rows, offs, gu, hid, yp] = forward();
    auto [g_yp, g_w] = ops.unpermute_backward.call(grad_y, yp, rows, w);
    auto g_hid = ops.grouped_gemm.call(g_yp, w_down, offs, false);
    auto g_w_down = ops.grouped_gemm_wgrad.call(hid, g_yp, offs, true);
    auto g_gu = ops.swiglu_backward.call(g_hid, gu);
    auto g_xp = ops.grouped_gemm.call(g_gu, w_gate_up, offs, false);
    auto g_w_gate_up = ops.grouped_gemm_wgrad.call(xp, g_gu, offs, true);
    auto g_x = ops.permute_backward.call(g_xp, rows, k);
    auto g_logits = ops.gate_backward.call(g_w, grad_score_sums, logits, ids, false, 1);
  });
}

// dsmoe ops registered in this process (by the linked op library).
std::vector<std::string> registered_dsmoe_ops() {
  std::vector<std::string> names;
  for (const auto& name : c10::Dispatcher::singleton().getAllOpNames()) {
    if (name.name.rfind("dsmoe::", 0) == 0 && name.overload_name.empty()) names.push_back(name.name);
  }
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse_args(argc, argv);
  if (options.threads > 0) at::set_num_threads(options.threads);

  const auto registered = registered_dsmoe_ops();
  if (registered.empty()) {
    std::cerr << "bench_ops: no dsmoe op is registered; libdsmoe_ops was not loaded (link it with "
                 "-Wl,--no-as-needed)\n";
    return 1;
  }
  std::vector<std::string> untimed;
  for (const auto& name : registered) {
    if (std::find(kTimedOps.begin(), kTimedOps.end(), name) == kTimedOps.end()) untimed.push_back(name);
  }
  const Ops ops;  // throws, naming the op, if a schema is missing or its signature changed

  // CUDA rows need a GPU and a CUDA kernel for every op.
  const bool gpu = torch::cuda::is_available();
  std::vector<std::string> no_cuda_kernel;
  for (const auto& name : kTimedOps) {
    const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "");
    if (!handle.hasKernelForDispatchKey(c10::DispatchKey::CUDA)) no_cuda_kernel.push_back(name);
  }
  std::vector<c10::DeviceType> devices = options.devices;
  if (devices.empty()) {
    devices.push_back(c10::DeviceType::CPU);
    if (gpu && no_cuda_kernel.empty()) devices.push_back(c10::DeviceType::CUDA);
  }
  for (auto device : devices) {
    if (device != c10::DeviceType::CUDA) continue;
    if (!gpu) {
      std::cerr << "bench_ops: --device cuda, but no GPU is visible\n";
      return 2;
    }
    if (!no_cuda_kernel.empty()) {
      std::cerr << "bench_ops: --device cuda, but these ops have no CUDA kernel in this build:";
      for (const auto& name : no_cuda_kernel) std::cerr << " " << name;
      std::cerr << "\n";
      return 2;
    }
  }

  std::printf("# dsmoe bench_ops: torch %s, %d threads, CPU: %s\n", TORCH_VERSION,
              at::get_num_threads(), cpu_name().c_str());
  std::string cuda_kernels = "all ops";
  if (no_cuda_kernel.size() == kTimedOps.size()) {
    cuda_kernels = "not built";
  } else if (!no_cuda_kernel.empty()) {
    cuda_kernels = "all ops but";
    for (const auto& name : no_cuda_kernel) cuda_kernels += " " + name;
  }
  std::printf("# GPU: %s; CUDA kernels: %s\n", gpu ? "present" : "none", cuda_kernels.c_str());
  std::printf("# median of %d runs after %d warm-up runs; routing %s; routed experts only\n",
              options.iters, options.warmup, options.skewed ? "skewed (one hot expert)" : "uniform");
  print_header();
  for (auto device : devices) {
    for (const auto& shape : options.shapes) {
      for (auto dtype : options.dtypes) {
        at::manual_seed(options.seed);
        bench_layer(ops, shape, dtype, device, options);
      }
    }
  }

  if (!untimed.empty()) {
    std::cerr << "bench_ops: the library registers ops this benchmark does not time:";
    for (const auto& name : untimed) std::cerr << " " << name;
    std::cerr << "\n";
    return 3;
  }
  return 0;
}
