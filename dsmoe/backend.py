"""How the model's math runs: the one place that chooses kernels, keeps derived weight forms and
places weights in memory. The model's modules (:mod:`dsmoe.layers`) say *what* they compute and
hand each step to a backend; nothing here changes the function computed, only how.

Two backends, chosen per MoE layer by its ``impl`` string:

- ``"dsmoe"`` (:class:`DsmoeBackend`): the fused dsmoe ops; on CPU the dense MLP's gate|up
  product runs as one GEMM over a stacked weight that is a view of the two parameters' shared
  storage (no copy), and expert weights live on transparent huge pages.
- ``"reference"`` (:class:`ReferenceBackend`): the seeds' plain PyTorch.

Run-time settings (kernel choices, huge pages, thresholds) are process-wide: each starts from its
environment variable, read once, and :func:`set_backend` / :func:`use_backend` change them;
:func:`backend_settings` returns what is in force (``dsmoe info`` prints it)::

    dsmoe.set_backend(cpu_fp32_gemm="mkl")
    with dsmoe.use_backend(huge_pages=False):
        model = DeepSeekMoEForCausalLM(config)
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import threading
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import decode, ops, reference
from ._ext import _C, empty_huge_pages

# ---------------------------------------------------------------- settings

# Settings the compiled kernels read (csrc/settings.h): name -> (environment variable, values).
_KERNEL_SETTINGS = {
    "cpu_bf16_gemm": ("DSMOE_CPU_BF16_GEMM", ("auto", "onednn", "avx512", "fp32")),
    "cpu_fp32_gemm": ("DSMOE_CPU_FP32_GEMM", ("auto", "avx512", "onednn", "mkl")),
    "cuda_gemm_path": ("DSMOE_GROUPED_GEMM_PATH", ("auto", "sm90", "sm80", "simt")),
    "cuda_gemm_tile": ("DSMOE_GROUPED_GEMM_TILE", ("auto", "wide", "narrow")),
    "cuda_gemm_verbose": ("DSMOE_GROUPED_GEMM_VERBOSE", (False, True)),
}


@dataclasses.dataclass(frozen=True)
class BackendSettings:
    """The run-time choices in force. Kernel choices (``cpu_*``, ``cuda_*``; ``"auto"`` = the
    measured default) select among implementations of the same function:

    - ``cpu_bf16_gemm``: ``auto`` | ``onednn`` | ``avx512`` (dsmoe's AVX512-BF16 kernel) | ``fp32``
      (grouped GEMM parts of 8 rows or more converted to fp32 and run on the fp32 BLAS; ``auto``
      takes it on CPUs without AVX512-BF16 and AMX, where oneDNN emulates bf16)
    - ``cpu_fp32_gemm``: ``auto`` | ``avx512`` | ``onednn`` | ``mkl``
    - ``cuda_gemm_path``: ``auto`` | ``sm90`` | ``sm80`` | ``simt`` (CUDA-core kernels)
    - ``cuda_gemm_tile``: ``auto`` | ``wide`` | ``narrow`` (Hopper tile shape)
    - ``cuda_gemm_verbose``: print each CUDA grouped GEMM's path on stderr
    - ``huge_pages``: CPU expert weights of 2 MiB or more on transparent huge pages
      (``DSMOE_CPU_HUGE_PAGES``, default on): when made and when converted, never moved later
    - ``cpu_decode``: the MoE layer's CPU decode path (``dsmoe.ops.moe_decode`` on packed weights)
      for at most 64 tokens in inference (``DSMOE_CPU_DECODE``, default on)
    - ``dense_own_gemm_min_rows``: rows from which a CPU dense MLP runs on dsmoe's own GEMM
      kernel where that kernel runs (AVX512 CPUs); bf16 on a CPU without bf16 arithmetic runs
      there (in fp32, see ``cpu_bf16_gemm``) from ``BF16_IN_FP32_MIN_ROWS`` rows or this, the
      fewer
    """

    cpu_bf16_gemm: str = "auto"
    cpu_fp32_gemm: str = "auto"
    cuda_gemm_path: str = "auto"
    cuda_gemm_tile: str = "auto"
    cuda_gemm_verbose: bool = False
    huge_pages: bool = True
    cpu_decode: bool = True
    dense_own_gemm_min_rows: int = 256


# From this many rows a bf16 dense MLP on a CPU without bf16 arithmetic runs as dsmoe grouped
# GEMMs in fp32 (cpu_bf16_gemm "fp32") rather than nn.Linear, which oneDNN emulates: on a 2-core
# AVX2 EPYC a [rows, 1280] x [1280, 3840] bf16 product took 8.1 / 67.6 ms through nn.Linear at 8 /
# 64 rows against 7.1 / 22.6 ms converted to fp32.
BF16_IN_FP32_MIN_ROWS = 16

_lock = threading.Lock()
_python_settings: Optional[Dict[str, object]] = None  # read from the environment on first use
_generation = 0  # bumped on every change: caches of derived choices compare it


def _python_defaults() -> Dict[str, object]:
    global _python_settings
    if _python_settings is None:
        _python_settings = {
            "huge_pages": os.environ.get("DSMOE_CPU_HUGE_PAGES", "1") != "0",
            "cpu_decode": os.environ.get("DSMOE_CPU_DECODE", "1") != "0",
            "dense_own_gemm_min_rows": BackendSettings.dense_own_gemm_min_rows,
        }
    return _python_settings


def backend_settings() -> BackendSettings:
    """The settings in force (environment variables are read on the first call)."""
    kernel = dict(_C.get_settings())
    values = {name: kernel[name] for name in _KERNEL_SETTINGS}
    values["cuda_gemm_verbose"] = values["cuda_gemm_verbose"] == "1"
    values.update(_python_defaults())
    return BackendSettings(**values)


def _check_value(name: str, value) -> object:
    if name in _KERNEL_SETTINGS:
        allowed = _KERNEL_SETTINGS[name][1]
        if isinstance(allowed[0], bool):
            if not isinstance(value, bool):
                raise TypeError(f"set_backend: {name} must be a bool, got {value!r}")
        elif value not in allowed:
            raise ValueError(f"set_backend: {name} must be one of {allowed}, got {value!r}")
    elif name in ("huge_pages", "cpu_decode"):
        if not isinstance(value, bool):
            raise TypeError(f"set_backend: {name} must be a bool, got {value!r}")
    elif name == "dense_own_gemm_min_rows":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"set_backend: dense_own_gemm_min_rows must be an int >= 0, got {value!r}")
    else:
        names = ", ".join(f.name for f in dataclasses.fields(BackendSettings))
        raise TypeError(f"set_backend: unknown setting {name!r}; the settings are {names}")
    return value


def set_backend(**settings) -> BackendSettings:
    """Changes run-time settings (see :class:`BackendSettings`) for the whole process and
    returns the settings that were in force before. Every value is checked before any is set; a
    GEMM kernel this CPU cannot run (``avx512`` without AVX512-BF16) is refused here."""
    global _generation
    for name, value in settings.items():
        _check_value(name, value)
    with _lock:
        before = backend_settings()
        try:
            for name, value in settings.items():
                if name in _KERNEL_SETTINGS:
                    _C.set_setting(name, ("1" if value else "0") if isinstance(value, bool) else value)
                else:
                    _python_defaults()[name] = value
            _C.cpu_kernels()  # refuses a kernel this CPU cannot run
        except RuntimeError as e:
            _restore(before)
            raise ValueError(f"set_backend: {e}".splitlines()[0]) from None
        _generation += 1
    return before


def _restore(settings: BackendSettings) -> None:
    for f in dataclasses.fields(BackendSettings):
        value = getattr(settings, f.name)
        if f.name in _KERNEL_SETTINGS:
            _C.set_setting(f.name, ("1" if value else "0") if isinstance(value, bool) else value)
        else:
            _python_defaults()[f.name] = value


@contextlib.contextmanager
def use_backend(**settings) -> Iterator[BackendSettings]:
    """``with use_backend(cpu_fp32_gemm="mkl"): ...``: :func:`set_backend` for the block, the
    previous settings restored after it (process-wide, not per thread)."""
    before = set_backend(**settings)
    try:
        yield backend_settings()
    finally:
        set_backend(**dataclasses.asdict(before))


def _settings_generation() -> int:
    return _generation


# ---------------------------------------------------------------- weights in memory


def stacked_alias(first: Tensor, second: Tensor) -> Optional[Tensor]:
    """``cat([first, second])`` without a copy where the two are consecutive rows of one storage
    (as :func:`stack_parameters` leaves them): a tensor on that storage, not tracking autograd;
    else None."""
    if type(first) not in (torch.Tensor, nn.Parameter) or type(second) not in (torch.Tensor, nn.Parameter):
        return None  # a DTensor or another subclass: its local data is not the whole weight
    if first.device != second.device or first.dtype != second.dtype:
        return None
    if first.dim() < 1 or first.shape[1:] != second.shape[1:] or not (first.is_contiguous() and second.is_contiguous()):
        return None
    storage = first.untyped_storage()
    if storage._cdata != second.untyped_storage()._cdata:  # one storage (also on the meta device)
        return None
    if second.storage_offset() != first.storage_offset() + first.numel():
        return None
    shape = (first.shape[0] + second.shape[0], *first.shape[1:])
    with torch.no_grad():
        # contiguous strides (none given): first.stride() may hold any value for a dim of size 1
        return first.new_empty(0).set_(storage, first.storage_offset(), shape)


class _StackedWeights(torch.autograd.Function):
    """cat([first, second]) as an alias of their shared storage; backward splits the gradient
    into views."""

    @staticmethod
    def forward(ctx, first: Tensor, second: Tensor, alias: Tensor) -> Tensor:
        ctx.split = first.shape[0]
        return alias

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad[: ctx.split], grad[ctx.split :], None


def stacked(first: Tensor, second: Tensor) -> Tensor:
    """``torch.cat([first, second])``, differentiable, without copying when the two share one
    storage back to back; otherwise the copy."""
    alias = stacked_alias(first, second)
    if alias is None:
        return torch.cat([first, second])
    return _StackedWeights.apply(first, second, alias)


@torch.no_grad()
def stack_parameters(first: nn.Module, second: nn.Module, name: str = "weight") -> None:
    """Gives ``first.<name>`` and ``second.<name>`` (same trailing shape) one storage, back to
    back, keeping their values: at construction, before anyone holds the parameters."""
    a, b = getattr(first, name), getattr(second, name)
    joint = torch.empty((a.shape[0] + b.shape[0], *a.shape[1:]), dtype=a.dtype, device=a.device)
    joint[: a.shape[0]].copy_(a)
    joint[a.shape[0] :].copy_(b)
    setattr(first, name, nn.Parameter(joint[: a.shape[0]], requires_grad=a.requires_grad))
    setattr(second, name, nn.Parameter(joint[a.shape[0] :], requires_grad=b.requires_grad))


@torch.no_grad()
def restack_parameters(first: nn.Parameter, second: nn.Parameter) -> None:
    """Puts two parameters that should share one storage back to back (a fresh deep copy,
    which copies each on its own) onto one again, keeping the Parameter objects."""
    plain = (torch.Tensor, nn.Parameter)
    if type(first.data) not in plain or type(second.data) not in plain or stacked_alias(first, second) is not None:
        return
    joint = torch.cat([first.detach(), second.detach()])
    first.data, second.data = joint[: first.shape[0]], joint[first.shape[0] :]


def deepcopy_keeping_stacked(module: nn.Module, memo: dict, pairs: Callable[[nn.Module], Iterator]) -> nn.Module:
    """``copy.deepcopy(module)`` whose stacked parameter pairs (``pairs(copy)`` yields them) are
    stacked again in the copy."""
    new = module.__class__.__new__(module.__class__)
    memo[id(module)] = new
    new.__dict__.update(copy.deepcopy(module.__dict__, memo))
    for first, second in pairs(new):
        restack_parameters(first, second)
    return new


def apply_keeping_stacked(module: nn.Module, first: nn.Parameter, second: nn.Parameter, fn, recurse: bool, apply):
    """``module._apply(fn)`` (through ``apply``, the base class's) such that two parameters that
    share one storage back to back still do afterwards: a conversion (``.to()``, ``.cuda()``,
    ``to_empty``) converts their joint tensor once and hands each its part, in-place ones
    (``share_memory()``) act on the one storage. Nothing is swapped after the fact."""
    joint = stacked_alias(first, second)
    if joint is None or not recurse:
        return apply(fn, recurse)
    with torch.no_grad():
        converted = fn(joint)
    if converted is joint or converted.untyped_storage()._cdata == joint.untyped_storage()._cdata:
        return apply(fn, recurse)  # in place, or nothing to do
    parts = {id(first): converted[: first.shape[0]], id(second): converted[first.shape[0] :]}
    return apply(lambda t: parts[id(t)] if id(t) in parts else fn(t), recurse)


def on_huge_pages(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``fn`` (a module conversion) whose new CPU tensors of 2 MiB or more land on transparent
    huge pages (when the ``huge_pages`` setting is on): the weights are placed as they are made.
    Tensors ``fn`` changes in place (``share_memory_``) or returns as they are stay where they
    are."""

    def convert(t: Tensor) -> Tensor:
        new = fn(t)
        if not backend_settings().huge_pages or new is t or type(new) not in (torch.Tensor, nn.Parameter):
            return new
        if new.device.type != "cpu" or new.numel() * new.element_size() < (2 << 20) or new.is_shared():
            return new
        if t.device.type == new.device.type and new.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            return new  # a view or the same memory
        if new.data_ptr() % (2 << 20) == 0:
            return new
        placed = empty_huge_pages(new.shape, new.dtype)
        if t.device.type != "meta":  # from meta (to_empty) there are no values to keep
            placed.copy_(new)
        return placed

    return convert


def new_weight(shape: Tuple[int, ...], device=None, dtype=None) -> Tensor:
    """An uninitialised weight for a module's construction: on huge pages where it is a CPU tensor
    of 2 MiB or more and the ``huge_pages`` setting is on."""
    probe = torch.empty(0, device=device, dtype=dtype)
    nbytes = probe.element_size() * int(torch.Size(shape).numel())
    if probe.device.type == "cpu" and nbytes >= (2 << 20) and backend_settings().huge_pages:
        return empty_huge_pages(shape, probe.dtype)
    return torch.empty(shape, device=probe.device, dtype=probe.dtype)


# ---------------------------------------------------------------- the backends


def _in_autocast_dtype(*tensors: Tensor) -> Tuple[Tensor, ...]:
    """The tensors cast to the autocast dtype of the first one's device where autocast is on
    there, else as they are: the dsmoe ops have no autocast rule, so they run in the dtype
    autocast gives nn.Linear."""
    device_type = tensors[0].device.type
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) for t in tensors)


def _plain_linear(m: nn.Module) -> bool:
    """An exact nn.Linear without bias or hooks whose weight is a plain tensor (not sharded or
    wrapped): its product may run as another GEMM call than its forward."""
    return (
        type(m) is nn.Linear
        and m.bias is None
        and type(m.weight) is nn.Parameter
        and not (m._forward_hooks or m._forward_pre_hooks)
    )


def _plain_swiglu_mlp(x: Tensor, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module,
                      add_to: Optional[Tensor]) -> Tensor:
    hidden = F.silu(gate_proj(x)) * up_proj(x)
    if add_to is None:
        return down_proj(hidden)
    if _plain_linear(down_proj) and hidden.dim() == 2:
        return torch.addmm(add_to, hidden, down_proj.weight.t())
    return add_to + down_proj(hidden)


class ReferenceBackend:
    """The seeds' plain PyTorch: the MoE gate, the loop over experts (training path in training,
    ``moe_infer`` in eval), the seeds' balance loss and the dense MLP through nn.Linear."""

    name = "reference"

    def route(self, logits: Tensor, top_k: int, normalize: bool, bias: Optional[Tensor], num_seqs: int):
        return reference.gate(logits, top_k, normalize, bias, num_seqs)

    def routed_experts(self, x: Tensor, weights: Tensor, expert_ids: Tensor, w_gate_up: Tensor, w_down: Tensor,
                       training: bool) -> Tensor:
        ids, w = expert_ids.long(), weights.to(x.dtype)
        if training:
            return reference.moe_forward_train(x, ids, w, w_gate_up, w_down)
        return reference.moe_infer(x, ids, w, w_gate_up, w_down)

    def dense_mlp(self, mlp: nn.Module, x: Tensor, add_to: Optional[Tensor] = None) -> Tensor:
        out = _plain_swiglu_mlp(x, mlp.gate_proj, mlp.up_proj, mlp.down_proj, None)
        return out if add_to is None else add_to + out  # the seeds' sum

    def moe_experts(self, layer: nn.Module, x: Tensor, route) -> Tensor:
        """A DeepSeekMoE layer's routed experts plus its shared experts on x [T, h]."""
        y = layer.experts(x, route.weights, route.expert_ids, impl=self.name)
        if layer.shared_experts is not None:
            y = self.dense_mlp(layer.shared_experts, x, add_to=y)
        return y

    def balance_loss(self, layer: nn.Module, route, seq_len: int) -> Optional[Tensor]:
        if layer.balance_loss is None:
            return None
        return reference.expert_balance_loss(
            route.tokens_per_expert, route.score_sums, layer.top_k, layer.balance_loss.alpha, layer.seq_aux
        )


class DsmoeBackend(ReferenceBackend):
    """The dsmoe ops: the fused gate, permute -> grouped GEMM -> SwiGLU -> grouped GEMM ->
    unpermute for the routed experts (no host sync), and on CPU the dense MLP on dsmoe's own GEMM
    kernel where it runs."""

    name = "dsmoe"

    def __init__(self) -> None:
        self._own_gemm: Dict[torch.dtype, bool] = {}
        self._own_gemm_generation = -1

    def route(self, logits, top_k, normalize, bias, num_seqs):
        return ops.gate(logits, top_k, normalize, bias, num_seqs)

    def routed_experts(self, x, weights, expert_ids, w_gate_up, w_down, training: bool = False,
                       trans_b: bool = True) -> Tensor:
        return routed_experts(x, weights, expert_ids, w_gate_up, w_down, trans_b=trans_b)

    def dense_mlp(self, mlp: nn.Module, x: Tensor, add_to: Optional[Tensor] = None) -> Tensor:
        """down(silu(gate(x)) * up(x)) [+ add_to]; on CPU from ``dense_own_gemm_min_rows`` rows as
        two one-group dsmoe grouped GEMMs + dsmoe swiglu where dsmoe's GEMM kernel runs for the
        dtype (AVX512 CPUs: 4-17% faster than oneDNN/MKL through nn.Linear at 2048 rows,
        docs/cpu_performance.md), else the nn.Linear modules, where the sum with ``add_to`` is
        done by the down projection's GEMM (addmm)."""
        if self._on_own_cpu_gemm(mlp, x):
            return self._own_cpu_gemm_mlp(mlp, x, add_to)
        return _plain_swiglu_mlp(x, mlp.gate_proj, mlp.up_proj, mlp.down_proj, add_to)

    def moe_experts(self, layer, x, route):
        # CPU inference on a few tokens: routed + shared experts in one pass over packed weights
        y = decode.moe_layer_decode(layer, x, route.weights, route.expert_ids)
        return y if y is not None else super().moe_experts(layer, x, route)

    def balance_loss(self, layer, route, seq_len):
        if layer.balance_loss is None:
            return None
        return layer.balance_loss(route.tokens_per_expert, route.score_sums, seq_len)

    def own_cpu_gemm(self, dtype: torch.dtype) -> str:
        """How dsmoe's grouped GEMM runs ``dtype`` under the settings in force, where that beats
        nn.Linear: ``"avx512"`` (its own kernel), ``"fp32"`` (bf16 converted to fp32 on a CPU
        without bf16 arithmetic) or ``""`` (nn.Linear is as good)."""
        if self._own_gemm_generation != _generation:
            self._own_gemm, self._own_gemm_generation = {}, _generation
        if dtype not in self._own_gemm:
            key = {torch.bfloat16: "bf16_gemm", torch.float32: "fp32_gemm"}.get(dtype)
            kernel = _C.cpu_kernels()[key] if key is not None else ""
            self._own_gemm[dtype] = kernel if kernel in ("avx512", "fp32") else ""
        return self._own_gemm[dtype]

    def _on_own_cpu_gemm(self, mlp: nn.Module, x: Tensor) -> bool:
        if torch.compiler.is_compiling():
            return False  # the compiler picks its own GEMMs
        if x.device.type != "cpu" or x.dim() < 2:
            return False
        projections = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if not all(_plain_linear(m) for m in projections):
            return False
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        how = self.own_cpu_gemm(dtype)
        if not how or not all(m.weight.dtype == x.dtype for m in projections):
            return False
        min_rows = _python_defaults()["dense_own_gemm_min_rows"]
        if how == "fp32":
            min_rows = min(min_rows, BF16_IN_FP32_MIN_ROWS)
        return x.numel() >= min_rows * x.shape[-1]

    def _own_cpu_gemm_mlp(self, mlp: nn.Module, x: Tensor, add_to: Optional[Tensor]) -> Tensor:
        w_gate_up = stacked(mlp.gate_proj.weight, mlp.up_proj.weight)  # no copy (stack_parameters)
        x, w_gate_up, w_down = _in_autocast_dtype(x, w_gate_up, mlp.down_proj.weight)
        rows = x.reshape(-1, x.shape[-1])
        offsets = torch.tensor([0, rows.shape[0]], dtype=torch.int32)  # one group: every row
        hidden = ops.swiglu(ops.grouped_gemm(rows, w_gate_up.unsqueeze(0), offsets, trans_b=True))
        out = ops.grouped_gemm(hidden, w_down.unsqueeze(0), offsets, trans_b=True)
        out = out.view(*x.shape[:-1], out.shape[-1])
        return out if add_to is None else add_to + out


def routed_experts(
    x: Tensor, weights: Tensor, expert_ids: Tensor, w_gate_up: Tensor, w_down: Tensor, trans_b: bool = True
) -> Tensor:
    """y[t] = sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) for SwiGLU experts on stacked weights,
    as permute -> grouped GEMM -> SwiGLU -> grouped GEMM -> unpermute (no host sync): dsmoe's
    RoutedExperts and the transformers experts backend (dsmoe.hf). ``w_gate_up`` [E, 2I, h] (gate
    rows, then up rows) and ``w_down`` [E, h, I], or [E, h, 2I] and [E, I, h] with
    ``trans_b=False``. ``expert_ids`` int32 or int64; ids >= E contribute zero at no compute."""
    x, w_gate_up, w_down = _in_autocast_dtype(x, w_gate_up, w_down)
    x_perm, row_map, offsets = ops.permute(x, expert_ids, w_gate_up.shape[0])
    hidden = ops.swiglu(ops.grouped_gemm(x_perm, w_gate_up, offsets, trans_b=trans_b))
    y_perm = ops.grouped_gemm(hidden, w_down, offsets, trans_b=trans_b)
    return ops.unpermute(y_perm, row_map, weights)


BACKENDS = {"dsmoe": DsmoeBackend(), "reference": ReferenceBackend()}


def get_backend(impl: str = "dsmoe"):
    """The backend object of an ``impl`` name (``"dsmoe"`` or ``"reference"``)."""
    try:
        return BACKENDS[impl]
    except KeyError:
        raise ValueError(f"impl must be one of {tuple(BACKENDS)}, got {impl!r}") from None


__all__ = [
    "BackendSettings",
    "DsmoeBackend",
    "ReferenceBackend",
    "apply_keeping_stacked",
    "backend_settings",
    "get_backend",
    "new_weight",
    "on_huge_pages",
    "routed_experts",
    "set_backend",
    "stack_parameters",
    "stacked",
    "stacked_alias",
    "use_backend",
]
