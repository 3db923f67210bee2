// The sliding-window branch, bf16, dv <= dk (nsa-attn zero-pads q and k when dk < dv):
// WindowFlash, an autograd Function. Forward: this crate's wgmma kernel (kernels/window_fwd.cu,
// Hopper only, from the kernel table Rust loaded) or libtorch's own flash-attention kernel with
// its sliding-window parameters (window_size_left = w - 1, right = 0, causal) on v zero-padded
// to dk (flash takes one head size). Backward: this crate's wgmma kernels
// (kernels/window_bwd.cu: dQ query-outer, then dK and dV key-outer over the group's heads;
// deterministic) where Rust passed their table, else flash's, on either forward's output and
// lse (the same layouts), split by groups of KV heads when one call's temporaries would pass the
// bound (attention.h, kv_head_chunks, also used by fused.cpp's compressed branch on cuDNN).
// Flash's zero columns (v's, the output's, the output gradient's) exist only where a flash
// kernel runs: with the wgmma kernels both ways nothing is padded, and the forward's output is
// [B, S, H, dv] (round 35: the padded output's narrow cost a zero-filled [B, S, H, dk] gradient
// and a copy in every backward).
//
// Layouts: q [B, S, H, d], k [B, S, Hkv, d], v [B, S, Hkv, dv]; the function's output
// [B, S, H, dv] (a view of a [B, S, H, d] output where flash may read it); flash's lse [B, H, S].
// Also libtorch's SDPA with its cuDNN backend off for one call (nsa_sdpa_without_cudnn), for the
// dense decoder's growing cache.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <tuple>

#include "attention.h"
#include "launch.h"

// Mirror of nsa_sys::fused::window's WindowTable: cuLaunchKernel, the wgmma forwards of
// WINDOW_WGMMA_SHAPES and the backward pairs (dq, dkdv) of WINDOW_WGMMA_BWD_SHAPES, in their
// orders.
struct NsaWindowTable {
  void* launch;
  void* fwd[6];
  void* bwd_dq[5];
  void* bwd_dkdv[5];
  int32_t max_smem;
};

// Mirror of window_fwd.cu's WindowFwdArgs.
struct NsaWindowFwdArgs {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;
  long long q_batch, k_batch, v_batch, o_batch;
  int32_t q_row, k_row, v_row, o_row;
  int32_t q_head, k_head, v_head, o_head;
  int32_t S, H, Hkv, window, pad;
  float scale_log2;
};

// Mirror of window_bwd.cu's WindowBwdArgs.
struct NsaWindowBwdArgs {
  const void* q;
  const void* k;
  const void* v;
  const void* o;
  const void* dout;
  const float* lse;
  float* delta;
  void* dq;
  void* dk;
  void* dv;
  int32_t S, H, Hkv, window;
  int32_t o_cols;
  float scale, scale_log2;
};

namespace nsa_glue {

namespace {
std::atomic<int64_t> g_chunk_bytes{int64_t(1) << 30};

// window_fwd.cu's instantiations (WINDOW_WGMMA_SHAPES' order): d, value_cols, the keys per
// tile BN and the warpgroups a CTA WGS (64 WGS tokens, 128 WGS threads) that its grid and
// shared-memory carve-up depend on (nsa-sys's window_instantiations_agree compares the lists).
constexpr int64_t kWgmmaShapes[6][4] = {{64, 64, 64, 2},   {128, 64, 128, 2}, {128, 128, 64, 4},
                                        {192, 64, 128, 2}, {192, 128, 64, 4}, {192, 192, 64, 2}};

// window_bwd.cu's instantiations (WINDOW_WGMMA_BWD_SHAPES' order): d, value_cols; 64 keys a
// tile in its dq kernel, 64 queries a tile in its dkdv kernel.
constexpr int64_t kWgmmaBwdShapes[5][2] = {{64, 64}, {128, 64}, {128, 128}, {192, 64}, {192, 128}};

// Index of the row (d, value_cols, ...) in a table of instantiations, or -1.
template <size_t N, size_t C>
int shape_index(const int64_t (&shapes)[N][C], int64_t d, int64_t value_cols) {
  for (size_t i = 0; i < N; ++i)
    if (shapes[i][0] == d && shapes[i][1] == value_cols) return int(i);
  return -1;
}

// The kernels copy 16-byte chunks: every row must start 16-byte aligned (the strides are whole
// rows of d elements; a view may still start at an odd element).
bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Zero columns up to d (flash's one head size), or t itself when it has d columns.
at::Tensor pad_cols(const at::Tensor& t, int64_t d) {
  return t.size(3) == d ? t : at::constant_pad_nd(t, {0, d - t.size(3)});
}

// The wgmma forward (window_fwd.cu): out [B, S, H, out_cols] (columns dv.. zero, where
// out_cols > dv) and lse [B, H, S] fp32, flash's layouts. q, k, v contiguous bf16, v
// [B, S, Hkv, dv].
std::tuple<at::Tensor, at::Tensor> wgmma_forward(const NsaWindowTable* tab, int idx,
                                                 const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, int64_t window,
                                                 double scale, int64_t out_cols) {
  const int64_t B = q.size(0), S = q.size(1), H = q.size(2), D = q.size(3), Hkv = k.size(2);
  const int64_t value_cols = v.size(3);
  auto out = at::empty({B, S, H, out_cols}, q.options());
  auto lse = at::empty({B, H, S}, q.options().dtype(at::kFloat));
  if (B == 0 || S == 0 || H == 0) return {out, lse};
  // Strides in elements fit the kernel's 32-bit row and head strides (a row is H * D).
  TORCH_CHECK(H * D < (int64_t(1) << 31) && Hkv * D < (int64_t(1) << 31) && S < (int64_t(1) << 31),
              "window forward: a row of q, k or v is too long for the kernel");
  NsaWindowFwdArgs a{q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                     lse.data_ptr<float>(),
                     q.stride(0), k.stride(0), v.stride(0), out.stride(0),
                     int32_t(q.stride(1)), int32_t(k.stride(1)), int32_t(v.stride(1)),
                     int32_t(out.stride(1)),
                     int32_t(q.stride(2)), int32_t(k.stride(2)), int32_t(v.stride(2)),
                     int32_t(out.stride(2)),
                     int32_t(S), int32_t(H), int32_t(Hkv),
                     int32_t(std::min<int64_t>(window, S)), int32_t(out_cols - value_cols),
                     float(scale * 1.4426950408889634)};
  // window_fwd.cu's carve-up: Q [rows][D], K [2][BN][D], V [2][BN][value_cols] bf16, plus the
  // 1024 bytes that align it; rows = 64 WGS tokens a CTA.
  const int64_t bn = kWgmmaShapes[idx][2], rows = 64 * kWgmmaShapes[idx][3];
  const int64_t smem = 2 * (rows * D + 2 * bn * D + 2 * bn * value_cols) + 1024;
  TORCH_CHECK(smem <= tab->max_smem, "window forward: needs ", smem,
              " bytes of shared memory per block, the device allows ", tab->max_smem);
  void* args[] = {&a};
  launch_kernel(tab->launch, tab->fwd[idx], "nsa_window_fwd", (S + rows - 1) / rows, H, B,
                2 * rows, smem, current_stream(q.device()), args);
  return {out, lse};
}

// The wgmma backward (window_bwd.cu): dq [B, S, H, d], dk [B, S, Hkv, d], dv [B, S, Hkv, dv].
// v [B, S, Hkv, dv], dout [B, S, H, dv], out [B, S, H, dv or d] (the forward's); every input
// contiguous bf16 and 16-byte aligned, lse [B, H, S] fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> wgmma_backward(
    const NsaWindowTable* tab, int idx, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dout,
    int64_t window, double scale) {
  const int64_t B = q.size(0), S = q.size(1), H = q.size(2), D = q.size(3), Hkv = k.size(2);
  const int64_t value_cols = v.size(3);
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (B == 0 || S == 0 || H == 0) return {dq, dk, dv};
  TORCH_CHECK(H * D < (int64_t(1) << 31) && S < (int64_t(1) << 31),
              "window backward: a row of q is too long for the kernel");
  // delta = rowsum(dout * out), written by the dq kernel for the dkdv kernel.
  auto delta = at::empty({B, H, S}, q.options().dtype(at::kFloat));
  NsaWindowBwdArgs a{q.data_ptr(),  k.data_ptr(),   v.data_ptr(),  out.data_ptr(),
                     dout.data_ptr(), lse.data_ptr<float>(), delta.data_ptr<float>(),
                     dq.data_ptr(), dk.data_ptr(),  dv.data_ptr(),
                     int32_t(S), int32_t(H), int32_t(Hkv), int32_t(std::min<int64_t>(window, S)),
                     int32_t(out.size(3)), float(scale), float(scale * 1.4426950408889634)};
  // window_bwd.cu's carve-ups (both the same size at 64 keys, resp. queries, a tile): 128 rows
  // of d and of value_cols, two stages of 64 rows of each, bf16; 1 KB of fp32 lse and delta
  // (the dq kernel's 512 bytes of delta); the 1024 aligning bytes.
  const int64_t smem =
      2 * (128 * D + 128 * value_cols + 2 * 64 * D + 2 * 64 * value_cols) + 1024 + 1024;
  TORCH_CHECK(smem <= tab->max_smem, "window backward: needs ", smem,
              " bytes of shared memory per block, the device allows ", tab->max_smem);
  void* args[] = {&a};
  auto stream = current_stream(q.device());
  launch_kernel(tab->launch, tab->bwd_dq[idx], "nsa_window_bwd_dq", (S + 127) / 128, H, B, 256,
                smem, stream, args);
  launch_kernel(tab->launch, tab->bwd_dkdv[idx], "nsa_window_bwd_dkdv", (S + 127) / 128, Hkv, B,
                256, smem, stream, args);
  return {dq, dk, dv};
}
}  // namespace

int64_t kv_head_chunks(int64_t bytes, int64_t Hkv) {
  const int64_t bound = g_chunk_bytes.load();
  for (int64_t c = 1; c < Hkv; ++c) {
    if (Hkv % c == 0 && bytes / c <= bound) return c;
  }
  return std::max<int64_t>(Hkv, 1);
}

}  // namespace nsa_glue

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct WindowFlash : public torch::autograd::Function<WindowFlash> {
  // table, bwd_table: the NsaWindowTable's address, or 0 for flash's forward, resp. backward.
  static Tensor forward(AutogradContext* ctx, Tensor q, Tensor k, Tensor v, int64_t window,
                        double scale, int64_t table, int64_t bwd_table) {
    q = q.contiguous();
    k = k.contiguous();
    v = v.contiguous();
    const int64_t S = q.size(1), Sk = k.size(1), D = q.size(3), DV = v.size(3);
    const auto* tab = reinterpret_cast<const NsaWindowTable*>(table);
    const int idx = tab != nullptr ? nsa_glue::shape_index(nsa_glue::kWgmmaShapes, D, DV) : -1;
    using nsa_glue::aligned16;
    Tensor out, lse, seed, offset;
    if (idx >= 0 && S == Sk && aligned16(q) && aligned16(k) && aligned16(v)) {
      // Flash's zero columns only where flash's backward will read this output.
      const bool wgmma_bwd =
          bwd_table != 0 && nsa_glue::shape_index(nsa_glue::kWgmmaBwdShapes, D, DV) >= 0;
      std::tie(out, lse) =
          nsa_glue::wgmma_forward(tab, idx, q, k, v, window, scale, wgmma_bwd ? DV : D);
      // What flash's forward returns without dropout; its backward reads them only with dropout.
      seed = at::empty({}, at::dtype(at::kLong));
      offset = at::empty({}, at::dtype(at::kLong));
    } else {
      auto res = at::_flash_attention_forward(q, k, nsa_glue::pad_cols(v, D), std::nullopt,
                                              std::nullopt, S, Sk, 0.0, /*is_causal=*/true,
                                              /*return_debug_mask=*/false, scale, window - 1, 0);
      out = std::get<0>(res);
      lse = std::get<1>(res);
      seed = std::get<2>(res);
      offset = std::get<3>(res);
    }
    ctx->save_for_backward({q, k, v, out, lse, seed, offset});
    ctx->saved_data["window"] = window;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["bwd_table"] = bwd_table;
    return out.size(3) == DV ? out : out.narrow(3, 0, DV);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto s = ctx->get_saved_variables();
    int64_t window = ctx->saved_data["window"].toInt();
    double scale = ctx->saved_data["scale"].toDouble();
    const auto &q = s[0], &k = s[1], &v = s[2], &out = s[3], &lse = s[4];
    int64_t B = q.size(0), S = q.size(1), H = q.size(2), D = q.size(3), Hkv = k.size(2);
    const int64_t DV = v.size(3);
    auto dout = grads[0].to(out.scalar_type()).contiguous();  // [B, S, H, DV]
    const auto* tab = reinterpret_cast<const NsaWindowTable*>(ctx->saved_data["bwd_table"].toInt());
    const int idx = tab != nullptr ? nsa_glue::shape_index(nsa_glue::kWgmmaBwdShapes, D, DV) : -1;
    using nsa_glue::aligned16;
    if (idx >= 0 && k.size(1) == S && out.is_contiguous() && lse.is_contiguous() &&
        lse.dim() == 3 && lse.size(2) == S && aligned16(q) && aligned16(k) && aligned16(v) &&
        aligned16(out)) {
      // A view's gradient may start off a 16-byte boundary; a copy starts on one.
      if (!aligned16(dout)) dout = dout.clone();
      auto res = nsa_glue::wgmma_backward(tab, idx, q, k, v, out, lse, dout, window, scale);
      return {std::get<0>(res), std::get<1>(res), std::get<2>(res), Tensor(), Tensor(), Tensor(),
              Tensor()};
    }
    // Flash: one head size D for every operand; dv's zero columns dropped at the end.
    const auto vp = nsa_glue::pad_cols(v, D), outp = nsa_glue::pad_cols(out, D),
               doutp = nsa_glue::pad_cols(dout, D);
    auto narrow_dv = [&](const Tensor& dv) { return DV == D ? dv : dv.narrow(3, 0, DV); };
    // fp32 dQ accumulator, plus bf16 dK and dV per query head when H > Hkv.
    int64_t temps = B * S * H * D * (4 + (H > Hkv ? 4 : 0));
    int64_t chunks = nsa_glue::kv_head_chunks(temps, Hkv);
    auto call = [&](const Tensor& dout_c, const Tensor& q_c, const Tensor& k_c,
                    const Tensor& v_c, const Tensor& out_c, const Tensor& lse_c) {
      return at::_flash_attention_backward(dout_c, q_c, k_c, v_c, out_c, lse_c, Tensor(),
                                           Tensor(), S, k.size(1), 0.0, /*is_causal=*/true,
                                           s[5], s[6], scale, window - 1, 0);
    };
    if (chunks == 1) {
      auto res = call(doutp, q, k, vp, outp, lse);
      return {std::get<0>(res), std::get<1>(res), narrow_dv(std::get<2>(res)), Tensor(),
              Tensor(), Tensor(), Tensor()};
    }
    // Groups of whole KV heads: head-sliced views (flash takes any row and head strides),
    // the lse slice [B, hq, S] made contiguous; each group's gradients copied into place.
    auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(vp);
    int64_t hk = Hkv / chunks, hq = H / chunks;
    for (int64_t i = 0; i < chunks; ++i) {
      auto heads = [&](const Tensor& t) { return t.narrow(2, i * hq, hq); };
      auto kv_heads = [&](const Tensor& t) { return t.narrow(2, i * hk, hk); };
      auto res = call(heads(doutp), heads(q), kv_heads(k), kv_heads(vp), heads(outp),
                      lse.narrow(1, i * hq, hq).contiguous());
      heads(dq).copy_(std::get<0>(res));
      kv_heads(dk).copy_(std::get<1>(res));
      kv_heads(dv).copy_(std::get<2>(res));
    }
    return {dq, dk, narrow_dv(dv), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

extern "C" {

size_t nsa_window_table_size() { return sizeof(NsaWindowTable); }

// Copies kWgmmaShapes (6 rows of d, value_cols, BN, WGS) into out[24] and kWgmmaBwdShapes (5 rows
// of d, value_cols) into bwd[10], for Rust's test that the kernels' instantiations, these tables
// and WINDOW_WGMMA_SHAPES / WINDOW_WGMMA_BWD_SHAPES agree.
void nsa_window_shapes(int64_t* out, int64_t* bwd) {
  for (int i = 0; i < 6; ++i)
    for (int j = 0; j < 4; ++j) out[4 * i + j] = nsa_glue::kWgmmaShapes[i][j];
  for (int i = 0; i < 5; ++i)
    for (int j = 0; j < 2; ++j) bwd[2 * i + j] = nsa_glue::kWgmmaBwdShapes[i][j];
}

// table, bwd_table: null (flash's forward, resp. backward) or the wgmma kernels Rust loaded for
// q's device.
at::Tensor* nsa_fused_window(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v,
                             int64_t window, double scale, const void* table,
                             const void* bwd_table, char* err, size_t err_len) {
  try {
    TORCH_CHECK(window > 0, "fused window attention: window must be positive");
    TORCH_CHECK(q->is_cuda(), "fused window attention: CUDA tensors only");
    auto dt = nsa_glue::common_type(*q, *k, *v);
    TORCH_CHECK(dt == at::kBFloat16, "fused window attention: bf16 only, got ", dt);
    auto qc = q->to(dt), kc = k->to(dt), vc = v->to(dt);
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    TORCH_CHECK(v->size(3) >= 1 && v->size(3) <= q->size(3),
                "fused window attention: v's head size must be in 1 ..= q's");
    auto out = WindowFlash::apply(qc, kc, vc, window, scale, reinterpret_cast<int64_t>(table),
                                  reinterpret_cast<int64_t>(bwd_table));
    return new at::Tensor(std::move(out));
  } catch (const std::exception& e) {
    nsa_glue::write_error(e.what(), err, err_len);
    return nullptr;
  }
}

// libtorch's SDPA with its cuDNN backend switched off for the call (its choice among flash,
// memory-efficient and math; the flag is restored on every exit). cuDNN's SDPA builds a graph
// per shape, so a decoder whose cache grows by a key each step would build one every step.
// `mask` may be null. Not thread-safe: the flag is process-wide, and another thread's SDPA
// during the call would skip cuDNN too.
at::Tensor* nsa_sdpa_without_cudnn(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v,
                                   const at::Tensor* mask, bool enable_gqa, char* err,
                                   size_t err_len) {
  try {
    auto& ctx = at::globalContext();
    struct Restore {
      at::Context& ctx;
      bool enabled;
      ~Restore() { ctx.setSDPUseCuDNN(enabled); }
    } restore{ctx, ctx.userEnabledCuDNNSDP()};
    ctx.setSDPUseCuDNN(false);
    std::optional<at::Tensor> m;
    if (mask != nullptr) m = *mask;
    auto out = at::scaled_dot_product_attention(*q, *k, *v, m, 0.0, false, std::nullopt,
                                                enable_gqa);
    return new at::Tensor(std::move(out));
  } catch (const std::exception& e) {
    nsa_glue::write_error(e.what(), err, err_len);
    return nullptr;
  }
}

// Whether libtorch's SDPA may pick its cuDNN backend (the process-wide switch).
bool nsa_sdpa_cudnn_enabled() { return at::globalContext().userEnabledCuDNNSDP(); }

// Sets the bound on one GQA backward call's temporaries (kv_head_chunks); returns the old one.
int64_t nsa_fused_set_head_chunk_bytes(int64_t bytes) {
  return nsa_glue::g_chunk_bytes.exchange(std::max<int64_t>(bytes, 1));
}

}  // extern "C"
