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
// the padded rows of the last fold (t >= S) are zeros and never unfolded. The copies are
// compressed.cu's fold and unfold kernels (RowCopies).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>

#include "launch.h"

namespace cmp_cudnn {

using at::Tensor;

// The fold and unfold kernels (compressed.cu, nsa_cmp_{fold,unfold}_w{1,4}: index 0 moves one
// 32-bit word per thread, 1 four) and the cuLaunchKernel pointer they launch with.
struct RowCopies {
  void* launch;
  void* const* fold;
  void* const* unfold;
};

constexpr int kCopyThreads = 128;  // NSA_THREADS

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline void launch_copy(const RowCopies& k, void* fn, const char* what, long long work,
                        const c10::Device& device, void** args) {
  TORCH_CHECK(fn != nullptr, what, ": kernel not loaded");
  if (work == 0) return;
  long long grid = std::min<long long>((work + kCopyThreads - 1) / kCopyThreads, 1LL << 20);
  nsa_glue::launch_kernel(k.launch, fn, what, grid, 1, 1, kCopyThreads, 0,
                          nsa_glue::current_stream(device), args);
}

// Rows of D elements of x as 32-bit words (bf16 rows of even length, fp32 rows).
inline int row_words(const Tensor& x) {
  int64_t bytes = x.size(-1) * int64_t(x.element_size());
  TORCH_CHECK(bytes % 4 == 0 && bytes / 4 < (int64_t(1) << 30),
              "compressed branch on cuDNN: rows of whole 32-bit words only, got ", bytes,
              " bytes");
  return int(bytes / 4);
}

// `fill` in x's dtype, repeated over a 32-bit word.
inline unsigned int fill_word(double fill, at::ScalarType dt) {
  unsigned int w = 0;
  if (dt == at::kFloat) {
    float f = float(fill);
    std::memcpy(&w, &f, 4);
  } else {
    TORCH_CHECK(dt == at::kBFloat16, "compressed branch on cuDNN: bf16 or fp32 rows only");
    unsigned int half = c10::BFloat16(float(fill)).x;
    w = half | (half << 16);
  }
  return w;
}

// Folded rows m: ceil((S - l + 1) / d), 0 when no query sees a compressed token.
inline int64_t folds(int64_t S, int64_t cl, int64_t cd) {
  return S < cl ? 0 : (S - cl + cd) / cd;
}

// Heads [h0, h0 + Hkv * G) of x [B, S, Hs, D] (G query heads for each of Hkv KV heads) ->
// [B, Hkv * d * G, m, D] contiguous, by the fold kernel.
inline Tensor fold(const RowCopies& k, const Tensor& x, int64_t cl, int64_t cd, int64_t h0,
                   int64_t Hkv, int64_t G, int64_t m) {
  const int64_t B = x.size(0), S = x.size(1), Hs = x.size(2), D = x.size(3);
  auto src = x.contiguous();
  auto dst = at::empty({B, Hkv, cd, G, m, D}, x.options());
  int words = row_words(src);
  long long rows = B * Hkv * cd * G * m;
  bool w4 = words % 4 == 0 && aligned16(src.data_ptr()) && aligned16(dst.data_ptr());
  const void* sp = src.data_ptr();
  void* dp = dst.data_ptr();
  int iS = int(S), iH = int(Hkv * G), iHs = int(Hs), ih0 = int(h0), iHkv = int(Hkv);
  int icl = int(cl), icd = int(cd), im = int(m);
  void* args[] = {&sp, &dp, &words, &iS, &iH, &iHs, &ih0, &iHkv, &icl, &icd, &im, &rows};
  launch_copy(k, k.fold[w4 ? 1 : 0], "nsa_cmp_fold", rows * (w4 ? words / 4 : words),
              x.device(), args);
  return dst.view({B, Hkv * cd * G, m, D});
}

// The inverse of fold for cuDNN's outputs: y [B, Hkv * d * G, m, D] (last axis contiguous, any
// other strides) into heads [h0, h0 + Hkv * G) of dst [B, S, Hs, D] (contiguous), rows
// t < l - 1 set to `fill`, by the unfold kernel.
inline void unfold_into(const RowCopies& k, const Tensor& y_in, Tensor& dst, int64_t cl,
                        int64_t cd, int64_t h0, int64_t Hkv, double fill) {
  const int64_t B = dst.size(0), S = dst.size(1), Hs = dst.size(2);
  const int64_t H = y_in.size(1) / cd;  // Hkv * G
  TORCH_CHECK(dst.is_contiguous() && dst.size(3) == y_in.size(3) && h0 + H <= Hs,
              "compressed branch on cuDNN: unfold target does not match");
  const int64_t esz = int64_t(y_in.element_size());
  auto words_ok = [&](const Tensor& t) {
    return t.stride(3) == 1 && (t.stride(0) * esz) % 4 == 0 && (t.stride(1) * esz) % 4 == 0 &&
           (t.stride(2) * esz) % 4 == 0;
  };
  auto y = words_ok(y_in) ? y_in : y_in.contiguous();
  int words = row_words(y);
  long long sb = y.stride(0) * esz / 4, sh = y.stride(1) * esz / 4, sm = y.stride(2) * esz / 4;
  bool w4 = words % 4 == 0 && sb % 4 == 0 && sh % 4 == 0 && sm % 4 == 0 &&
            aligned16(y.data_ptr()) && aligned16(dst.data_ptr());
  long long rows = B * S * H;
  const void* sp = y.data_ptr();
  void* dp = dst.data_ptr();
  int iS = int(S), iH = int(H), iHs = int(Hs), ih0 = int(h0), iHkv = int(Hkv);
  int icl = int(cl), icd = int(cd);
  unsigned int fw = fill_word(fill, y.scalar_type());
  void* args[] = {&sp,  &sb,  &sh,  &sm,  &dp,  &words, &iS,  &iH,
                  &iHs, &ih0, &iHkv, &icl, &icd, &fw,   &rows};
  launch_copy(k, k.unfold[w4 ? 1 : 0], "nsa_cmp_unfold", rows * (w4 ? words / 4 : words),
              y.device(), args);
}

// What the backward needs besides nsa's own (q, ck, cv, out): cuDNN's folded lse and its
// (unused, dropout-free) philox state.
struct Saved {
  Tensor lse_folded, seed, offset;
};

// Forward: out [B, S, H, dv] and lse fp32 [B, S, H] (natural log of the scaled scores), plus
// what the backward needs. bf16 inputs, aligned; ck holds at least m tokens.
inline std::tuple<Tensor, Tensor, Saved> forward(const RowCopies& k, const Tensor& q,
                                                 const Tensor& ck, const Tensor& cv, int64_t cl,
                                                 int64_t cd, double scale) {
  const int64_t B = q.size(0), S = q.size(1), H = q.size(2), Hkv = ck.size(2), dv = cv.size(3);
  const int64_t m = folds(S, cl, cd);
  if (m == 0) {
    return {at::zeros({B, S, H, dv}, cv.options()),
            at::full({B, S, H}, INFINITY, q.options().dtype(at::kFloat)), Saved{}};
  }
  auto res = at::_scaled_dot_product_cudnn_attention(
      fold(k, q, cl, cd, 0, Hkv, H / Hkv, m), ck.narrow(1, 0, m).transpose(1, 2),
      cv.narrow(1, 0, m).transpose(1, 2), std::nullopt, /*compute_log_sumexp=*/true, 0.0,
      /*is_causal=*/true, /*return_debug_mask=*/false, scale);
  auto lse_f = std::get<1>(res);
  auto out = at::empty({B, S, H, dv}, cv.options());
  auto lse = at::empty({B, S, H, 1}, q.options().dtype(at::kFloat));
  unfold_into(k, std::get<0>(res), out, cl, cd, 0, Hkv, 0.0);
  unfold_into(k, lse_f.reshape({B, Hkv * cd * (H / Hkv), m, 1}), lse, cl, cd, 0, Hkv, INFINITY);
  return {out, lse.squeeze(-1), Saved{lse_f, std::get<6>(res), std::get<7>(res)}};
}

// Backward: (dq, dk, dv) in nsa's layouts from dout [B, S, H, dv]. One cuDNN call per group of
// KV heads (kv_chunks of them, a divisor of Hkv), so the folded copies of dout, q and out and
// cuDNN's own temporaries are those of one group at a time.
inline std::tuple<Tensor, Tensor, Tensor> backward(const RowCopies& k, const Tensor& dout,
                                                   const Tensor& q, const Tensor& ck,
                                                   const Tensor& cv, const Tensor& out,
                                                   const Saved& saved, int64_t cl, int64_t cd,
                                                   double scale, int64_t kv_chunks) {
  const int64_t S = q.size(1), H = q.size(2), Nc = ck.size(1), Hkv = ck.size(2), G = H / Hkv;
  const int64_t m = folds(S, cl, cd);
  if (m == 0) return {at::zeros_like(q), at::zeros_like(ck), at::zeros_like(cv)};
  TORCH_CHECK(kv_chunks >= 1 && Hkv % kv_chunks == 0,
              "compressed branch on cuDNN: KV head groups must divide Hkv");
  auto dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  auto dk = m == Nc ? at::empty_like(ck) : at::zeros_like(ck);
  auto dv = m == Nc ? at::empty_like(cv) : at::zeros_like(cv);
  const int64_t hk = Hkv / kv_chunks, hq = hk * G, heads_f = hk * cd * G;
  for (int64_t i = 0; i < kv_chunks; ++i) {
    auto kv = [&](const Tensor& t) { return t.narrow(1, 0, m).narrow(2, i * hk, hk); };
    auto res = at::_scaled_dot_product_cudnn_attention_backward(
        fold(k, dout, cl, cd, i * hq, hk, G, m), fold(k, q, cl, cd, i * hq, hk, G, m),
        kv(ck).transpose(1, 2), kv(cv).transpose(1, 2), fold(k, out, cl, cd, i * hq, hk, G, m),
        saved.lse_folded.narrow(1, i * heads_f, heads_f).contiguous(), saved.seed,
        saved.offset, Tensor(), Tensor(), Tensor(), m, m, 0.0, /*is_causal=*/true, scale);
    unfold_into(k, std::get<0>(res), dq, cl, cd, i * hq, hk, 0.0);
    kv(dk).copy_(std::get<1>(res).transpose(1, 2));
    kv(dv).copy_(std::get<2>(res).transpose(1, 2));
  }
  return {dq, dk, dv};
}

}  // namespace cmp_cudnn
