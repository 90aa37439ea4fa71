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
    and ``fp32_gemm`` of the grouped GEMM's forward and input gradient: 'avx512' (dsmoe's kernel,
    the default on CPUs with AVX512-BF16 and no AMX), else 'onednn' (or 'mkl' for fp32), as
    ``DSMOE_CPU_BF16_GEMM`` / ``DSMOE_CPU_FP32_GEMM`` may choose; and ``cpu_avx512_bf16``."""
    return dict(_C.cpu_kernels())
