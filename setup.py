"""Builds dsmoe._C from csrc/sources.txt with ninja.

CUDA kernels are built when DSMOE_CUDA=1, or when DSMOE_CUDA is unset/"auto" and torch was built
with CUDA and nvcc is found (CUDA_HOME). DSMOE_CUDA=0 forces a CPU-only build. The GPU is never
queried: TORCH_CUDA_ARCH_LIST (default "8.0;9.0a") picks the archs. CUTLASS headers come from
the nvidia-cutlass package or CUTLASS_DIR; nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "cmake"))
from dsmoe_sources import read_sources  # noqa: E402

VERSION = "0.1.0"
DEFAULT_ARCHS = "8.0;9.0a"


def want_cuda() -> bool:
    choice = os.environ.get("DSMOE_CUDA", "auto").lower()
    if choice not in ("auto", "0", "1"):
        raise SystemExit(f"DSMOE_CUDA must be auto, 0 or 1, got {choice!r}")
    if choice == "0":
        return False
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if choice == "1" and not available:
        raise SystemExit(
            "DSMOE_CUDA=1 but this torch has no CUDA (torch.version.cuda is None) or nvcc was not "
            "found (set CUDA_HOME)"
        )
    return available


def cutlass_include() -> str | None:
    if os.environ.get("CUTLASS_DIR"):
        include = Path(os.environ["CUTLASS_DIR"]) / "include"
        if not (include / "cutlass" / "cutlass.h").is_file():
            raise SystemExit(f"CUTLASS_DIR={os.environ['CUTLASS_DIR']} has no include/cutlass/cutlass.h")
        return str(include)
    try:
        import cutlass_library  # the nvidia-cutlass package ships the headers beside it
    except ImportError:
        return None
    for include in (Path(cutlass_library.__file__).parent / "source" / "include",):
        if (include / "cutlass" / "cutlass.h").is_file():
            return str(include)
    return None


def nvidia_wheel_includes() -> list[str]:
    """cuBLAS & co. headers of the nvidia-* wheels, which torch's cpp_extension does not add."""
    found = []
    for entry in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            path = Path(entry) / sub
            if path.is_dir():
                found.append(str(path))
    return found


def shared_libstdcxx():
    """Link libstdc++ as a shared library, the one torch uses. A toolchain whose own library folder
    holds only libstdc++.a (the H200 image's /opt/gcc) otherwise links a second, static copy into
    _C.so, and every C++ exception the extension throws (each TORCH_CHECK) crashes the process."""
    return ["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []


def build_extension():
    sources = read_sources(ROOT)
    cuda = want_cuda()
    torch_version = torch.__version__
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS) if cuda else ""
    if cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    macros = [
        ("DSMOE_VERSION", f'"{VERSION}"'),
        ("DSMOE_TORCH_VERSION", f'"{torch_version}"'),
    ]
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    include_dirs = [str(ROOT / "csrc")]
    files = sources["ops"] + sources["python"]
    if cuda:
        files += sources["cuda"]
        macros += [("DSMOE_WITH_CUDA", None), ("DSMOE_CUDA_ARCHS", f'"{archs}"')]
        include_dirs += nvidia_wheel_includes()
        cutlass = cutlass_include()
        if cutlass:
            include_dirs.append(cutlass)
            macros.append(("DSMOE_WITH_CUTLASS", None))
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "--expt-extended-lambda",
            "-lineinfo", "--use_fast_math", "-Xcompiler=-fopenmp"]
    for name, value in macros:
        define = f"-D{name}" if value is None else f"-D{name}={value}"
        nvcc.append(define)
    ext_cls = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
    extension = ext_cls(
        name="dsmoe._C",
        sources=files,
        include_dirs=include_dirs,
        define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"] + shared_libstdcxx(),
    )
    BuildExt.meta = {"version": VERSION, "torch_version": torch_version, "cuda": cuda, "cuda_archs": archs}
    return extension


class BuildExt(cpp_extension.BuildExtension):
    """Also records what the extension was built against beside it (read by dsmoe/_ext.py)."""

    meta: dict = {}

    def run(self):
        # ninja prints a line per finished file only when asked (pip -v); say first what comes
        n = sum(len(ext.sources) for ext in self.extensions)
        kernels = "CPU and CUDA" if self.meta.get("cuda") else "CPU"
        print(f"dsmoe: compiling {n} C++/CUDA sources ({kernels} kernels) with ninja; this takes minutes",
              file=sys.stderr, flush=True)
        super().run()
        out_dir = Path(self.get_ext_fullpath("dsmoe._C")).parent
        (out_dir / "_build_meta.json").write_text(json.dumps(self.meta, indent=2) + "\n")


setup(
    name="dsmoe",
    version=VERSION,
    description="Fast torch.compile-compatible fine-grained Mixture-of-Experts operators and the DeepSeekMoE model",
    packages=find_packages(include=["dsmoe", "dsmoe.*"]),
    package_data={"dsmoe": ["_build_meta.json"]},
    ext_modules=[build_extension()],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "safetensors", "tqdm", "matplotlib", "tokenizers"],
    # dsmoe.hf: the "dsmoe" experts backend of transformers' MoE models (the registry API it uses
    # is the one measured with 5.23); peft for LoRA fine-tuning of those models
    extras_require={"hf": ["transformers>=5.23", "peft>=0.17"]},
    entry_points={"console_scripts": ["dsmoe=dsmoe.cli:main"]},
)
