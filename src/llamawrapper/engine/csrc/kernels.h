// The kernels' entry points that other files of the build call directly: decode_layers.cpp runs a
// decode step's layers through them with no Python between the calls. Each is defined (and bound to
// Python or registered as an operator) in the file named beside it.
#pragma once

#include <torch/extension.h>

#include <optional>

namespace llamawrapper {

// decode_layer.cpp: h += delta (if given, in place), then the RMS norm of each row
torch::Tensor add_rms_norm(torch::Tensor h, std::optional<torch::Tensor> delta, torch::Tensor weight, double eps);

// decode_attention.cpp: a decode step's RoPE, cache write and attention after the fused q/k/v projection
torch::Tensor rope_write_attention(torch::Tensor y, torch::Tensor cos, torch::Tensor sin, torch::Tensor k, torch::Tensor v,
                                   torch::Tensor positions, int64_t H, std::optional<torch::Tensor> src,
                                   std::optional<torch::Tensor> shared);

// the matmuls over weights laid out in blocks of 64 output channels: f32_rows.cpp, int8_weights.cpp, int4_rows.cpp
torch::Tensor f32_rows_mm(torch::Tensor x, torch::Tensor blocks);
torch::Tensor bf16_rows_mm(torch::Tensor x, torch::Tensor blocks);
torch::Tensor int8_rows_mm(torch::Tensor x, torch::Tensor blocks, torch::Tensor scales);
torch::Tensor int4_rows_mm(torch::Tensor x, torch::Tensor blocks, torch::Tensor scales_and_zeros, int64_t group_size);

}  // namespace llamawrapper
