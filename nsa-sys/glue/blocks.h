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

// The inverse index of cleaned ids (clean_block_ids' output, any integer type) [B, S, G, n]
// over NB blocks: for every segment (b, g, j), in that order, the tokens t that selected block j,
// ascending, and the slot (0 .. n) at which each of them holds j. Returns (tokens int32 [E],
// slots int32 [E], segment starts int64 [B * G * NB + 1]). Integer ops only (a stable sort of
// the segment keys, a count by bincount and a scan by cumsum), so the result is deterministic
// on every device.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> inverse_index_with_slots(
    const at::Tensor& ids, int64_t num_blocks) {
  TORCH_CHECK(ids.dim() == 4, "block ids must be [B, S, G, n]");
  int64_t B = ids.size(0), S = ids.size(1), G = ids.size(2), n = ids.size(3);
  auto ids64 = ids.to(at::kLong);
  auto valid = ids64.ge(0);
  auto opts = ids64.options();
  // Entries come in row-major (b, t, g, slot) order; a stable sort by segment keeps each
  // segment's tokens ascending.
  auto seg_key = (at::arange(B, opts).view({B, 1, 1, 1}) * G +
                  at::arange(G, opts).view({1, 1, G, 1})) * num_blocks + ids64;
  auto keys = seg_key.masked_select(valid);
  auto toks = at::arange(S, opts).view({1, S, 1, 1}).expand_as(ids64).masked_select(valid);
  auto slots = at::arange(n, opts).view({1, 1, 1, n}).expand_as(ids64).masked_select(valid);
  auto order = std::get<1>(keys.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
  auto tokens = toks.index_select(0, order).to(at::kInt).contiguous();
  auto slot_of = slots.index_select(0, order).to(at::kInt).contiguous();
  auto counts = at::bincount(keys, {}, B * G * num_blocks);
  auto starts = at::cat({at::zeros({1}, opts), counts.cumsum(0)}).contiguous();
  return {tokens, slot_of, starts};
}

// inverse_index_with_slots without the slots.
inline std::tuple<at::Tensor, at::Tensor> inverse_index(const at::Tensor& ids, int64_t num_blocks) {
  auto [tokens, slots, starts] = inverse_index_with_slots(ids, num_blocks);
  return {tokens, starts};
}

// How the dK/dV kernel splits the inverse index's segments (starts int64 [nseg + 1]) into
// pieces of at most `piece` tokens, so that a block every token selects (block 0) is summed by
// many CTAs instead of one. Work items in segment order, pieces of a segment consecutive:
//   seg, a, b  int64 [W]: the piece's segment and its range of the token list;
//   slot       int32 [W]: scratch slot of a piece of a split segment (segments of more than
//              one piece), -1 for a segment of one piece (written directly);
//   red_seg int64 [R], red_slot0, red_count int32 [R]: each split segment, its first slot
//              and its piece count (its pieces hold slots red_slot0 .. red_slot0 + count);
//   slots: the number of scratch slots.
// Every segment gets at least one work item (an empty one writes zero gradients).
struct DkdvPlan {
  at::Tensor seg, a, b, slot, red_seg, red_slot0, red_count;
  int64_t slots;
};

inline DkdvPlan plan_dkdv(const at::Tensor& starts, int64_t piece) {
  TORCH_CHECK(piece > 0, "piece must be positive");
  int64_t nseg = starts.numel() - 1;
  auto opts = starts.options();
  auto counts = starts.narrow(0, 1, nseg) - starts.narrow(0, 0, nseg);
  auto pieces = counts.add(piece - 1).div(piece, "floor").clamp_min(1);
  auto ends = pieces.cumsum(0);
  int64_t W = ends[nseg - 1].item<int64_t>();
  auto seg_ids = at::arange(nseg, opts);
  DkdvPlan p;
  p.seg = at::repeat_interleave(seg_ids, pieces, 0, W).contiguous();
  auto local = at::arange(W, opts) - (ends - pieces).index_select(0, p.seg);
  p.a = (starts.index_select(0, p.seg) + local * piece).contiguous();
  p.b = at::minimum(p.a + piece, starts.index_select(0, p.seg + 1)).contiguous();
  auto split = pieces.gt(1);
  auto split_w = split.index_select(0, p.seg);
  p.slot = (split_w.to(at::kLong).cumsum(0) - 1).masked_fill(split_w.logical_not(), -1)
               .to(at::kInt)
               .contiguous();
  p.slots = split_w.sum().item<int64_t>();
  p.red_seg = seg_ids.masked_select(split).contiguous();
  auto split_pieces = pieces.masked_select(split);
  p.red_slot0 = (split_pieces.cumsum(0) - split_pieces).to(at::kInt).contiguous();
  p.red_count = split_pieces.to(at::kInt).contiguous();
  return p;
}

}  // namespace nsa_glue
