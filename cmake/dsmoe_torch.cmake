# Finds torch through the Python interpreter that has it, decides whether the CUDA kernels are
# built (same rule as setup.py's DSMOE_CUDA), and prepares everything find_package(Torch) needs
# for a CUDA build of torch. The GPU is never asked: the archs come from TORCH_CUDA_ARCH_LIST.
#
# Sets: DSMOE_PYTHON, DSMOE_TORCH_VERSION, DSMOE_TORCH_HAS_CUDA, DSMOE_WITH_CUDA,
# DSMOE_CUDA_ARCHS, DSMOE_NVIDIA_INCLUDE_DIRS, DSMOE_NVIDIA_LIBRARY_DIRS, DSMOE_CUTLASS_INCLUDE_DIR,
# imports Torch (TORCH_LIBRARIES, target torch) and defines the target dsmoe_openmp.

# --- the interpreter -----------------------------------------------------------------------
set(DSMOE_PYTHON "" CACHE FILEPATH
    "Python interpreter whose torch is built against (default: Python_EXECUTABLE, else python3 on PATH)")
if(NOT DSMOE_PYTHON)
  if(Python_EXECUTABLE)
    set(DSMOE_PYTHON "${Python_EXECUTABLE}" CACHE FILEPATH "" FORCE)
  else()
    find_program(_dsmoe_python NAMES python3 python REQUIRED)
    set(DSMOE_PYTHON "${_dsmoe_python}" CACHE FILEPATH "" FORCE)
  endif()
endif()

# One call answers every question about this torch. Lines: key=value.
set(_dsmoe_probe [=[
import os, sys, sysconfig
import torch
print("prefix=" + torch.utils.cmake_prefix_path)
print("version=" + torch.__version__)
print("cuda=" + (torch.version.cuda or ""))
# cuBLAS & co. headers and libraries of the nvidia-* wheels (torch's CUDA wheel depends on them)
roots = []
for entry in [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]] + sys.path:
    if entry and os.path.isdir(entry) and entry not in roots:
        roots.append(entry)
for root in roots:
    for sub in ("nvidia/cu13", "nvidia/cu12"):
        base = os.path.join(root, sub)
        if os.path.isdir(os.path.join(base, "include")):
            print("nvidia_include=" + os.path.join(base, "include"))
        if os.path.isdir(os.path.join(base, "lib")):
            print("nvidia_lib=" + os.path.join(base, "lib"))
try:
    import cutlass_library
    include = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    if os.path.isfile(os.path.join(include, "cutlass", "cutlass.h")):
        print("cutlass=" + include)
except ImportError:
    pass
]=])
execute_process(
  COMMAND "${DSMOE_PYTHON}" -c "${_dsmoe_probe}"
  OUTPUT_VARIABLE _dsmoe_probe_out
  ERROR_VARIABLE _dsmoe_probe_err
  RESULT_VARIABLE _dsmoe_probe_rc)
if(NOT _dsmoe_probe_rc EQUAL 0)
  message(FATAL_ERROR
    "dsmoe: cannot import torch with DSMOE_PYTHON=${DSMOE_PYTHON} (pass -DDSMOE_PYTHON=<python "
    "that has torch>):\n${_dsmoe_probe_err}")
endif()
set(_dsmoe_torch_prefix "")
set(DSMOE_TORCH_VERSION "")
set(_dsmoe_torch_cuda "")
set(DSMOE_NVIDIA_INCLUDE_DIRS "")
set(DSMOE_NVIDIA_LIBRARY_DIRS "")
set(_dsmoe_cutlass_from_python "")
string(REPLACE "\n" ";" _dsmoe_probe_lines "${_dsmoe_probe_out}")
foreach(_line IN LISTS _dsmoe_probe_lines)
  if(_line MATCHES "^prefix=(.*)$")
    set(_dsmoe_torch_prefix "${CMAKE_MATCH_1}")
  elseif(_line MATCHES "^version=(.*)$")
    set(DSMOE_TORCH_VERSION "${CMAKE_MATCH_1}")
  elseif(_line MATCHES "^cuda=(.*)$")
    set(_dsmoe_torch_cuda "${CMAKE_MATCH_1}")
  elseif(_line MATCHES "^nvidia_include=(.*)$")
    list(APPEND DSMOE_NVIDIA_INCLUDE_DIRS "${CMAKE_MATCH_1}")
  elseif(_line MATCHES "^nvidia_lib=(.*)$")
    list(APPEND DSMOE_NVIDIA_LIBRARY_DIRS "${CMAKE_MATCH_1}")
  elseif(_line MATCHES "^cutlass=(.*)$")
    set(_dsmoe_cutlass_from_python "${CMAKE_MATCH_1}")
  endif()
endforeach()
list(REMOVE_DUPLICATES DSMOE_NVIDIA_INCLUDE_DIRS)
list(REMOVE_DUPLICATES DSMOE_NVIDIA_LIBRARY_DIRS)
if(_dsmoe_torch_cuda STREQUAL "")
  set(DSMOE_TORCH_HAS_CUDA OFF)
else()
  set(DSMOE_TORCH_HAS_CUDA ON)
endif()
message(STATUS "dsmoe: torch ${DSMOE_TORCH_VERSION} from ${DSMOE_PYTHON} "
               "(CUDA: ${DSMOE_TORCH_HAS_CUDA} ${_dsmoe_torch_cuda})")

# --- the CUDA toolkit: the first of CUDAToolkit_ROOT (or CUDA_TOOLKIT_ROOT_DIR), $CUDA_HOME,
# $CUDA_PATH, nvcc on PATH and /usr/local/cuda that holds bin/nvcc and include/cuda_runtime.h
# (nvcc on PATH may be a wrapper script in /usr/local/bin, whose parent is no toolkit). -----------
function(_dsmoe_is_toolkit dir out)
  if(dir AND EXISTS "${dir}/bin/nvcc" AND EXISTS "${dir}/include/cuda_runtime.h")
    set(${out} TRUE PARENT_SCOPE)
  else()
    set(${out} FALSE PARENT_SCOPE)
  endif()
endfunction()
set(_dsmoe_cuda_root "")
if(NOT CUDAToolkit_ROOT AND CUDA_TOOLKIT_ROOT_DIR)  # FindCUDA's name for it, as torch's docs use
  set(CUDAToolkit_ROOT "${CUDA_TOOLKIT_ROOT_DIR}")
endif()
if(CUDAToolkit_ROOT)
  _dsmoe_is_toolkit("${CUDAToolkit_ROOT}" _ok)
  if(NOT _ok)
    message(FATAL_ERROR "dsmoe: CUDAToolkit_ROOT=${CUDAToolkit_ROOT} has no bin/nvcc and include/cuda_runtime.h")
  endif()
  set(_dsmoe_cuda_root "${CUDAToolkit_ROOT}")
else()
  set(_candidates "$ENV{CUDA_HOME}" "$ENV{CUDA_PATH}")
  find_program(_dsmoe_nvcc nvcc)
  if(_dsmoe_nvcc)
    get_filename_component(_dsmoe_nvcc_real "${_dsmoe_nvcc}" REALPATH)
    get_filename_component(_dir "${_dsmoe_nvcc_real}" DIRECTORY)
    get_filename_component(_dir "${_dir}" DIRECTORY)
    list(APPEND _candidates "${_dir}")
  endif()
  list(APPEND _candidates "/usr/local/cuda")
  foreach(_dir IN LISTS _candidates)
    _dsmoe_is_toolkit("${_dir}" _ok)
    if(_ok)
      set(_dsmoe_cuda_root "${_dir}")
      break()
    endif()
  endforeach()
endif()

# --- DSMOE_CUDA: AUTO (torch has CUDA and nvcc is found), ON, OFF --------------------------------
if(DEFINED ENV{DSMOE_CUDA})
  set(_dsmoe_cuda_default "$ENV{DSMOE_CUDA}")
else()
  set(_dsmoe_cuda_default "AUTO")
endif()
set(DSMOE_CUDA "${_dsmoe_cuda_default}" CACHE STRING
    "Build the CUDA kernels: AUTO (when torch has CUDA and nvcc is found), ON, OFF")
set_property(CACHE DSMOE_CUDA PROPERTY STRINGS AUTO ON OFF)
string(TOUPPER "${DSMOE_CUDA}" _dsmoe_cuda_choice)
if(_dsmoe_cuda_choice MATCHES "^(AUTO|)$")
  if(DSMOE_TORCH_HAS_CUDA AND _dsmoe_cuda_root)
    set(DSMOE_WITH_CUDA ON)
  else()
    set(DSMOE_WITH_CUDA OFF)
  endif()
elseif(_dsmoe_cuda_choice MATCHES "^(ON|1|TRUE|YES)$")
  if(NOT DSMOE_TORCH_HAS_CUDA)
    message(FATAL_ERROR
      "dsmoe: DSMOE_CUDA=ON but torch ${DSMOE_TORCH_VERSION} (${DSMOE_PYTHON}) has no CUDA; "
      "install a CUDA build of torch or configure with -DDSMOE_CUDA=OFF")
  endif()
  if(NOT _dsmoe_cuda_root)
    message(FATAL_ERROR
      "dsmoe: DSMOE_CUDA=ON but nvcc was not found; install the CUDA toolkit (nvcc) and pass "
      "-DCUDAToolkit_ROOT=<toolkit dir> or set CUDA_HOME")
  endif()
  set(DSMOE_WITH_CUDA ON)
elseif(_dsmoe_cuda_choice MATCHES "^(OFF|0|FALSE|NO)$")
  set(DSMOE_WITH_CUDA OFF)
else()
  message(FATAL_ERROR "dsmoe: DSMOE_CUDA must be AUTO, ON or OFF, got '${DSMOE_CUDA}'")
endif()

# --- what a CUDA build of torch needs before find_package(Torch), even for CPU-only dsmoe -------
set(TORCH_CUDA_ARCH_LIST "" CACHE STRING "CUDA archs to compile for (default 8.0;9.0a; the GPU is never asked)")
if(NOT TORCH_CUDA_ARCH_LIST)
  if(DEFINED ENV{TORCH_CUDA_ARCH_LIST} AND NOT "$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
    set(TORCH_CUDA_ARCH_LIST "$ENV{TORCH_CUDA_ARCH_LIST}" CACHE STRING "" FORCE)
  else()
    set(TORCH_CUDA_ARCH_LIST "8.0;9.0a" CACHE STRING "" FORCE)
  endif()
endif()
# torch's cmake reads archs separated by ';' or spaces, as the environment variable allows.
string(REGEX REPLACE "[ \t]+" ";" _dsmoe_archs "${TORCH_CUDA_ARCH_LIST}")
string(REPLACE ";" " " _dsmoe_archs_spaced "${_dsmoe_archs}")
set(DSMOE_CUDA_ARCHS "")
if(DSMOE_WITH_CUDA)
  list(JOIN _dsmoe_archs ";" DSMOE_CUDA_ARCHS)
endif()

if(DSMOE_TORCH_HAS_CUDA)
  if(NOT _dsmoe_cuda_root)
    message(FATAL_ERROR
      "dsmoe: torch ${DSMOE_TORCH_VERSION} is a CUDA build and its CMake package needs the CUDA "
      "toolkit (nvcc), which was not found. Install it and pass -DCUDAToolkit_ROOT=<toolkit dir> "
      "(or set CUDA_HOME), or configure against a CPU build of torch (-DDSMOE_PYTHON=...).")
  endif()
  set(CUDAToolkit_ROOT "${_dsmoe_cuda_root}" CACHE PATH "CUDA toolkit root")
  set(CUDA_TOOLKIT_ROOT_DIR "${_dsmoe_cuda_root}" CACHE PATH "CUDA toolkit root (FindCUDA)")
  if(NOT CMAKE_CUDA_COMPILER)
    set(CMAKE_CUDA_COMPILER "${_dsmoe_cuda_root}/bin/nvcc" CACHE FILEPATH "")
  endif()
  # A toolkit from pip has no nvrtc of its own; torch's wheel brings one in nvidia/cu13/lib.
  if(NOT CUDA_nvrtc_LIBRARY)
    find_library(CUDA_nvrtc_LIBRARY
      NAMES nvrtc libnvrtc.so.13 libnvrtc.so.12
      HINTS "${_dsmoe_cuda_root}/lib64" "${_dsmoe_cuda_root}/lib" ${DSMOE_NVIDIA_LIBRARY_DIRS}
      NO_DEFAULT_PATH)
  endif()
  # torch's cmake turns the list into -gencode flags itself (and would probe the GPU without it).
  set(TORCH_CUDA_ARCH_LIST "${_dsmoe_archs}")
  set(ENV{TORCH_CUDA_ARCH_LIST} "${_dsmoe_archs_spaced}")
endif()

list(PREPEND CMAKE_PREFIX_PATH "${_dsmoe_torch_prefix}")
# torch's cmake enables CUDA itself and warns when CMAKE_CUDA_ARCHITECTURES is set, which CMake
# does on enable_language(CUDA) under CMP0104: keep it unset there, then off (the -gencode flags
# torch derives from TORCH_CUDA_ARCH_LIST are the only arch flags).
cmake_policy(PUSH)
cmake_policy(SET CMP0104 OLD)
find_package(Torch REQUIRED CONFIG)
cmake_policy(POP)
if(DSMOE_TORCH_HAS_CUDA)
  set(CMAKE_CUDA_ARCHITECTURES OFF)
  # CMake 3.25 knows no C++20 flag for nvcc (nvcc 12+ takes -std=c++20); torch's headers need it.
  if(NOT DEFINED CMAKE_CUDA20_STANDARD_COMPILE_OPTION
     AND CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 12.0)
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  endif()
endif()

# --- CUTLASS headers (only used by the CUDA kernels) ----------------------------------------------
set(CUTLASS_DIR "$ENV{CUTLASS_DIR}" CACHE PATH "CUTLASS source tree (default: the nvidia-cutlass package's headers)")
set(DSMOE_CUTLASS_INCLUDE_DIR "")
if(CUTLASS_DIR)
  if(NOT EXISTS "${CUTLASS_DIR}/include/cutlass/cutlass.h")
    message(FATAL_ERROR "dsmoe: CUTLASS_DIR=${CUTLASS_DIR} has no include/cutlass/cutlass.h")
  endif()
  set(DSMOE_CUTLASS_INCLUDE_DIR "${CUTLASS_DIR}/include")
elseif(_dsmoe_cutlass_from_python)
  set(DSMOE_CUTLASS_INCLUDE_DIR "${_dsmoe_cutlass_from_python}")
endif()

# --- OpenMP: at::parallel_for is an inline `#pragma omp parallel`, so kernels need -fopenmp. ------
# Link the libgomp that torch ships when it ships one, so the process has one OpenMP runtime (the
# system copy has the same soname and would be shadowed by torch/lib at run time anyway).
find_package(OpenMP REQUIRED COMPONENTS CXX)
add_library(dsmoe_openmp INTERFACE)
target_compile_options(dsmoe_openmp INTERFACE $<$<COMPILE_LANGUAGE:CXX>:${OpenMP_CXX_FLAGS}>)
if(EXISTS "${TORCH_INSTALL_PREFIX}/lib/libgomp.so.1" AND CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
  target_link_libraries(dsmoe_openmp INTERFACE "${TORCH_INSTALL_PREFIX}/lib/libgomp.so.1")
else()
  target_link_libraries(dsmoe_openmp INTERFACE OpenMP::OpenMP_CXX)
endif()

# --- libstdc++: link the shared one, which torch uses. A toolchain whose own library folder holds
# only libstdc++.a (the H200 image's /opt/gcc) links a second, static copy otherwise, and then every
# C++ exception thrown in dsmoe code (each TORCH_CHECK) crashes the process instead of raising.
if(CMAKE_SYSTEM_NAME STREQUAL "Linux")
  list(APPEND TORCH_LIBRARIES "-l:libstdc++.so.6")
endif()
