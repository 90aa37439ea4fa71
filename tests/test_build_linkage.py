"""dsmoe's binaries use the shared libstdc++ that torch uses, never a static copy of their own.

On the first H200 runs the image's compiler (/opt/gcc, whose library folder holds libstdc++.a
and no libstdc++.so) linked a static libstdc++ into _C.so, and every TORCH_CHECK of the extension
ended the process with a segmentation fault instead of raising. setup.py and CMake now link
libstdc++.so.6 by name; these tests check the built artifacts and the fix on such a toolchain.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dsmoe

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF linkage is Linux's")

SHARED_LIBSTDCXX = "-l:libstdc++.so.6"  # what setup.py and cmake/dsmoe_torch.cmake add


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} (binutils) is needed to inspect dsmoe's shared libraries"
    return path


def needed_libraries(path: Path) -> list[str]:
    out = subprocess.run([_tool("readelf"), "-d", str(path)], capture_output=True, text=True, check=True).stdout
    return [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


def defines_symbol(path: Path, name: str) -> bool:
    out = subprocess.run([_tool("nm"), "-D", "--defined-only", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return any(line.split()[-1] == name for line in out.splitlines() if line.strip())


def assert_shared_libstdcxx(path: Path) -> None:
    assert "libstdc++.so.6" in needed_libraries(path), f"{path} does not load libstdc++.so.6"
    # A static libstdc++ brings its own exception machinery: __cxa_throw defined in the library.
    assert not defines_symbol(path, "__cxa_throw"), f"{path} carries a static copy of libstdc++"


def test_extension_links_the_shared_libstdcxx():
    import dsmoe._C as extension

    assert_shared_libstdcxx(Path(extension.__file__))


def test_extension_errors_raise_in_this_process():
    # In the statically linked build this ended the process (SIGSEGV) instead of raising.
    import torch

    with pytest.raises(RuntimeError, match="gate_up.size"):
        dsmoe.ops.swiglu(torch.randn(3, 3))


def test_static_only_toolchain_gets_the_shared_libstdcxx(tmp_path):
    """A toolchain folder with only libstdc++.a, searched first (as -B adds it), links the static
    copy by default; the flag setup.py and CMake pass makes the link shared again."""
    cxx = _tool("g++")
    static = subprocess.run([cxx, "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    assert Path(static).is_file(), f"g++ has no libstdc++.a to build the static-only toolchain ({static!r})"
    toolchain = tmp_path / "toolchain"
    toolchain.mkdir()
    (toolchain / "libstdc++.a").symlink_to(static)
    source = tmp_path / "thrower.cpp"
    source.write_text('#include <stdexcept>\nvoid dsmoe_throw() { throw std::runtime_error("x"); }\n')

    def link(*extra: str) -> Path:
        out = tmp_path / f"thrower{len(extra)}.so"
        subprocess.run([cxx, f"-B{toolchain}", "-shared", "-fPIC", str(source), "-o", str(out), *extra],
                       check=True, capture_output=True, text=True)
        return out

    static_build = link()
    assert defines_symbol(static_build, "__cxa_throw"), "the static-only toolchain did not reproduce the fault"
    assert "libstdc++.so.6" not in needed_libraries(static_build)
    assert_shared_libstdcxx(link(SHARED_LIBSTDCXX))


def test_build_files_pass_the_flag():
    root = Path(__file__).resolve().parents[1]
    assert f'"{SHARED_LIBSTDCXX}"' in (root / "setup.py").read_text()
    assert f'"{SHARED_LIBSTDCXX}"' in (root / "cmake" / "dsmoe_torch.cmake").read_text()
