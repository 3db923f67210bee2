// The compressed branch (Eq. 7) on cuDNN's fused attention, by folding queries.
//
// Query t = l - 1 + j * d + r (0 <= r < d) sees exactly the compressed tokens 0 .. j (token i
// is visible iff i * d + l - 1 <= t), so the d queries of fold j see the same tokens. They
// become d more query heads of one folded row j, and the branch is plain causal attention of
// m = ceil((S - l + 1) / d) folded rows over the first m compressed tokens (m is Nc, the count
// the layer compresses), with d * G query heads per key head: cuDNN's GQA, dk != dv allowed.
// Folded head (g, r, h) = (g * d + r) * G + h, so that head / (d * G) is the key head g.
// Rows t < l - 1 see nothing: output 0 and lse +inf, as the compressed kernels write.
//
// Layouts: q [B, S, H, dk], ck [B, Nc, Hkv, dk], cv [B, Nc, Hkv, dv] (nsa's); folded q, out,
// dout [B, Hkv * d * G, m, D] contiguous; folded keys and values are transposed views
// [B, Hkv, m, D] of ck and cv. Folding costs one copy of q (and of out, dout in the backward);
// the padded rows of the last fold (t >= S) are zeros and never unfolded.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace cmp_cudnn {

using at::Tensor;

// Folded rows m: ceil((S - l + 1) / d), 0 when no query sees a compressed token.
inline int64_t folds(int64_t S, int64_t cl, int64_t cd) {
  return S < cl ? 0 : (S - cl + cd) / cd;
}

// x [B, S, H, D] -> [B, Hkv * d * G, m, D] contiguous, in one strided copy.
inline Tensor fold(const Tensor& x, int64_t cl, int64_t cd, int64_t Hkv, int64_t m) {
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), D = x.size(3), G = H / Hkv;
  auto dst = at::empty({B, Hkv, cd, G, m, D}, x.options());
  auto d6 = dst.permute({0, 4, 2, 1, 3, 5});  // [B, m, d, Hkv, G, D]
  const int64_t rows = S - cl + 1, full = rows / cd, rem = rows % cd;
  if (full > 0) {
    d6.narrow(1, 0, full).copy_(x.narrow(1, cl - 1, full * cd).view({B, full, cd, Hkv, G, D}));
  }
  if (rem > 0) {
    auto last = d6.narrow(1, full, 1);
    last.narrow(2, 0, rem).copy_(x.narrow(1, cl - 1 + full * cd, rem).view({B, 1, rem, Hkv, G, D}));
    last.narrow(2, rem, cd - rem).zero_();
  }
  return dst.view({B, Hkv * cd * G, m, D});
}

// y [B, Hkv * d * G, m, D] (any strides with a uniform head stride) -> [B, S, H, D], rows
// t < l - 1 set to `fill`.
inline Tensor unfold(const Tensor& y, int64_t S, int64_t H, int64_t cl, int64_t cd,
                     int64_t Hkv, double fill) {
  const int64_t B = y.size(0), m = y.size(2), D = y.size(3), G = H / Hkv;
  auto out = at::empty({B, S, H, D}, y.options());
  const int64_t blind = std::min<int64_t>(S, cl - 1);
  if (blind > 0) out.narrow(1, 0, blind).fill_(fill);
  if (m == 0) return out;
  auto y6 = y.reshape({B, Hkv, cd, G, m, D}).permute({0, 4, 2, 1, 3, 5});  // [B, m, d, Hkv, G, D]
  const int64_t rows = S - cl + 1, full = rows / cd, rem = rows % cd;
  if (full > 0) {
    out.narrow(1, cl - 1, full * cd).view({B, full, cd, Hkv, G, D}).copy_(y6.narrow(1, 0, full));
  }
  if (rem > 0) {
    out.narrow(1, cl - 1 + full * cd, rem)
        .view({B, 1, rem, Hkv, G, D})
        .copy_(y6.narrow(1, full, 1).narrow(2, 0, rem));
  }
  return out;
}

// What the backward needs besides nsa's own (q, ck, cv, out): cuDNN's folded lse and its
// (unused, dropout-free) philox state.
struct Saved {
  Tensor lse_folded, seed, offset;
};

// Forward: out [B, S, H, dv] and lse fp32 [B, S, H] (natural log of the scaled scores), plus
// what the backward needs. bf16 inputs, aligned; ck holds at least m tokens.
inline std::tuple<Tensor, Tensor, Saved> forward(const Tensor& q, const Tensor& ck,
                                                 const Tensor& cv, int64_t cl, int64_t cd,
                                                 double scale) {
  const int64_t B = q.size(0), S = q.size(1), H = q.size(2), Hkv = ck.size(2), dv = cv.size(3);
  const int64_t m = folds(S, cl, cd);
  if (m == 0) {
    return {at::zeros({B, S, H, dv}, cv.options()),
            at::full({B, S, H}, INFINITY, q.options().dtype(at::kFloat)), Saved{}};
  }
  auto res = at::_scaled_dot_product_cudnn_attention(
      fold(q, cl, cd, Hkv, m), ck.narrow(1, 0, m).transpose(1, 2),
      cv.narrow(1, 0, m).transpose(1, 2), std::nullopt, /*compute_log_sumexp=*/true, 0.0,
      /*is_causal=*/true, /*return_debug_mask=*/false, scale);
  auto lse_f = std::get<1>(res);
  auto lse4 = lse_f.reshape({B, Hkv * cd * (H / Hkv), m, 1});
  auto out = unfold(std::get<0>(res), S, H, cl, cd, Hkv, 0.0);
  auto lse = unfold(lse4, S, H, cl, cd, Hkv, INFINITY).squeeze(-1);
  return {out, lse, Saved{lse_f, std::get<6>(res), std::get<7>(res)}};
}

// Backward: (dq, dk, dv) in nsa's layouts from dout [B, S, H, dv].
inline std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& dout, const Tensor& q,
                                                   const Tensor& ck, const Tensor& cv,
                                                   const Tensor& out, const Saved& saved,
                                                   int64_t cl, int64_t cd, double scale) {
  const int64_t S = q.size(1), H = q.size(2), Nc = ck.size(1), Hkv = ck.size(2);
  const int64_t m = folds(S, cl, cd);
  if (m == 0) return {at::zeros_like(q), at::zeros_like(ck), at::zeros_like(cv)};
  auto kf = ck.narrow(1, 0, m).transpose(1, 2), vf = cv.narrow(1, 0, m).transpose(1, 2);
  auto res = at::_scaled_dot_product_cudnn_attention_backward(
      fold(dout, cl, cd, Hkv, m), fold(q, cl, cd, Hkv, m), kf, vf, fold(out, cl, cd, Hkv, m),
      saved.lse_folded, saved.seed, saved.offset, Tensor(), Tensor(), Tensor(), m, m, 0.0,
      /*is_causal=*/true, scale);
  auto dq = unfold(std::get<0>(res), S, H, cl, cd, Hkv, 0.0);
  auto widen = [&](const Tensor& g, const Tensor& like) {
    auto full = g.transpose(1, 2);  // [B, m, Hkv, D]
    if (m == Nc) return full.contiguous();
    auto z = at::zeros_like(like);
    z.narrow(1, 0, m).copy_(full);
    return z;
  };
  return {dq, widen(std::get<1>(res), ck), widen(std::get<2>(res), cv)};
}

}  // namespace cmp_cudnn
