# torchguard_torch_has_cuda(<out-var>): 1 when the Torch package found is a CUDA build, else 0.
# A CPU-only LibTorch still ships the c10/cuda headers, so only the package can tell.
function(torchguard_torch_has_cuda out_var)
  if(TARGET torch_cuda OR TARGET c10_cuda OR CAFFE2_USE_CUDA)
    set(${out_var} 1 PARENT_SCOPE)
  else()
    set(${out_var} 0 PARENT_SCOPE)
  endif()
endfunction()
