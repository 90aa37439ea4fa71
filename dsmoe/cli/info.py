"""`dsmoe info`: what was built and what this machine has."""
from __future__ import annotations

import argparse
import dataclasses
import platform
import sys

import torch

from .bench import cpu_name
from .common import format_table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--presets", action="store_true", help="also list the model presets with their parameter counts")


def run(ns: argparse.Namespace) -> int:
    import dsmoe

    info = dsmoe.build_info()
    print(f"dsmoe {info.get('version')}")
    print(f"  built against torch {info.get('torch_version')}, CUDA kernels "
          f"{'on (archs ' + str(info.get('cuda_archs')) + ')' if info.get('cuda') else 'off'}")
    for key, value in info.items():
        if key not in ("version", "torch_version", "cuda", "cuda_archs"):
            print(f"  {key}: {value}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), python {platform.python_version()}")
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads")
    k = dsmoe.cpu_kernels()
    bf16 = "in fp32" if k["bf16_gemm"] == "fp32" else k["bf16_gemm"]
    print(f"  CPU kernels: elementwise {k['vec_isa']}, bf16 GEMM {bf16}, fp32 GEMM {k['fp32_gemm']}")
    settings = dsmoe.backend_settings()
    print("Backend settings in force (dsmoe.set_backend; defaults from the environment):")
    for name, value in dataclasses.asdict(settings).items():
        print(f"  {name}: {value}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    else:
        print("GPU: none visible")
    if ns.presets:
        from .data import BYTE_VOCAB_SIZE
        from .models import make_config, parameter_counts, preset_names

        rows = []
        for name in preset_names():
            cfg = make_config(name)
            total, active = parameter_counts(cfg)
            moe = (f"{cfg.n_shared_experts or 0}+{cfg.n_routed_experts} top-{cfg.num_experts_per_tok}"
                   if cfg.n_routed_experts else "dense")
            rows.append([name, cfg.num_hidden_layers, cfg.hidden_size, moe, _human(total), _human(active)])
        print()
        print(format_table(["preset", "layers", "hidden", "experts", "params", "activated"], rows))
        print(f"(each with its own vocabulary; `dsmoe train` gives a preset the byte-level one of {BYTE_VOCAB_SIZE} "
              "tokens, which `small` has)")
    sys.stdout.flush()
    return 0


def _human(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
