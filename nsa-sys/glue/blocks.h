// The block-id rule every attention path agrees on (ARCHITECTURE.md, "NSA semantics"): ids
// handed to an attention path are deduplicated (a repeated id counts once) and ids outside
// [0, t / L] (or past the last key) are ignored.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
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
// ascending, and the slot (0 .. n) at which each of them holds j. Returns (tokens int32 [N],
// slots int32 [N], segment starts int64 [B * G * NB + 1]) with N = B * S * G * n: only the
// first starts[B * G * NB] = E entries are the index, the rest is padding no reader reaches.
// Fixed-size device work, no host synchronisation (nothing whose size depends on the data):
// invalid ids get the sentinel key B * G * NB, which a stable sort of all N keys puts last
// (each segment's tokens stay ascending: entries come in row-major (b, t, g, slot) order); the
// segment starts are a search of the sorted keys. Integer ops only, so deterministic.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> inverse_index_with_slots(
    const at::Tensor& ids, int64_t num_blocks) {
  TORCH_CHECK(ids.dim() == 4, "block ids must be [B, S, G, n]");
  int64_t B = ids.size(0), S = ids.size(1), G = ids.size(2), n = ids.size(3);
  auto ids64 = ids.to(at::kLong);
  auto opts = ids64.options();
  int64_t nseg = B * G * num_blocks;
  auto valid = ids64.ge(0).logical_and(ids64.lt(num_blocks));
  auto seg_key = (at::arange(B, opts).view({B, 1, 1, 1}) * G +
                  at::arange(G, opts).view({1, 1, G, 1})) * num_blocks + ids64;
  // The narrowest key type that holds the sentinel: a radix sort makes one pass per byte of
  // key (int16 keys at the training shapes: 2 passes instead of int64's 8).
  const auto key_type = nseg < INT16_MAX ? at::kShort : nseg < INT32_MAX ? at::kInt : at::kLong;
  auto keys = seg_key.masked_fill(valid.logical_not(), nseg).reshape({-1}).to(key_type);
  auto [sorted, order] = keys.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  // order indexes the row-major [B, S, G, n] entries: t = (i / (G n)) mod S, slot = i mod n.
  auto tokens = order.div(G * n, "floor").remainder(S).to(at::kInt).contiguous();
  auto slot_of = order.remainder(n).to(at::kInt).contiguous();
  auto starts = at::searchsorted(sorted, at::arange(nseg + 1, sorted.options())).contiguous();
  return {tokens, slot_of, starts};
}

// inverse_index_with_slots without the slots.
inline std::tuple<at::Tensor, at::Tensor> inverse_index(const at::Tensor& ids, int64_t num_blocks) {
  auto [tokens, slots, starts] = inverse_index_with_slots(ids, num_blocks);
  return {tokens, starts};
}

// An upper bound, from shapes alone, on the entries E of the inverse index of cleaned ids
// [B, S, G, n] with blocks of L keys: row t holds at most min(n, t / L + 1) distinct valid ids.
// The layer's own selection reaches it (it takes min(n, candidates) distinct blocks per row).
inline int64_t max_index_entries(int64_t B, int64_t S, int64_t G, int64_t n, int64_t L) {
  int64_t per_row_set = 0;
  for (int64_t j = 0; j * L < S; ++j) {
    per_row_set += std::min<int64_t>(n, j + 1) * (std::min<int64_t>(S, (j + 1) * L) - j * L);
  }
  return B * G * per_row_set;
}

// How the dK/dV kernel splits the inverse index's segments (starts int64 [nseg + 1]) into
// pieces of at most `piece` tokens, so that a block every token selects (block 0) is summed by
// many CTAs instead of one. Work items in segment order, pieces of a segment consecutive:
//   seg, a, b  int64 [W]: the piece's segment and its range of the token list; -1, 0, 0 for
//              the padding items past the real ones (the kernels return at once for them);
//   slot       int32 [W]: scratch slot of a piece of a split segment (segments of more than
//              one piece), -1 for a segment of one piece (written directly) and padding;
//   red_seg int64 [R], red_slot0, red_count int32 [R]: each split segment, its first slot
//              and its piece count (its pieces hold slots red_slot0 .. red_slot0 + count);
//              red_seg -1 past the real split segments;
//   slots: scratch slots to allocate.
// Every segment gets at least one work item (an empty one writes zero gradients).
// The sizes W, R and slots are upper bounds known from the shapes and `max_entries` (>= the
// index's E), so the plan is built on the device with no host synchronisation; the real
// items are those of the exact plan, in the same order:
//   W = nseg + max_entries / piece (a segment of c tokens has max(1, ceil(c / piece)) <=
//   1 + floor(c / piece) pieces); a split segment has c > piece, so there are at most
//   R = min(nseg, max_entries / (piece + 1)) of them, holding at most
//   slots = max_entries / piece + R pieces.
struct DkdvPlan {
  at::Tensor seg, a, b, slot, red_seg, red_slot0, red_count;
  int64_t slots;
};

inline DkdvPlan plan_dkdv(const at::Tensor& starts, int64_t piece, int64_t max_entries) {
  TORCH_CHECK(piece > 0, "piece must be positive");
  TORCH_CHECK(max_entries >= 0, "max_entries must not be negative");
  int64_t nseg = starts.numel() - 1;
  TORCH_CHECK(nseg >= 1, "the inverse index has no segment");
  auto opts = starts.options();
  auto counts = starts.narrow(0, 1, nseg) - starts.narrow(0, 0, nseg);
  auto pieces = counts.add(piece - 1).div(piece, "floor").clamp_min(1);
  auto ends = pieces.cumsum(0);  // inclusive: segment s owns work items [ends - pieces, ends)
  auto split = pieces.gt(1);
  // First scratch slot of each segment: exclusive scan of the split segments' pieces.
  auto split_pieces = pieces.mul(split);
  auto first_slot = split_pieces.cumsum(0) - split_pieces;
  DkdvPlan p;
  int64_t W = nseg + max_entries / piece;
  auto w = at::arange(W, opts);
  auto seg = at::searchsorted(ends, w, /*out_int32=*/false, /*right=*/true);
  auto pad = seg.ge(nseg);
  auto seg_c = seg.clamp_max(nseg - 1);
  auto local = w - (ends - pieces).index_select(0, seg_c);
  auto a = starts.index_select(0, seg_c) + local * piece;
  auto b = at::minimum(a + piece, starts.index_select(0, seg_c + 1));
  p.seg = seg.masked_fill(pad, -1).contiguous();
  p.a = a.masked_fill(pad, 0).contiguous();
  p.b = b.masked_fill(pad, 0).contiguous();
  auto split_w = split.index_select(0, seg_c).logical_and(pad.logical_not());
  p.slot = (first_slot.index_select(0, seg_c) + local)
               .masked_fill(split_w.logical_not(), -1)
               .to(at::kInt)
               .contiguous();
  int64_t R = std::min<int64_t>(nseg, max_entries / (piece + 1));
  p.slots = max_entries / piece + R;
  // The r-th split segment is the first whose running count of split segments exceeds r.
  auto r = at::arange(R, opts);
  auto rseg = at::searchsorted(split.to(at::kLong).cumsum(0), r, /*out_int32=*/false,
                               /*right=*/true);
  auto rpad = rseg.ge(nseg);
  auto rseg_c = rseg.clamp_max(nseg - 1);
  p.red_seg = rseg.masked_fill(rpad, -1).contiguous();
  p.red_slot0 = first_slot.index_select(0, rseg_c).masked_fill(rpad, 0).to(at::kInt).contiguous();
  p.red_count = pieces.index_select(0, rseg_c).masked_fill(rpad, 0).to(at::kInt).contiguous();
  return p;
}

}  // namespace nsa_glue
