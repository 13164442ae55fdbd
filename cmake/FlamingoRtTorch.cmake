# Locates libtorch for the C API library without Torch's own CMake config (which, for CUDA
# builds of torch, insists on a full CUDA toolkit even for CPU-only hosts).
#
#   FLAMINGO_RT_TORCH_DIR   the torch package folder (holding include/ and lib/); default:
#                           asked from Python3_EXECUTABLE (`import torch`)
#
# Defines the imported target flamingo_rt::torch (includes, libtorch, libtorch_cpu, libc10,
# the C++ ABI define, C++20) and FLAMINGO_RT_TORCH_FOUND.
set(FLAMINGO_RT_TORCH_FOUND OFF)
if(NOT FLAMINGO_RT_TORCH_DIR)
  find_package(Python3 COMPONENTS Interpreter QUIET)
  if(Python3_Interpreter_FOUND)
    execute_process(
      COMMAND ${Python3_EXECUTABLE} -c "import os, torch; print(os.path.dirname(torch.__file__)); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"
      OUTPUT_VARIABLE _frt_out OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _frt_rc ERROR_QUIET)
    if(_frt_rc EQUAL 0)
      string(REPLACE "\n" ";" _frt_lines "${_frt_out}")
      list(GET _frt_lines 0 FLAMINGO_RT_TORCH_DIR)
      list(GET _frt_lines 1 FLAMINGO_RT_TORCH_ABI)
    endif()
  endif()
endif()
if(NOT DEFINED FLAMINGO_RT_TORCH_ABI)
  set(FLAMINGO_RT_TORCH_ABI 1)
endif()
if(FLAMINGO_RT_TORCH_DIR AND EXISTS "${FLAMINGO_RT_TORCH_DIR}/include/torch/library.h")
  find_library(_frt_torch torch PATHS "${FLAMINGO_RT_TORCH_DIR}/lib" NO_DEFAULT_PATH)
  find_library(_frt_torch_cpu torch_cpu PATHS "${FLAMINGO_RT_TORCH_DIR}/lib" NO_DEFAULT_PATH)
  find_library(_frt_c10 c10 PATHS "${FLAMINGO_RT_TORCH_DIR}/lib" NO_DEFAULT_PATH)
  if(_frt_torch AND _frt_torch_cpu AND _frt_c10)
    add_library(flamingo_rt_torch INTERFACE)
    add_library(flamingo_rt::torch ALIAS flamingo_rt_torch)
    target_include_directories(flamingo_rt_torch SYSTEM INTERFACE
      "${FLAMINGO_RT_TORCH_DIR}/include" "${FLAMINGO_RT_TORCH_DIR}/include/torch/csrc/api/include")
    target_link_libraries(flamingo_rt_torch INTERFACE "-Wl,--no-as-needed" ${_frt_torch} ${_frt_torch_cpu} ${_frt_c10}
                          "-Wl,--as-needed")
    target_compile_definitions(flamingo_rt_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${FLAMINGO_RT_TORCH_ABI})
    target_compile_features(flamingo_rt_torch INTERFACE cxx_std_20)
    set(FLAMINGO_RT_TORCH_FOUND ON)
    set(FLAMINGO_RT_TORCH_LIBDIR "${FLAMINGO_RT_TORCH_DIR}/lib")
  endif()
endif()
