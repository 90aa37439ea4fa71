"""Loads the compiled extension dsmoe._C (which registers torch.ops.dsmoe.*), refusing in one
line a build made against another torch instead of failing with an undefined symbol."""
from __future__ import annotations

import json
from pathlib import Path

import torch

_META = Path(__file__).with_name("_build_meta.json")


def _load():
    if _META.is_file():
        built_with = json.loads(_META.read_text()).get("torch_version")
        if built_with and built_with != torch.__version__:
            raise ImportError(
                f"dsmoe was built against torch {built_with} but torch {torch.__version__} is "
                "installed; rebuild it: pip install --no-build-isolation -e ."
            )
    from . import _C

    return _C


_C = _load()


def build_info() -> dict:
    """Version, the torch version it was built against, CUDA on/off and the CUDA archs."""
    return dict(_C.build_info())


def cpu_kernels() -> dict:
    """The CPU kernels this process runs (each chosen once): ``vec_isa`` of the elementwise and
    gather kernels (AVX512/AVX2/DEFAULT, by ATen's ``ATEN_CPU_CAPABILITY`` rule); ``bf16_gemm``
    and ``fp32_gemm`` of the grouped GEMM's forward, input and weight gradients: 'avx512' (dsmoe's kernel,
    the default on CPUs with AVX512-BF16 and no AMX), else 'onednn' (or 'mkl' for fp32), as
    ``DSMOE_CPU_BF16_GEMM`` / ``DSMOE_CPU_FP32_GEMM`` may choose; and ``cpu_avx512_bf16``."""
    return dict(_C.cpu_kernels())


def huge_pages_enabled() -> bool:
    """Whether dsmoe puts CPU expert weights on transparent huge pages: the ``huge_pages``
    setting (dsmoe.set_backend; default from ``DSMOE_CPU_HUGE_PAGES``, ``0`` turns it off)."""
    from .backend import backend_settings

    return backend_settings().huge_pages


def empty_huge_pages(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor on transparent huge pages where it spans 2 MiB or
    more (a hint the kernel may ignore; THP off: ordinary pages). For long-lived tensors read in
    streams, such as expert weights: on 4 KiB pages the hardware prefetchers stop at every page
    (docs/cpu_performance.md)."""
    return _C.empty_huge_pages_like(torch.empty(shape, dtype=dtype, device="meta"))


def advise_huge_pages(t: torch.Tensor, collapse: bool = False) -> bool:
    """Asks the kernel to back ``t``'s memory (its 2 MiB-aligned part) with huge pages; with
    ``collapse``, now (MADV_COLLAPSE, Linux >= 6.1, ~3 ms per MB). Returns whether it took the
    hint; the contents are unchanged."""
    return bool(_C.advise_huge_pages(t, collapse))
