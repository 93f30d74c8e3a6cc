# How torchguard fits the LibTorch package found: shared by torchguard's own build and by the
# installed torchguardConfig.cmake, which runs it again against the consumer's Torch.

# torchguard_torch_has_cuda(<out-var>): 1 when the Torch package found is a CUDA build, else 0.
# A CPU-only LibTorch still ships the c10/cuda headers, so only the package can tell.
function(torchguard_torch_has_cuda out_var)
  if(TARGET torch_cuda OR TARGET c10_cuda OR CAFFE2_USE_CUDA)
    set(${out_var} 1 PARENT_SCOPE)
  else()
    set(${out_var} 0 PARENT_SCOPE)
  endif()
endfunction()

# torchguard_spdlog_fmt_dir(<shim-dir> <out-var>): LibTorch 2.x wheels ship their own fmt headers
# (a newer fmt than the one spdlog was built against), and their include directory would shadow
# spdlog's. When that is so, makes <shim-dir>/fmt a link to spdlog's fmt headers and returns
# <shim-dir>, to be put on the include path ahead of Torch's; otherwise returns "".
function(torchguard_spdlog_fmt_dir shim_dir out_var)
  set(${out_var} "" PARENT_SCOPE)
  if(NOT TARGET fmt::fmt)
    return()  # spdlog with its bundled fmt: nothing to shadow
  endif()
  get_target_property(fmt_includes fmt::fmt INTERFACE_INCLUDE_DIRECTORIES)
  get_target_property(torch_includes torch INTERFACE_INCLUDE_DIRECTORIES)
  set(spdlog_fmt "")
  foreach(dir IN LISTS fmt_includes)
    if(EXISTS "${dir}/fmt/format.h")
      set(spdlog_fmt "${dir}/fmt")
      break()
    endif()
  endforeach()
  if(NOT spdlog_fmt)
    return()
  endif()
  foreach(dir IN LISTS torch_includes)
    if(EXISTS "${dir}/fmt/format.h" AND NOT "${dir}/fmt" STREQUAL spdlog_fmt)
      file(MAKE_DIRECTORY "${shim_dir}")
      file(CREATE_LINK "${spdlog_fmt}" "${shim_dir}/fmt" SYMBOLIC)
      set(${out_var} "${shim_dir}" PARENT_SCOPE)
      return()
    endif()
  endforeach()
endfunction()
