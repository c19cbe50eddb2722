// Argument checks that the CPU and CUDA kernels share (host code).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace din {

// act_weights of an MLP with n hidden layers: one tensor per layer when the activation has weights (prelu, dice;
// their shapes are checked by the kernel); for sigmoid/relu none: an empty list, or one empty tensor per hidden
// layer (the form an AOTInductor package passes, as it cannot pass an empty Tensor[]).
inline void check_act_weights(at::TensorList act_weights, int64_t n, bool uses_alpha) {
  const int64_t count = static_cast<int64_t>(act_weights.size());
  if (uses_alpha) {
    TORCH_CHECK(count == n, "target_attention: activation needs ", n, " act_weights (one per hidden layer), got ",
                count);
    return;
  }
  bool placeholders = count == n;
  for (const at::Tensor& a : act_weights) placeholders = placeholders && a.numel() == 0;
  TORCH_CHECK(count == 0 || placeholders, "target_attention: sigmoid/relu take no act_weights (an empty list, or one ",
              "empty tensor per hidden layer: ", n, "), got ", count, " tensors");
}

}  // namespace din
