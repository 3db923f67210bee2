// What the fused attention glue files share (fused.cpp, window.cpp): the dtype they compute in,
// and how many calls a GQA backward is split into to bound its temporaries.
#pragma once
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#include <cstdint>

namespace nsa_glue {

// Under CUDA autocast q, k, v may differ in dtype (bf16 projections, fp32 RoPE output): compute
// in autocast's dtype when the promoted type is fp32, as the lean functions do. The casts stay
// outside the autograd Functions so autograd routes each gradient back to its input's dtype.
inline at::ScalarType common_type(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  auto dt = at::promote_types(at::promote_types(q.scalar_type(), k.scalar_type()), v.scalar_type());
  if (q.is_cuda() && dt == at::kFloat && at::autocast::is_autocast_enabled(at::kCUDA)) {
    dt = at::autocast::get_autocast_dtype(at::kCUDA);
  }
  return dt;
}

// The backward of a GQA attention call over all H query heads holds temporaries that grow
// with S * H: flash attention's fp32 dQ accumulator and its dK / dV per query head before the
// group sum (6.4 GB at the paper shape and 64k), cuDNN's folded copies for the compressed
// branch (5.4 GB). Splitting the call into groups of whole KV heads bounds them by a set size
// each (window.cpp; 1 GiB unless nsa_fused_set_head_chunk_bytes changed it); the results are
// the same (heads are independent), only the launch count grows, so small problems stay in one
// call. Returns the number of calls (a divisor of Hkv, at most Hkv) for `bytes` of one call's
// temporaries, spread evenly over the KV heads.
int64_t kv_head_chunks(int64_t bytes, int64_t Hkv);

}  // namespace nsa_glue
