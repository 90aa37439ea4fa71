"""Where the CUDA kernel sources run in the tests: on a GPU ("cuda", when one is visible) and in
the SIMT emulator on the CPU ("simt", always: tools/simt_build.py builds csrc/cuda/*.cu as C++).

``Kernels.op(name)`` is the op on that backend's tensors; ``Kernels.run(name, *args)`` moves the
tensor arguments there, poisons new memory (0xff bytes: NaN in every float dtype, -1 in int32) so
an output element never written cannot pass, calls the op and returns CPU tensors. On the
emulator every call runs twice, with the block's threads scheduled in increasing and in
decreasing order, and the two results must be bitwise equal: a missing barrier between a
shared-memory write and another thread's read makes them differ.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import dsmoe

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["cuda", "simt"]
_simt_loaded = False


def load_simt() -> None:
    global _simt_loaded
    if not _simt_loaded:
        sys.path.insert(0, str(ROOT / "tools"))
        import simt_build

        simt_build.load()
        _simt_loaded = True


def _same_bits(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
            a.contiguous().view(torch.uint8) if a.numel() else a, b.contiguous().view(torch.uint8) if b.numel() else b)
    return all(_same_bits(x, y) for x, y in zip(a, b))


class Kernels:
    def __init__(self, name: str):
        self.name = name
        self.device = "cuda" if name == "cuda" else "cpu"
        self.ns = torch.ops.dsmoe if name == "cuda" else torch.ops.dsmoe_simt

    @property
    def is_simt(self) -> bool:
        return self.name == "simt"

    def to(self, t):
        return t.to(self.device) if isinstance(t, torch.Tensor) else t

    def op(self, name: str):
        fn = getattr(self.ns, name)
        if not self.is_simt:
            return fn

        def both_orders(*args):
            cfg = torch.ops.dsmoe_simt.simt_configure
            try:
                cfg(False, 0, True)
                first = fn(*args)
                cfg(True, 0, True)
                second = fn(*args)
            finally:
                cfg(False, 0, False)
            assert _same_bits(first, second), (
                f"dsmoe_simt.{name}: results differ between increasing and decreasing thread order "
                "(a missing __syncthreads / __syncwarp?)")
            return first

        return both_orders

    def poison(self) -> None:
        """CUDA: fill what the caching allocator hands out next with 0xff. The emulator poisons
        every new CPU tensor during each call instead."""
        if self.is_simt:
            return
        small = [torch.empty(1 << 20, dtype=torch.uint8, device="cuda") for _ in range(32)]
        large = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        for t in small + [large]:
            t.fill_(255)
        del small, large

    def run(self, name: str, *args):
        dargs = [self.to(a) for a in args]
        self.poison()
        out = self.op(name)(*dargs)
        if not self.is_simt:
            torch.cuda.synchronize()
        if isinstance(out, torch.Tensor):
            return out.cpu()
        return tuple(o.cpu() for o in out)

    def misaligned(self, t: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of t on this backend whose data pointer is one element off 16 bytes."""
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=self.device)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        assert view.is_contiguous() and view.data_ptr() % 16 != 0
        return view

    def require_cuda(self, why: str) -> None:
        if self.is_simt:
            pytest.skip(f"CUDA device only: {why}")


def kernels_params():
    return [
        pytest.param("cuda", marks=[pytest.mark.cuda,
                                    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]),
        pytest.param("simt", marks=pytest.mark.simt),
    ]


def make_kernels(name: str) -> Kernels:
    if name == "cuda":
        assert dsmoe.build_info()["cuda"], "a GPU is visible but dsmoe was built without CUDA kernels"
    else:
        load_simt()
    return Kernels(name)
