// The block-id rule every attention path agrees on (ARCHITECTURE.md, "NSA semantics"): ids
// handed to an attention path are deduplicated (a repeated id counts once) and ids outside
// [0, t / L] (or past the last key) are ignored.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace nsa_glue {

// blocks [B, S, G, n] (any integer type, any device) -> int64 [B, S, G, n] on the same device,
// contiguous: each row's distinct valid ids in descending order, then -1. Comparisons are done
// against floor(t / L) (not j * L) so that huge ids cannot overflow into "valid".
inline at::Tensor clean_block_ids(const at::Tensor& blocks, int64_t block_len, int64_t num_keys) {
  TORCH_CHECK(blocks.dim() == 4, "block ids must be [B, S, G, n]");
  TORCH_CHECK(block_len > 0, "block length must be positive");
  int64_t S = blocks.size(1), n = blocks.size(3);
  auto blk = blocks.to(at::kLong);
  auto last_key_block = (std::max<int64_t>(num_keys, 1) - 1) / block_len;
  auto t_block = at::arange(S, blk.options()).div(block_len, "floor").clamp_max(last_key_block);
  auto invalid = blk.lt(0).logical_or(blk.gt(t_block.view({1, S, 1, 1})));
  if (num_keys <= 0) invalid = at::ones_like(invalid);
  blk = blk.masked_fill(invalid, -1);
  blk = std::get<0>(blk.sort(-1, /*descending=*/true));
  if (n > 1) {
    auto later = blk.narrow(3, 1, n - 1);
    auto dup = later.eq(blk.narrow(3, 0, n - 1)).logical_and(later.ge(0));
    dup = at::cat({at::zeros_like(dup.narrow(3, 0, 1)), dup}, 3);
    blk = std::get<0>(blk.masked_fill(dup, -1).sort(-1, /*descending=*/true));
  }
  return blk.contiguous();
}

}  // namespace nsa_glue
