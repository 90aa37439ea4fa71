"""The fake (meta) kernels of dsmoe/ops.py against the C++ kernels, call by call.

The fakes repeat the argument checks of csrc/op_checks.h so that a bad call fails the same way
eagerly, on 'meta' tensors and while torch.compile traces, and they give the output shapes the
compiled graph is built with. Here the CPU kernel is the oracle: from a few valid calls per op,
every single change a user could make to one argument (one dimension more or less, each size
+-1, every dtype torch has, another memory layout, one tensor on another device, the integer
arguments at and past their bounds) is run on the CPU kernel and on the fake ('meta' tensors), and the two must agree:
both refuse with the same message, or both accept with the same output shapes, strides and
dtypes.

Index tensors hold zeros (expert ids, offsets: valid whatever the shape) or a permutation (row
maps), so the CPU kernels' value checks (which the fakes cannot repeat: they never read values)
never fire."""
from __future__ import annotations

import re
import warnings

import pytest
import torch

import dsmoe.ops  # noqa: F401  (registers torch.ops.dsmoe)
from conftest import redispatch

OPS = torch.ops.dsmoe


def _all_dtypes():
    """Every dtype torch has that a CPU tensor can be made of (the quantized ones aside: the
    dispatcher sends those to the QuantizedCPU backend, which dsmoe's ops have no kernel for,
    before any check of dsmoe's runs)."""
    found = []
    for name in dir(torch):
        d = getattr(torch, name)
        if isinstance(d, torch.dtype) and d not in found and not str(d).startswith(("torch.qint", "torch.quint")):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # ComplexHalf is "experimental"
                    torch.empty(1, dtype=d)
            except (RuntimeError, TypeError):
                continue
            found.append(d)
    return found


DTYPES = _all_dtypes()
_NUMBERS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _t(*shape, dtype=torch.float32):
    """Random values for the float dtypes the ops take, zeros for the integer ones (valid expert
    ids, offsets and row maps whatever the shape), and for the rest whatever memory holds: those
    are refused by their dtype before a value is read."""
    if dtype in _NUMBERS:
        return torch.randn(*shape).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dtype in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
            return torch.zeros(*shape, dtype=dtype)
        return torch.empty(*shape, dtype=dtype)


def _packed(E, I, h, dtype=torch.float32):
    return OPS.pack_decode_weights(_t(E, 2 * I, h, dtype=dtype), _t(E, h, I, dtype=dtype))


def _base_calls():
    """(op name, [(argument name, value)]) valid calls, the edges of each op's shapes included."""
    i32, f32 = torch.int32, torch.float32
    calls = []
    for T, E, k, S, bias in ((6, 4, 2, 2, True), (6, 4, 4, 3, False), (5, 1, 1, 5, True), (0, 3, 1, 1, False)):
        calls.append(("gate", [("logits", _t(T, E)), ("k", k), ("normalize", bias), ("selection_bias", _t(E) if bias else None),
                               ("num_seqs", S)]))
    calls.append(("gate", [("logits", _t(4, 3, dtype=torch.float64)), ("k", 2), ("normalize", True),
                           ("selection_bias", _t(3, dtype=torch.float64)), ("num_seqs", 2)]))
    for T, E, k, S in ((6, 4, 2, 2), (3, 3, 3, 3), (4, 1, 1, 1)):
        calls.append(("gate_backward", [("grad_weights", _t(T, k)), ("grad_score_sums", _t(S, E)), ("logits", _t(T, E)),
                                        ("expert_ids", _t(T, k, dtype=i32)), ("normalize", True), ("num_seqs", S)]))
    for T, h, k, E in ((6, 3, 2, 4), (1, 1, 1, 1), (0, 2, 3, 2)):
        calls.append(("permute", [("x", _t(T, h)), ("expert_ids", _t(T, k, dtype=i32)), ("num_experts", E)]))
    calls.append(("permute", [("x", _t(5, 2, dtype=torch.bfloat16)), ("expert_ids", _t(5, 2, dtype=torch.int64)), ("num_experts", 3)]))
    for T, h, k in ((6, 3, 2), (2, 1, 1), (0, 2, 3)):
        row_map = torch.arange(T * k, dtype=i32).flip(0)  # a permutation, as the CPU kernels check
        calls.append(("permute_backward", [("grad_x_perm", _t(T * k, h)), ("row_map", row_map), ("k", k)]))
        calls.append(("unpermute", [("y_perm", _t(T * k, h)), ("row_map", row_map), ("weights", _t(T, k))]))
        calls.append(("unpermute_backward", [("grad_y", _t(T, h)), ("y_perm", _t(T * k, h)), ("row_map", row_map),
                                             ("weights", _t(T, k))]))
    for rows, K, N, E, trans_b in ((5, 3, 2, 4, False), (5, 3, 2, 4, True), (3, 2, 4, 1, True), (0, 2, 2, 2, False)):
        b = _t(E, N, K) if trans_b else _t(E, K, N)
        off = _t(E + 1, dtype=i32)
        calls.append(("grouped_gemm", [("a", _t(rows, K)), ("b", b), ("expert_offsets", off), ("trans_b", trans_b)]))
        calls.append(("grouped_gemm_wgrad", [("a", _t(rows, K)), ("grad_c", _t(rows, N)), ("expert_offsets", off),
                                             ("trans_b", trans_b)]))
    for rows, two_i in ((4, 6), (1, 2), (0, 4)):
        calls.append(("swiglu", [("gate_up", _t(rows, two_i))]))
        calls.append(("swiglu_backward", [("grad_out", _t(rows, two_i // 2)), ("gate_up", _t(rows, two_i))]))
    for E, I, h, dtype in ((2, 3, 5, f32), (1, 1, 1, f32), (3, 9, 17, torch.bfloat16), (2, 8, 8, torch.float16)):
        calls.append(("pack_decode_weights", [("w_gate_up", _t(E, 2 * I, h, dtype=dtype)), ("w_down", _t(E, h, I, dtype=dtype))]))
    for T, h, k, E, I, shared, dtype in ((3, 5, 2, 4, 3, True, f32), (1, 9, 1, 1, 1, False, f32), (0, 4, 2, 3, 2, True, f32),
                                         (2, 1, 1, 2, 3, True, f32),
                                         (2, 16, 2, 3, 8, True, torch.bfloat16)):
        gu, down = _packed(E, I, h, dtype)
        sgu, sdown = _packed(1, I + 1, h, dtype) if shared else (None, None)
        calls.append(("moe_decode", [("x", _t(T, h, dtype=dtype)), ("weights", _t(T, k)), ("expert_ids", _t(T, k, dtype=i32)),
                                     ("packed_gate_up", gu), ("packed_down", down), ("shared_gate_up", sgu), ("shared_down", sdown)]))
    return calls


# The integer arguments at and past their bounds (the sizes they must match are varied through
# the tensors).
_INT_VALUES = {
    "k": (-1, 0, 1, 2, 3, 4, 5, 7, 12, 13),
    "num_seqs": (-1, 0, 1, 2, 3, 4, 5, 6, 7),
    "num_experts": (-1, 0, 1, 2, 5, 1 << 30, 1 << 31),
}


def _variants(name, args):
    """(what changed, args) for every one-argument change of a valid call."""
    out = []
    for i, (arg, value) in enumerate(args):
        def put(v, i=i):
            new = [a for _, a in args]
            new[i] = v
            return new

        if isinstance(value, torch.Tensor):
            t = value
            out.append((f"{arg} with one more dim", put(t.unsqueeze(0))))
            out.append((f"{arg} with one dim less", put(t.sum(0).to(t.dtype))))
            for d in range(t.dim()):
                for delta in (-1, 1):
                    if t.shape[d] + delta >= 0:
                        shape = list(t.shape)
                        shape[d] += delta
                        out.append((f"{arg}.size({d}) {delta:+d}", put(_t(*shape, dtype=t.dtype))))
            for d in DTYPES:
                if d != t.dtype:
                    out.append((f"{arg} as {d}", put(_t(*t.shape, dtype=d))))
            if t.dim() >= 2:  # the same values in another memory layout: outputs stay contiguous
                out.append((f"{arg} column-major", put(t.transpose(-1, -2).contiguous().transpose(-1, -2))))
        elif isinstance(value, bool):
            out.append((f"{arg}={not value}", put(not value)))
        elif value is None:
            continue
        elif arg in _INT_VALUES:
            for v in _INT_VALUES[arg]:
                if v != value:
                    out.append((f"{arg}={v}", put(v)))
    if name == "moe_decode":
        names = [a for a, _ in args]
        sgu, sdown = names.index("shared_gate_up"), names.index("shared_down")
        vals = [a for _, a in args]
        E, h, dtype = vals[3].shape[0], vals[0].shape[1], vals[0].dtype
        # x of hidden 0, with packed tensors shaped for it (pack_decode_weights refuses to make them)
        gu0, down0 = torch.empty(E, vals[3].shape[1], 0, 16, dtype=dtype), torch.empty(E, 0, vals[4].shape[2], 8, dtype=dtype)
        out.append(("x with hidden 0", [vals[0][:, :0]] + vals[1:3] + [gu0, down0, None, None]))
        # packed tensors of no intermediate rows, consistent with each other
        empty_gu, empty_down = torch.empty(E, 0, h, 16, dtype=dtype), torch.empty(E, (h + 7) // 8, 0, 8, dtype=dtype)
        out.append(("packed experts with no intermediate", vals[:3] + [empty_gu, empty_down] + vals[5:]))
        if vals[sgu] is not None:
            out.append(("packed shared expert with no intermediate", vals[:sgu] + [empty_gu[:1], empty_down[:1]]))
        # the shared expert's two packed tensors go together
        if vals[sgu] is not None:
            out.append(("shared_down missing", vals[:sdown] + [None] + vals[sdown + 1:]))
            out.append(("shared_gate_up missing", vals[:sgu] + [None] + vals[sgu + 1:]))
            out.append(("shared packed with E=2", vals[:sgu] + list(_packed(2, 2, vals[0].shape[1], vals[0].dtype)) + vals[sdown + 1:]))
        else:
            gu, down = _packed(1, 2, vals[0].shape[1], vals[0].dtype)
            out.append(("only shared_gate_up", vals[:sgu] + [gu, None]))
            out.append(("only shared_down", vals[:sgu] + [None, down]))
    return out


def _outcome(fn):
    try:
        result = fn()
    except RuntimeError as e:
        return ("error", str(e).split("\n")[0])
    results = result if isinstance(result, (tuple, list)) else (result,)
    return ("ok", [(tuple(r.shape), r.stride(), r.dtype) for r in results])


def _to_meta(v):
    return v.to("meta") if isinstance(v, torch.Tensor) else v


def _cases():
    by_op = {}
    for name, args in _base_calls():
        by_op.setdefault(name, []).append(args)
    return sorted(by_op.items())


@pytest.mark.parametrize("name,bases", _cases(), ids=[n for n, _ in _cases()])
def test_fake_kernel_agrees_with_the_cpu_kernel(name, bases):
    op = getattr(OPS, name).default
    checked, mismatches = 0, []
    for args in bases:
        base = [a for _, a in args]
        for what, new in [("valid call", base)] + _variants(name, args):
            real = _outcome(lambda: op(*new))
            fake = _outcome(lambda: op(*[_to_meta(v) for v in new]))
            checked += 1
            if real != fake:
                shapes = [tuple(v.shape) if isinstance(v, torch.Tensor) else v for v in new]
                mismatches.append(f"{what} (args {shapes}):\n  cpu:  {real}\n  fake: {fake}")
            if what == "valid call":
                assert real[0] == "ok", f"{name}: the base call {[a for a, _ in args]} must be valid: {real}"
    assert not mismatches, f"{name}: {len(mismatches)} of {checked} calls differ:\n" + "\n".join(mismatches[:12])


# A tensor on another device: the device's own kernel (redispatched) and the fake, which is what
# a call with a 'meta' argument dispatches to, must refuse it with the same message. The decode
# ops are CPU-only kernels (their rule is "a CPU tensor", the fake's "one device": both refuse,
# in different words) and are left out.
_DEVICE_OPS = ["gate", "gate_backward", "permute", "permute_backward", "unpermute", "unpermute_backward",
               "grouped_gemm", "grouped_gemm_wgrad", "swiglu_backward"]


@pytest.mark.parametrize("name", _DEVICE_OPS)
def test_fake_kernel_refuses_mixed_devices_as_the_cpu_kernel_does(name):
    op = getattr(OPS, name).default
    checked = 0
    for op_name, args in _base_calls():
        if op_name != name:
            continue
        values = [a for _, a in args]
        tensors = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
        for i in tensors if len(tensors) > 1 else []:
            new = list(values)
            new[i] = new[i].to("meta")
            real = _outcome(lambda: redispatch(op, "cpu", *new))
            fake = _outcome(lambda: op(*new))
            assert real[0] == "error" and "all tensors must share a device" in real[1], (name, args[i][0], real)
            assert fake == real, (name, args[i][0], real, fake)
            checked += 1
    assert checked >= 2


def test_permute_row_limit_on_meta():
    """num_tokens * k rows must fit int32 row indices: 2^31 - 1 rows are accepted, 2^31 refused
    (meta tensors: no memory; the CPU kernel refuses the same 2^31 before allocating)."""
    ids = torch.zeros(1, 1, dtype=torch.int32)
    too_many = (torch.empty(1 << 30, 0), ids.expand(1 << 30, 2), 4)
    msg = re.escape("dsmoe.permute: num_tokens * k must fit int32 row indices, got 2147483648")
    with pytest.raises(RuntimeError, match=msg):
        OPS.permute(*too_many)
    with pytest.raises(RuntimeError, match=msg):
        OPS.permute(*[_to_meta(v) for v in too_many])
    x_perm, row_map, offsets = OPS.permute(torch.empty((1 << 31) - 1, 0, device="meta"),
                                           torch.zeros((1 << 31) - 1, 1, dtype=torch.int32, device="meta"), 4)
    assert x_perm.shape == ((1 << 31) - 1, 0) and row_map.shape == ((1 << 31) - 1,) and offsets.shape == (5,)


def test_decode_ops_name_the_tensor_on_another_device():
    """moe_decode's CPU kernel takes CPU tensors only; its fake (what a call with a 'meta'
    argument reaches, and what torch.compile traces) asks for one device, naming the argument."""
    gu, down = _packed(3, 4, 8)
    sgu, sdown = _packed(1, 2, 8)
    names = ["x", "weights", "expert_ids", "packed_gate_up", "packed_down", "shared_gate_up", "shared_down"]
    values = [_t(2, 8), _t(2, 2), _t(2, 2, dtype=torch.int32), gu, down, sgu, sdown]
    for i, name in enumerate(names[1:], start=1):
        new = list(values)
        new[i] = new[i].to("meta")
        with pytest.raises(RuntimeError) as e:
            OPS.moe_decode(*new)
        assert str(e.value).split("\n")[0] == (
            f"dsmoe.moe_decode: {name} is on meta but x is on cpu; all tensors must share a device")
        with pytest.raises(RuntimeError, match=f"dsmoe.moe_decode: {name} must be a CPU tensor, got meta"):
            redispatch(OPS.moe_decode.default, "cpu", *new)
