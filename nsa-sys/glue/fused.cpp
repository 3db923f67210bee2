// Custom autograd functions for nsa-attn's fused (CUDA) path.
//
// Selected and compressed branches and selection: the NVRTC kernels of nsa-sys/kernels/
// selected_{fwd,bwd}.cu and compressed.cu. Selected branch: launched here
// with the cuLaunchKernel pointer and CUfunction handles that Rust loaded (NsaSlcTable), on
// libtorch's current CUDA stream of the tensors' device, on the memory of the tensors.
//   forward:  out [B, S, H, dv] and lse fp32 [B, S, H] (saved for backward);
//   backward: D = rowsum(dout * out) (nsa_row_dot), dq by the dq kernel (the forward's
//             gathers), an inverse index block -> tokens built on the device (stable sort of the
//             (b, g, block) keys of every id, invalid ones last, and a search for the segment
//             starts; integer only, so deterministic; sized by the shapes, so no host
//             synchronisation), then dk / dv by the dkdv kernel over a plan whose grid is an
//             upper bound (padding work items return at once): one CTA per
//             (piece of a block's token list, key chunk), walking its tokens in ascending order;
//             a block whose list is split into several pieces (block 0, which every token
//             selects) is finished by the reduce kernel, which adds the pieces' fp32 partials in
//             piece order: deterministic, no float atomics. The forward is the union-tile
//             kernel, or (strategy 1) the key-outer kernel over the same inverse index plus a
//             merge of per-block partials, or (strategy 2) the token-per-warp kernel. With
//             strategy bit 4 (and l' <= 64, no token warps) dq comes from the dK/dV kernel
//             itself as per-(token, slot) partials, summed in slot order by nsa_slc_dq_reduce.
// Compressed branch (CompressedFused): forward kernel (out, lse); backward dq kernel and dk / dv
//   over tiles of 64 compressed tokens with a host-built plan (no device sync), split tiles
//   summed by the same reduce kernel. Backend 1 (unless deterministic algorithms are on):
//   forward and backward on cuDNN's fused attention over folded queries (cmp_cudnn.h).
//   Selection (nsa_fused_select) reads the forward's lse.
// Window branch: window.cpp.
//
// Layouts: q [B, S, H, dk], k [B, S, Hkv, dk], v [B, S, Hkv, dv], blocks [B, S, Hkv, n] (int32
// or int64), out [B, S, H, dv]; query head h reads key head h / (H / Hkv).
//
// The CUDA stream is reached through c10's device-guard interface (libc10), so this file
// links against libtorch_cpu / libc10 only, like the rest of the glue.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "blocks.h"
#include "cmp_cudnn.h"
#include "attention.h"
#include "launch.h"
#include "slc_table.h"

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using nsa_glue::current_stream;
using nsa_glue::write_error;

using namespace nsa_slc;

constexpr int64_t kCleanMax = 32;  // NSA_CLEAN_MAX

// blocks.h's clean_block_ids on the device in one kernel (nsa_clean_ids): int32 [B, S, G, n]
// contiguous. CUDA int32 / int64 ids with n <= kCleanMax and a table; anything else takes
// blocks.h's path.
Tensor clean_ids(const NsaSlcTable* tab, const Tensor& blocks, int64_t block_len,
                 int64_t num_keys) {
  const bool fits = tab != nullptr && blocks.is_cuda() && blocks.dim() == 4 &&
                    blocks.size(3) <= kCleanMax &&
                    (blocks.scalar_type() == at::kInt || blocks.scalar_type() == at::kLong);
  if (!fits) {
    return nsa_glue::clean_block_ids(blocks, block_len, num_keys).to(at::kInt).contiguous();
  }
  TORCH_CHECK(block_len > 0, "block length must be positive");
  auto in = blocks.contiguous();
  auto out = at::empty(in.sizes(), in.options().dtype(at::kInt));
  long long rows = in.numel() / std::max<int64_t>(in.size(3), 1);
  if (rows == 0 || in.size(3) == 0) return out;
  int S = int(in.size(1)), G = int(in.size(2)), n = int(in.size(3)), L = int(block_len);
  int last = num_keys <= 0 ? -1 : int((num_keys - 1) / block_len);
  const void* ip = in.data_ptr();
  void* op = out.data_ptr();
  void* args[] = {&ip, &op, &rows, &S, &G, &n, &L, &last};
  int64_t grid = std::min<int64_t>((rows + kThreads - 1) / kThreads, int64_t(1) << 20);
  launch(tab, tab->clean_ids[blocks.scalar_type() == at::kLong ? 1 : 0], "nsa_clean_ids", grid,
         1, 1, 0, current_stream(in.device()), args);
  return out;
}

// D = the row sums of dout * out over the last axis, fp32 [B, S, H], for the backward kernels
// (nsa_row_dot in selected_bwd.cu): no fp32 copies of either.
Tensor row_dot(const NsaSlcTable* tab, const Tensor& dout, const Tensor& out, void* stream) {
  TORCH_CHECK(dout.sizes() == out.sizes() && dout.scalar_type() == out.scalar_type() &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "row dot: dout and out must have one shape and one dtype (bf16 or fp32)");
  auto a = dout.contiguous(), b = out.contiguous();
  auto sizes = out.sizes().vec();
  int dv = int(sizes.back());
  sizes.pop_back();
  auto D = at::empty(sizes, out.options().dtype(at::kFloat));
  long long rows = D.numel();
  if (rows == 0) return D;
  if (dv == 0) return D.zero_();
  const void *ap = a.data_ptr(), *bp = b.data_ptr();
  void* dp = D.data_ptr();
  void* args[] = {&ap, &bp, &dp, &dv, &rows};
  // One warp per row, 4 per CTA; grid-stride beyond 2^20 CTAs.
  int64_t grid = std::min<int64_t>((rows + 3) / 4, int64_t(1) << 20);
  launch(tab, tab->row_dot[type_index(out)], "nsa_row_dot", grid, 1, 1, 0, stream, args);
  return D;
}

// Tokens per work item of the key-outer kernels' plan (blocks.h, plan_dkdv) for `entries`
// (token, block) selections: small problems split early (so the split path is exercised by
// small checks), large ones cap the dK/dV scratch at about entries / 1024 * L * (dk + dv) floats.
// `entries` is the shape bound of blocks.h's max_index_entries (the layer's E), so the piece,
// and with it the summation order, depends on the shapes only.
int64_t dkdv_piece(int64_t entries) {
  return std::min<int64_t>(1024, std::max<int64_t>(64, entries / 4096));
}

// Grid y of nsa_slc_dkdv_reduce: slices of a segment's L * (dk + dv) sums, about one per
// thread of a CTA each, at most 64 (a split segment then occupies up to 64 SMs).
int64_t dkdv_reduce_slices(int64_t L, int64_t dk, int64_t dv) {
  return std::max<int64_t>(1, std::min<int64_t>(64, L * (dk + dv) / kThreads));
}

struct SelectedFused : public torch::autograd::Function<SelectedFused> {
  // strategy: 0 = query-outer over union tiles (tensor cores for bf16 at instantiated head
  // sizes, SIMT otherwise), 1 = key-outer where it applies (bf16, instantiated head sizes),
  // 2 = one warp per token where it applies (as 1, and at most 16 heads per group and 32 ids
  // per token), else as 0; plus 4: the backward's dq key-outer, inside the dK/dV kernel, where
  // that applies (tensor-core dK/dV, l' <= 64, no token warps).
  // fwd_chunk, dq_chunk: sequences per launch of the key-outer forward and of the key-outer
  // dQ (with dK/dV), so that each launch's partials stay within the host's bound.
  static Tensor forward(AutogradContext* ctx, Tensor q, Tensor k, Tensor v, Tensor ids,
                        int64_t block_len, double scale, int64_t table, int64_t strategy,
                        int64_t fwd_chunk, int64_t dq_chunk) {
    const auto* tab = reinterpret_cast<const NsaSlcTable*>(table);
    c10::DeviceGuard guard(q.device());
    q = aligned(q);
    k = aligned(k);
    v = aligned(v);
    int64_t B = q.size(0), S = q.size(1), H = q.size(2), dk = q.size(3);
    int64_t Hkv = k.size(2), dv = v.size(3), n = ids.size(3), hpg = H / Hkv;
    auto out = at::empty({B, S, H, dv}, v.options());
    auto lse = at::empty({B, S, H}, q.options().dtype(at::kFloat));
    void* stream = current_stream(q.device());
    void *qp = q.data_ptr(), *kp = k.data_ptr(), *vp = v.data_ptr(), *ip = ids.data_ptr();
    void *op = out.data_ptr(), *lp = lse.data_ptr();
    int iS = int(S), iHkv = int(Hkv), ihpg = int(hpg), idk = int(dk), idv = int(dv), in_ = int(n),
        iL = int(block_len);
    float fscale = float(scale);
    int mi = mma_index(q, dk, dv, hpg);
    int64_t bq = mi >= 0 ? kM / hpg : 1;
    int64_t P = next_pow2(std::max<int64_t>(32, bq * n));
    if (mi >= 0 && (tab->fwd_mma[mi] == nullptr || fwd_mma_smem(dk, dv, hpg, n, P) > tab->max_smem))
      mi = -1;
    int64_t kv_smem = 2 * tile_bytes(dk) + tile_bytes(dv) + 4 * 2 * kM;
    const int64_t walk = strategy & 3;
    bool key_outer = walk == 1 && mi >= 0 && tab->fwd_kv[mi] != nullptr &&
                     tab->fwd_combine != nullptr && kv_smem <= tab->max_smem;
    bool token_warps = walk == 2 && mi >= 0 && hpg <= 16 && n <= 32 &&
                       tab->fwd_warp[mi] != nullptr && tab->dq_warp[mi] != nullptr &&
                       warp_smem(dk, dv, true) <= tab->max_smem;
    if (token_warps) {
      void* args[] = {&qp, &kp, &vp, &ip, &op, &lp, &iS, &iHkv, &ihpg, &in_, &iL, &fscale};
      launch(tab, tab->fwd_warp[mi], "nsa_slc_fwd_warp", S, Hkv, B, warp_smem(dk, dv, false),
             stream, args, 32);
    } else if (key_outer) {
      // Sequences are independent: each chunk of them is one index, one set of partials and
      // one merge, written into its slice of out and lse.
      int64_t NB = (S + block_len - 1) / block_len;
      int64_t chunks = (block_len + kBk - 1) / kBk, parts = n * chunks;
      const int64_t per = std::max<int64_t>(1, std::min<int64_t>(fwd_chunk, B));
      for (int64_t b0 = 0; b0 < B; b0 += per) {
        const int64_t Bc = std::min(per, B - b0);
        auto ids_c = ids.narrow(0, b0, Bc);
        auto [inv_tok, inv_slot, seg] = nsa_glue::inverse_index_with_slots(ids_c, NB);
        int64_t entries = nsa_glue::max_index_entries(Bc, S, Hkv, n, block_len);
        auto plan = nsa_glue::plan_dkdv(seg, dkdv_piece(entries), entries);
        auto part_o = at::empty({Bc, S, Hkv, parts, hpg, dv}, v.options());
        auto part_lse =
            at::full({Bc, S, Hkv, parts, hpg}, -INFINITY, q.options().dtype(at::kFloat));
        void *qcp = q.narrow(0, b0, Bc).data_ptr(), *kcp = k.narrow(0, b0, Bc).data_ptr();
        void *vcp = v.narrow(0, b0, Bc).data_ptr();
        void *ocp = out.narrow(0, b0, Bc).data_ptr(), *lcp = lse.narrow(0, b0, Bc).data_ptr();
        void *tp = inv_tok.data_ptr(), *sp = inv_slot.data_ptr(), *wsp = plan.seg.data_ptr();
        void *wap = plan.a.data_ptr(), *wbp = plan.b.data_ptr();
        void *pop = part_o.data_ptr(), *plp = part_lse.data_ptr();
        int iNB = int(NB), iparts = int(parts);
        void* args[] = {&qcp, &kcp, &vcp, &tp, &sp, &wsp, &wap, &wbp, &pop, &plp,
                        &iS,  &iHkv, &ihpg, &in_, &iL, &iNB, &fscale};
        launch(tab, tab->fwd_kv[mi], "nsa_slc_fwd_kv", plan.seg.numel() * chunks, 1, 1, kv_smem,
               stream, args);
        long long rows = Bc * S * H;
        void* cargs[] = {&pop, &plp, &ocp, &lcp, &rows, &iHkv, &ihpg, &iparts, &idv};
        launch(tab, tab->fwd_combine, "nsa_slc_fwd_combine", (rows + 3) / 4, 1, 1, 0, stream,
               cargs);
      }
    } else if (mi >= 0) {
      int iP = int(P);
      void* args[] = {&qp, &kp, &vp, &ip, &op, &lp, &iS, &iHkv, &ihpg, &in_, &iL, &fscale, &iP};
      launch(tab, tab->fwd_mma[mi], "nsa_slc_fwd_mma", (S + bq - 1) / bq, Hkv, B,
             fwd_mma_smem(dk, dv, hpg, n, P), stream, args);
    } else {
      int64_t smem = 4 * (hpg * dk + kKc * dk + kKc * dv + hpg * dv + hpg * kKc + 3 * hpg + n);
      void* args[] = {&qp, &kp, &vp, &ip, &op, &lp, &iS, &iHkv, &ihpg, &idk, &idv, &in_, &iL,
                      &fscale};
      launch(tab, tab->fwd_simt[type_index(q)], "nsa_slc_fwd_simt", S, Hkv, B, smem, stream,
             args);
    }
    ctx->save_for_backward({q, k, v, ids, out, lse});
    ctx->saved_data["block_len"] = block_len;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["table"] = table;
    ctx->saved_data["token_warps"] = token_warps;
    ctx->saved_data["dq_key_outer"] = (strategy & 4) != 0;
    ctx->saved_data["dq_chunk"] = dq_chunk;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto q = saved[0], k = saved[1], v = saved[2], ids = saved[3], out = saved[4], lse = saved[5];
    int64_t block_len = ctx->saved_data["block_len"].toInt();
    double scale = ctx->saved_data["scale"].toDouble();
    const auto* tab = reinterpret_cast<const NsaSlcTable*>(ctx->saved_data["table"].toInt());
    c10::DeviceGuard guard(q.device());
    auto dout = grads[0].to(out.scalar_type()).contiguous();
    int64_t B = q.size(0), S = q.size(1), H = q.size(2), dk = q.size(3);
    int64_t Hkv = k.size(2), dv = v.size(3), n = ids.size(3), hpg = H / Hkv;
    int64_t NB = (S + block_len - 1) / block_len;
    void* stream = current_stream(q.device());
    auto D = row_dot(tab, dout, out, stream);  // [B, S, H]
    int iS = int(S), iHkv = int(Hkv), ihpg = int(hpg), idk = int(dk), idv = int(dv), in_ = int(n),
        iL = int(block_len), iNB = int(NB);
    float fscale = float(scale);
    void *qp = q.data_ptr(), *kp = k.data_ptr(), *vp = v.data_ptr(), *ip = ids.data_ptr();
    void *dop = dout.data_ptr(), *lp = lse.data_ptr(), *Dp = D.data_ptr();

    // Tensor-core kernels for bf16 at the instantiated head sizes, SIMT kernels otherwise.
    int mi = mma_index(q, dk, dv, hpg);
    int64_t bq = kM / std::min<int64_t>(hpg, kM);
    int64_t P = next_pow2(std::max<int64_t>(32, bq * n));
    bool dq_mma = mi >= 0 && tab->dq_mma[mi] != nullptr &&
                  dq_mma_smem(dk, dv, hpg, n, P) <= tab->max_smem;
    bool dkdv_mma = mi >= 0 && tab->dkdv_mma[mi] != nullptr &&
                    dkdv_mma_smem(dk, dv) <= tab->max_smem;
    const bool token_warps = ctx->saved_data["token_warps"].toBool();
    // dQ key-outer: inside the dK/dV kernel (one key chunk per block), partials reduced after.
    const bool dq_key_outer = ctx->saved_data["dq_key_outer"].toBool() && !token_warps &&
                              dkdv_mma && block_len <= kBk && tab->dkdv_dq_mma[mi] != nullptr &&
                              tab->dq_reduce != nullptr &&
                              dkdv_dq_mma_smem(dk, dv) <= tab->max_smem;
    auto dq = at::empty_like(q);
    void* dqp = dq.data_ptr();
    if (dq_key_outer) {
      // below, with dK / dV
    } else if (token_warps) {  // the forward checked that it applies
      void* args[] = {&qp, &kp, &vp, &ip, &dop, &lp, &Dp, &dqp, &iS, &iHkv, &ihpg, &in_, &iL,
                      &fscale};
      launch(tab, tab->dq_warp[mi], "nsa_slc_dq_warp", S, Hkv, B, warp_smem(dk, dv, true),
             stream, args, 32);
    } else if (dq_mma) {
      int iP = int(P);
      void* args[] = {&qp, &kp, &vp, &ip, &dop, &lp, &Dp, &dqp, &iS, &iHkv, &ihpg, &in_, &iL,
                      &fscale, &iP};
      launch(tab, tab->dq_mma[mi], "nsa_slc_dq_mma", (S + bq - 1) / bq, Hkv, B,
             dq_mma_smem(dk, dv, hpg, n, P), stream, args);
    } else {
      int64_t smem = 4 * (2 * hpg * dk + hpg * dv + kKc * dk + kKc * dv + hpg * kKc + 2 * hpg + n);
      void* args[] = {&qp, &kp, &vp, &ip, &dop, &lp, &Dp, &dqp, &iS, &iHkv, &ihpg, &idk, &idv,
                      &in_, &iL, &fscale};
      launch(tab, tab->dq[type_index(q)], "nsa_slc_dq", S, Hkv, B, smem, stream, args);
    }

    auto dk_t = at::empty_like(k);
    auto dv_t = at::empty_like(v);
    // dK/dV (and the key-outer dQ) over chunks of sequences: each chunk one inverse index, one
    // plan and one set of partials (dQ's grow with B·S, so the host bounds them per launch).
    // The sequences are independent, so only the number of launches changes.
    const int64_t per =
        dq_key_outer
            ? std::max<int64_t>(1, std::min<int64_t>(ctx->saved_data["dq_chunk"].toInt(), B))
            : B;
    for (int64_t b0 = 0; b0 < B; b0 += per) {
      const int64_t Bc = std::min(per, B - b0);
      auto ids_c = ids.narrow(0, b0, Bc);
      // This chunk's slices, under the names the launches below take.
      void *qp = q.narrow(0, b0, Bc).data_ptr(), *kp = k.narrow(0, b0, Bc).data_ptr();
      void *vp = v.narrow(0, b0, Bc).data_ptr(), *dop = dout.narrow(0, b0, Bc).data_ptr();
      void *lp = lse.narrow(0, b0, Bc).data_ptr(), *Dp = D.narrow(0, b0, Bc).data_ptr();
      void* dqp = dq.narrow(0, b0, Bc).data_ptr();
      // Inverse index block -> tokens (blocks.h), deterministic, no host synchronisation.
      auto [inv_tok, inv_slot, seg] = nsa_glue::inverse_index_with_slots(ids_c, NB);

      // Pieces of at most `piece` tokens per work item: small problems split early (so the split
      // path is exercised by small checks), large ones cap the scratch at about
      // 2 E / 1024 * L * (dk + dv) floats. The plan's sizes are bounds from the shapes (E at
      // most `entries`, reached by the layer's own selection), its real items read on the device.
      int64_t entries = nsa_glue::max_index_entries(Bc, S, Hkv, n, block_len);
      auto plan = nsa_glue::plan_dkdv(seg, dkdv_piece(entries), entries);
      auto scratch = at::empty({std::max<int64_t>(plan.slots, 1), block_len, dk + dv},
                               q.options().dtype(at::kFloat));
      void *dkp = dk_t.narrow(0, b0, Bc).data_ptr(), *dvp = dv_t.narrow(0, b0, Bc).data_ptr();
      void* scp = scratch.data_ptr();
      // dQ's per-(token, slot) partials (Bc·S·H·n·dk bf16, each one block's fp32 sum rounded
      // once); only the valid slots are written and read.
      auto dq_part = dq_key_outer
                         ? at::empty({Bc, S, Hkv, n, hpg, dk}, q.options().dtype(at::kBFloat16))
                         : at::empty({0}, q.options().dtype(at::kBFloat16));
      {
        void *tp = inv_tok.data_ptr(), *wsp = plan.seg.data_ptr(), *wap = plan.a.data_ptr();
        void *wbp = plan.b.data_ptr(), *wlp = plan.slot.data_ptr();
        void* args[] = {&qp,  &kp,  &vp,  &dop, &lp,  &Dp,   &tp,   &wsp, &wap,  &wbp,   &wlp,
                        &scp, &dkp, &dvp, &iS,  &iHkv, &ihpg, &idk, &idv, &iL, &iNB, &fscale};
        if (dq_key_outer) {
          // The tensor-core kernel's arguments, then the slots, the partials and n.
          void *slp = inv_slot.data_ptr(), *pp = dq_part.data_ptr();
          void* margs[] = {&qp,  &kp,  &vp,  &dop, &lp,  &Dp,  &tp,   &wsp,  &wap, &wbp,   &wlp,
                           &scp, &dkp, &dvp, &iS,  &iHkv, &ihpg, &iL, &iNB, &fscale, &slp, &pp,
                           &in_};
          launch(tab, tab->dkdv_dq_mma[mi], "nsa_slc_dkdv_dq_mma", plan.seg.numel(), 1, 1,
                 dkdv_dq_mma_smem(dk, dv), stream, margs);
        } else if (dkdv_mma) {
          // The same arguments less dk, dv (compile-time in the tensor-core kernel).
          void* margs[] = {&qp,  &kp,  &vp,  &dop,  &lp,   &Dp, &tp,  &wsp,   &wap, &wbp,
                           &wlp, &scp, &dkp, &dvp,  &iS,   &iHkv, &ihpg, &iL, &iNB, &fscale};
          int64_t chunks = (block_len + kBk - 1) / kBk;
          launch(tab, tab->dkdv_mma[mi], "nsa_slc_dkdv_mma", plan.seg.numel() * chunks, 1, 1,
                 dkdv_mma_smem(dk, dv), stream, margs);
        } else {
          int64_t smem =
              4 * (2 * kKc * dk + 2 * kKc * dv + hpg * dk + hpg * dv + 2 * hpg * kKc + 2 * hpg);
          int64_t chunks = (block_len + kKc - 1) / kKc;
          launch(tab, tab->dkdv[type_index(q)], "nsa_slc_dkdv", plan.seg.numel() * chunks, 1, 1,
                 smem, stream, args);
        }
      }
      if (plan.red_seg.numel() > 0) {
        void *rsp = plan.red_seg.data_ptr(), *r0p = plan.red_slot0.data_ptr();
        void* rcp = plan.red_count.data_ptr();
        void* args[] = {&scp, &rsp, &r0p, &rcp, &dkp, &dvp, &iS, &iHkv, &idk, &idv, &iL, &iNB};
        launch(tab, tab->dkdv_reduce[type_index(q)], "nsa_slc_dkdv_reduce", plan.red_seg.numel(),
               dkdv_reduce_slices(block_len, dk, dv), 1, 0, stream, args);
      }
      if (dq_key_outer) {
        void *pp = dq_part.data_ptr(), *idp = ids_c.data_ptr();
        long long rows = Bc * S * Hkv;
        void* args[] = {&pp, &idp, &dqp, &rows, &ihpg, &idk, &in_, &iNB};
        int64_t threads = rows * hpg * (dk / 4);
        launch(tab, tab->dq_reduce, "nsa_slc_dq_reduce",
               std::max<int64_t>(1, std::min<int64_t>((threads + kThreads - 1) / kThreads, 1 << 16)),
               1, 1, 0, stream, args);
      }
    }
    // q, k, v; then ids, block_len, scale, table, strategy, fwd_chunk, dq_chunk get none.
    return {dq,       dk_t,     dv_t,     Tensor(), Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// The compressed-branch forward kernel: (out, lse) for bf16 q [B, S, H, dk], ck [B, Nc, Hkv, dk],
// cv [B, Nc, Hkv, dv] (aligned, contiguous) with a tensor-core instantiation.
std::tuple<Tensor, Tensor> cmp_forward(const NsaSlcTable* tab, const Tensor& q, const Tensor& ck,
                                       const Tensor& cv, int64_t cl, int64_t cd, double scale) {
  int64_t B = q.size(0), S = q.size(1), H = q.size(2), dk = q.size(3);
  int64_t Nc = ck.size(1), Hkv = ck.size(2), dv = cv.size(3), hpg = H / Hkv;
  int mi = mma_index(q, dk, dv, hpg);
  TORCH_CHECK(mi >= 0 && tab->cmp_fwd_mma[mi] != nullptr,
              "fused compressed attention: bf16 with dk, dv in {64, 128, 192} and at most 64 "
              "heads per group only");
  auto out = at::empty({B, S, H, dv}, cv.options());
  auto lse = at::empty({B, S, H}, q.options().dtype(at::kFloat));
  if (S > 0 && B > 0) {
    void* stream = current_stream(q.device());
    void *qp = q.data_ptr(), *kp = ck.data_ptr(), *vp = cv.data_ptr(), *op = out.data_ptr(),
         *lp = lse.data_ptr();
    int iS = int(S), iNc = int(Nc), iHkv = int(Hkv), ihpg = int(hpg), icl = int(cl),
        icd = int(cd);
    float fscale = float(scale);
    void* args[] = {&qp, &kp, &vp, &op, &lp, &iS, &iNc, &iHkv, &ihpg, &icl, &icd, &fscale};
    int64_t bq = kM / hpg;
    launch(tab, tab->cmp_fwd_mma[mi], "nsa_cmp_fwd_mma", (S + bq - 1) / bq, Hkv, B,
           fwd_mma_smem(dk, dv, hpg, 0, 32), stream, args);
  }
  return {out, lse};
}

// A host-built int tensor on `device` without a host synchronisation (pinned staging, copied
// asynchronously on the current stream; the caching host allocator keeps the staging alive).
template <typename T>
Tensor to_device(const std::vector<T>& v, at::ScalarType type, const c10::Device& device) {
  auto host = at::empty({int64_t(v.size())}, at::TensorOptions().dtype(type).pinned_memory(true));
  if (!v.empty()) std::memcpy(host.data_ptr(), v.data(), v.size() * sizeof(T));
  return host.to(device, /*non_blocking=*/true);
}

// The fold and unfold kernels of the cuDNN form (cmp_cudnn.h).
cmp_cudnn::RowCopies row_copies(const NsaSlcTable* tab) {
  return cmp_cudnn::RowCopies{tab->launch, tab->cmp_fold, tab->cmp_unfold};
}

// Whether the compressed branch runs on cuDNN (cmp_cudnn.h): asked for, libtorch's
// deterministic algorithms off (cuDNN's backward does not fix its dQ accumulation order; the
// kernels' does), and cuDNN's fused attention takes the shapes (ck holds every folded row's
// tokens). The backward follows what the forward ran.
bool cmp_on_cudnn(int64_t backend, const Tensor& q, const Tensor& ck, int64_t cl, int64_t cd) {
  return backend == 1 && !at::globalContext().deterministicAlgorithms() &&
         ck.size(1) >= cmp_cudnn::folds(q.size(1), cl, cd);
}

// Forward on cuDNN (backend 1, where it applies) or the kernel: (out, lse, what cuDNN's
// backward needs).
std::tuple<Tensor, Tensor, cmp_cudnn::Saved> cmp_forward_any(const NsaSlcTable* tab,
                                                             int64_t backend, const Tensor& q,
                                                             const Tensor& ck, const Tensor& cv,
                                                             int64_t cl, int64_t cd,
                                                             double scale) {
  if (cmp_on_cudnn(backend, q, ck, cl, cd)) {
    return cmp_cudnn::forward(row_copies(tab), q, ck, cv, cl, cd, scale);
  }
  auto [out, lse] = cmp_forward(tab, q, ck, cv, cl, cd, scale);
  return {out, lse, cmp_cudnn::Saved{}};
}

// Compressed branch: forward kernel; backward = dq kernel (query-outer) and the dK/dV kernel
// over tiles of 64 compressed tokens (key-outer), each tile's readers (tokens from
// tile * 64 * d + l - 1 on) split into pieces; split tiles are summed by the reduce kernel in
// piece order. The plan depends on the shapes only, so it is built on the host without a
// device synchronisation. Deterministic, no float atomics.
// backend 1: forward and backward on cuDNN where cmp_on_cudnn says so.
struct CompressedFused : public torch::autograd::Function<CompressedFused> {
  // Returns {out, lse}; lse (fp32 [B, S, H], for selection) is not differentiable.
  static variable_list forward(AutogradContext* ctx, Tensor q, Tensor ck, Tensor cv, int64_t cl,
                               int64_t cd, double scale, int64_t table, int64_t backend) {
    const auto* tab = reinterpret_cast<const NsaSlcTable*>(table);
    c10::DeviceGuard guard(q.device());
    q = aligned(q);
    ck = aligned(ck);
    cv = aligned(cv);
    auto [out, lse, cudnn] = cmp_forward_any(tab, backend, q, ck, cv, cl, cd, scale);
    ctx->save_for_backward({q, ck, cv, out, lse, cudnn.lse_folded, cudnn.seed, cudnn.offset});
    ctx->saved_data["cl"] = cl;
    ctx->saved_data["cd"] = cd;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["table"] = table;
    ctx->saved_data["cudnn"] = cudnn.lse_folded.defined();
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto q = saved[0], ck = saved[1], cv = saved[2], out = saved[3], lse = saved[4];
    int64_t cl = ctx->saved_data["cl"].toInt(), cd = ctx->saved_data["cd"].toInt();
    double scale = ctx->saved_data["scale"].toDouble();
    const auto* tab = reinterpret_cast<const NsaSlcTable*>(ctx->saved_data["table"].toInt());
    c10::DeviceGuard guard(q.device());
    auto dout = aligned(grads[0].to(out.scalar_type()));
    if (ctx->saved_data["cudnn"].toBool()) {
      // Folded copies of dout, q, out and cuDNN's folded dQ, all bf16.
      int64_t temps = q.size(0) * q.size(1) * q.size(2) * (2 * q.size(3) + 2 * cv.size(3)) * 2;
      auto [dq, dk, dv] = cmp_cudnn::backward(
          row_copies(tab), dout, q, ck, cv, out, cmp_cudnn::Saved{saved[5], saved[6], saved[7]},
          cl, cd, scale, nsa_glue::kv_head_chunks(temps, ck.size(2)));
      return {dq, dk, dv, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    }
    int64_t B = q.size(0), S = q.size(1), H = q.size(2), dk = q.size(3);
    int64_t Nc = ck.size(1), Hkv = ck.size(2), dv = cv.size(3), hpg = H / Hkv;
    int mi = mma_index(q, dk, dv, hpg);
    if (B == 0 || S == 0 || Nc == 0) {
      return {at::zeros_like(q), at::zeros_like(ck), at::zeros_like(cv), Tensor(), Tensor(),
              Tensor(), Tensor(), Tensor()};
    }
    void* stream = current_stream(q.device());
    auto D = row_dot(tab, dout, out, stream);  // [B, S, H]
    // Every key is written exactly once (by its tile's one piece, or by the reduce kernel).
    auto dq = at::empty_like(q);
    auto dk_t = at::empty_like(ck);
    auto dv_t = at::empty_like(cv);
    int iS = int(S), iNc = int(Nc), iHkv = int(Hkv), ihpg = int(hpg), icl = int(cl), icd = int(cd);
    float fscale = float(scale);
    void *qp = q.data_ptr(), *kp = ck.data_ptr(), *vp = cv.data_ptr(), *dop = dout.data_ptr();
    void *lp = lse.data_ptr(), *Dp = D.data_ptr(), *dqp = dq.data_ptr();
    {
      void* args[] = {&qp, &kp, &vp, &dop, &lp, &Dp, &dqp, &iS, &iNc, &iHkv, &ihpg, &icl, &icd,
                      &fscale};
      int64_t bq = kM / hpg;
      launch(tab, tab->cmp_dq_mma[mi], "nsa_cmp_dq_mma", (S + bq - 1) / bq, Hkv, B,
             dq_mma_smem(dk, dv, hpg, 0, 32), stream, args);
    }
    // Plan: segments (b, g, tile), pieces of at most `piece` reading tokens.
    int64_t NT = (Nc + kBk - 1) / kBk;
    int64_t piece = std::max<int64_t>(128, (S + 31) / 32);
    std::vector<int64_t> w_seg, w_a, w_b, red_seg;
    std::vector<int32_t> w_slot, red_slot0, red_count;
    int32_t slots = 0;
    for (int64_t bg = 0; bg < B * Hkv; ++bg) {
      for (int64_t tile = 0; tile < NT; ++tile) {
        int64_t first = std::min<int64_t>(S, tile * kBk * cd + cl - 1);
        int64_t count = S - first;
        int64_t pieces = std::max<int64_t>(1, (count + piece - 1) / piece);
        int64_t seg = bg * NT + tile;
        if (pieces > 1) {
          red_seg.push_back(seg);
          red_slot0.push_back(slots);
          red_count.push_back(int32_t(pieces));
        }
        for (int64_t p = 0; p < pieces; ++p) {
          w_seg.push_back(seg);
          w_a.push_back(first + p * piece);
          w_b.push_back(std::min<int64_t>(S, first + (p + 1) * piece));
          w_slot.push_back(pieces > 1 ? slots++ : -1);
        }
      }
    }
    auto dev = q.device();
    auto seg_t = to_device(w_seg, at::kLong, dev), a_t = to_device(w_a, at::kLong, dev);
    auto b_t = to_device(w_b, at::kLong, dev), slot_t = to_device(w_slot, at::kInt, dev);
    auto scratch = at::empty({std::max<int64_t>(slots, 1), kBk, dk + dv}, q.options().dtype(at::kFloat));
    void *wsp = seg_t.data_ptr(), *wap = a_t.data_ptr(), *wbp = b_t.data_ptr();
    void *wlp = slot_t.data_ptr(), *scp = scratch.data_ptr();
    void *dkp = dk_t.data_ptr(), *dvp = dv_t.data_ptr();
    int iNT = int(NT);
    {
      void* args[] = {&qp,  &kp,  &vp,  &dop, &lp, &Dp, &wsp, &wap, &wbp,  &wlp, &scp,
                      &dkp, &dvp, &iS,  &iNc, &iHkv, &ihpg, &iNT, &icl, &icd, &fscale};
      launch(tab, tab->cmp_dkdv_mma[mi], "nsa_cmp_dkdv_mma", int64_t(w_seg.size()), 1, 1,
             dkdv_mma_smem(dk, dv), stream, args);
    }
    if (!red_seg.empty()) {
      auto rs = to_device(red_seg, at::kLong, dev), r0 = to_device(red_slot0, at::kInt, dev);
      auto rc = to_device(red_count, at::kInt, dev);
      void *rsp = rs.data_ptr(), *r0p = r0.data_ptr(), *rcp = rc.data_ptr();
      int idk = int(dk), idv = int(dv), iL = int(kBk);
      void* args[] = {&scp, &rsp, &r0p, &rcp, &dkp, &dvp, &iNc, &iHkv, &idk, &idv, &iL, &iNT};
      launch(tab, tab->dkdv_reduce[1], "nsa_slc_dkdv_reduce (compressed)", int64_t(red_seg.size()),
             dkdv_reduce_slices(kBk, dk, dv), 1, 0, stream, args);
    }
    return {dq, dk_t, dv_t, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

extern "C" {

// sizeof(NsaSlcTable), which nsa_sys::fused compares with its mirror's before filling one: a
// field added on one side only would make every launch read the wrong function.
size_t nsa_slc_table_size() { return sizeof(NsaSlcTable); }

// The backward's inverse index of `blocks` (cleaned first) as new tensors, for tests; returns 0
// or -1 with a message in err.
int nsa_fused_inverse_index(const at::Tensor* blocks, int64_t block_len, at::Tensor** tokens,
                            at::Tensor** starts, char* err, size_t err_len) {
  try {
    int64_t S = blocks->size(1);
    auto ids = nsa_glue::clean_block_ids(*blocks, block_len, S);
    auto [t, s] = nsa_glue::inverse_index(ids, (S + block_len - 1) / block_len);
    *tokens = new at::Tensor(std::move(t));
    *starts = new at::Tensor(std::move(s));
    return 0;
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return -1;
  }
}

// The cleaned block ids the selected kernels read (clean_ids: the kernel on CUDA when `table`
// is given, else blocks.h's operators), for tests; a new tensor, or nullptr with err.
at::Tensor* nsa_fused_clean_ids(const at::Tensor* blocks, int64_t block_len, int64_t num_keys,
                                const NsaSlcTable* table, char* err, size_t err_len) {
  try {
    c10::DeviceGuard guard(blocks->device());
    return new at::Tensor(clean_ids(table, *blocks, block_len, num_keys));
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return nullptr;
  }
}

// The dK/dV work plan (blocks.h) for segment starts `starts` (int64 [nseg + 1]), pieces of at
// most `piece` tokens and at most `max_entries` entries in all, for tests: out[0..7] = seg, a,
// b, slot, red_seg, red_slot0, red_count (new tensors, ownership to the caller), *slots =
// scratch slots (all bounds; see blocks.h). Returns 0, or -1 with err.
int nsa_fused_dkdv_plan(const at::Tensor* starts, int64_t piece, int64_t max_entries,
                        at::Tensor** out, int64_t* slots, char* err, size_t err_len) {
  try {
    TORCH_CHECK(starts->dim() == 1 && starts->numel() >= 2 && starts->scalar_type() == at::kLong,
                "starts must be int64 [nseg + 1] with nseg >= 1");
    auto p = nsa_glue::plan_dkdv(*starts, piece, max_entries);
    at::Tensor parts[7] = {p.seg, p.a, p.b, p.slot, p.red_seg, p.red_slot0, p.red_count};
    for (int i = 0; i < 7; ++i) out[i] = new at::Tensor(std::move(parts[i]));
    *slots = p.slots;
    return 0;
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return -1;
  }
}

// The dtype the fused functions compute q, k, v in: 1 = fp32, 2 = bf16, 0 = anything else.
int nsa_fused_compute_dtype(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v) {
  try {
    auto dt = nsa_glue::common_type(*q, *k, *v);
    return dt == at::kFloat ? 1 : dt == at::kBFloat16 ? 2 : 0;
  } catch (...) {
    return 0;
  }
}

// Returns a new at::Tensor* (ownership passes to the caller) or nullptr with a message in err.
// strategy: see SelectedFused::forward (0 = union tiles, 1 = key-outer, 2 = token warps; plus 4
// for dq key-outer); fwd_chunk, dq_chunk: sequences per key-outer launch (forward, dQ).
at::Tensor* nsa_fused_selected(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v,
                               const at::Tensor* blocks, int64_t block_len, double scale,
                               int64_t strategy, int64_t fwd_chunk, int64_t dq_chunk,
                               const NsaSlcTable* table, char* err, size_t err_len) {
  try {
    TORCH_CHECK(table != nullptr, "fused selected attention: no kernel table");
    TORCH_CHECK(q->is_cuda(), "fused selected attention: CUDA tensors only");
    auto dt = nsa_glue::common_type(*q, *k, *v);
    TORCH_CHECK(dt == at::kBFloat16 || dt == at::kFloat,
                "fused selected attention: bf16 or fp32 inputs, got ", dt);
    c10::DeviceGuard guard(q->device());
    auto ids = clean_ids(table, blocks->to(q->device()), block_len, k->size(1));
    auto qc = q->to(dt), kc = k->to(dt), vc = v->to(dt);
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    auto out = SelectedFused::apply(qc, kc, vc, ids, block_len, scale,
                                    reinterpret_cast<int64_t>(table), strategy, fwd_chunk,
                                    dq_chunk);
    return new at::Tensor(std::move(out));
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return nullptr;
  }
}

// The compressed branch: new tensors out [B, S, H, dv] and lse fp32 [B, S, H] (natural log; +inf
// for a row that sees no compressed token) in *out_p and *lse_p. With autograd != 0 through
// CompressedFused (out differentiable in q, ck, cv; lse not), else the forward kernel alone (for
// selection and inference). backend 0: the kernels; 1: cuDNN where it applies (cmp_on_cudnn),
// else the kernels. q [B, S, H, dk], ck [B, Nc, Hkv, dk], cv [B, Nc, Hkv, dv], computed in bf16
// (bf16 inputs, or fp32 under bf16 autocast), dk and dv in {64, 128, 192}, at most 64 heads per
// group. Returns 0, or -1 with a message in err.
int nsa_fused_compressed(const at::Tensor* q, const at::Tensor* ck, const at::Tensor* cv,
                         int64_t cl, int64_t cd, double scale, int32_t autograd,
                         int32_t backend, const NsaSlcTable* table, at::Tensor** out_p,
                         at::Tensor** lse_p,
                         char* err, size_t err_len) {
  try {
    TORCH_CHECK(table != nullptr, "fused compressed attention: no kernel table");
    TORCH_CHECK(q->is_cuda(), "fused compressed attention: CUDA tensors only");
    TORCH_CHECK(cl > 0 && cd > 0, "fused compressed attention: l and d must be positive");
    auto dt = nsa_glue::common_type(*q, *ck, *cv);
    TORCH_CHECK(dt == at::kBFloat16, "fused compressed attention: computes in bf16 only, got ", dt);
    auto qc = q->to(dt), kc = ck->to(dt), vc = cv->to(dt);
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    Tensor out, lse;
    if (autograd != 0) {
      auto res = CompressedFused::apply(qc, kc, vc, cl, cd, scale,
                                        reinterpret_cast<int64_t>(table), int64_t(backend));
      out = res[0];
      lse = res[1];
    } else {
      c10::DeviceGuard guard(q->device());
      auto res = cmp_forward_any(table, backend, aligned(qc), aligned(kc), aligned(vc), cl, cd,
                                 scale);
      out = std::get<0>(res);
      lse = std::get<1>(res);
    }
    *out_p = new at::Tensor(std::move(out));
    *lse_p = new at::Tensor(std::move(lse));
    return 0;
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return -1;
  }
}

// Block selection from the compressed branch's lse (compressed.cu, nsa_cmp_select_*): ids int64
// [B, S, Hkv, n] (ascending, -1 padded) as a new tensor. q and ck bf16 or fp32 (one type),
// dk in {64, 128, 192}; lse fp32 [B, S, H]; taps: Eq. 9's overlap (first, step, count weights).
// warps: a CTA's warps, 4 or 8 (bf16 only), or 0: the size at which an SM holds more rows.
at::Tensor* nsa_fused_select(const at::Tensor* q_in, const at::Tensor* ck_in,
                             const at::Tensor* lse_in, int64_t cl, int64_t cd, int64_t L,
                             int64_t n, int64_t n_local, int64_t tap_first, int64_t tap_step,
                             const int64_t* tap_w, int64_t tap_count, double scale,
                             int64_t warps, const NsaSlcTable* tab, char* err, size_t err_len) {
  try {
    TORCH_CHECK(tab != nullptr, "fused selection: no kernel table");
    TORCH_CHECK(q_in->is_cuda(), "fused selection: CUDA tensors only");
    TORCH_CHECK(q_in->scalar_type() == ck_in->scalar_type() &&
                    (q_in->scalar_type() == at::kBFloat16 || q_in->scalar_type() == at::kFloat),
                "fused selection: q and compressed keys must both be bf16 or both fp32");
    TORCH_CHECK(tap_count >= 1 && tap_count <= kMaxTaps, "fused selection: 1 to ", kMaxTaps,
                " overlap taps, got ", tap_count);
    TORCH_CHECK(cl > 0 && cd > 0 && L > 0 && n > 0 && n_local >= 0 && tap_step > 0,
                "fused selection: bad selection parameters");
    TORCH_CHECK(n <= 32, "fused selection: at most 32 blocks per token (a warp's lanes), got ", n);
    c10::DeviceGuard guard(q_in->device());
    auto q = aligned(*q_in), ck = aligned(*ck_in);
    auto lse = lse_in->to(at::kFloat).contiguous();
    int64_t B = q.size(0), S = q.size(1), H = q.size(2), dk = q.size(3);
    int64_t Nc = ck.size(1), Hkv = ck.size(2), hpg = H / Hkv;
    TORCH_CHECK(lse.sizes() == at::IntArrayRef({B, S, H}), "fused selection: lse must be [B, S, H]");
    int di = dim_index(dk);
    bool bf = q.scalar_type() == at::kBFloat16;
    TORCH_CHECK(di >= 0 && hpg <= kM, "fused selection: dk in {64, 128, 192} and at most 64 "
                "heads per group only");
    TORCH_CHECK(warps == 0 || warps == 4 || (warps == 8 && bf),
                "fused selection: CTAs of 4 or 8 warps (8 for bf16 only), got ", warps);
    int64_t Nb = (S + L - 1) / L;
    NsaSelectArgs sa{};
    sa.L = int(L);
    sa.n = int(n);
    sa.n_local = int(n_local);
    sa.Nb = int(Nb);
    sa.taps.first = int(tap_first);
    sa.taps.step = int(tap_step);
    sa.taps.count = int(tap_count);
    for (int64_t i = 0; i < tap_count; ++i) sa.taps.w[i] = int(tap_w[i]);
    // The block-score ring per token (compressed.cu, cmp_select): R * step >= 63 + count.
    sa.ring = int(next_pow2((63 + tap_count + tap_step - 1) / tap_step));
    int64_t qs = bf ? dk + 8 : dk + 1, esz = bf ? 2 : 4;
    auto smem = [&](int64_t w, int64_t bq) {
      int64_t m = 16 * w, pt = bf && hpg == 16 ? 0 : m * 72;  // compressed.cu's p tile, NSA_PT
      // 2 K tiles (bf16 stages Q in them), fp32 a Q tile too; lse2, p, ps, the score ring, the
      // top lists (scores, blocks, lengths), nvis, current blocks
      return (bf ? 2 : 3) * kM * qs * esz +
             4 * (m + pt + bq * 64 + bq * sa.ring + bq * 64 + 3 * bq);
    };
    // Per CTA size: its tokens (16 w / G), and the rows (token, head) an SM then holds: its
    // shared memory (max_smem plus the 1 KB it reserves per CTA) and the CTAs the kernels'
    // launch bounds promise (NSA_SELECT_MIN_CTAS: 4 of 4 warps at dk 64, else 3; 2 of 8) limit
    // the CTAs.
    struct Fit { int64_t w, bq, rows_per_sm; };
    auto fit = [&](int64_t w) {
      int64_t bq = 16 * w / hpg;
      while (bq > 1 && smem(w, bq) > tab->max_smem) --bq;
      if (smem(w, bq) > tab->max_smem) return Fit{w, 0, 0};
      int64_t bound = w == 8 ? 2 : dk == 64 ? 4 : 3;
      int64_t ctas = std::min<int64_t>((tab->max_smem + 1024) / (smem(w, bq) + 1024), bound);
      return Fit{w, bq, ctas * bq * hpg};
    };
    Fit f = fit(warps == 8 ? 8 : 4);
    if (warps == 0 && bf) {
      Fit f8 = fit(8);
      if (f8.rows_per_sm > f.rows_per_sm) f = f8;
    }
    TORCH_CHECK(f.bq > 0, "fused selection: the kernel's tiles do not fit in shared memory");
    void* fn = tab->cmp_select[(bf ? (f.w == 8 ? 6 : 0) : 3) + di];
    TORCH_CHECK(fn != nullptr, "fused selection: kernel not loaded");
    int64_t bq = f.bq;
    sa.bq = int(bq);
    auto ids = at::empty({B, S, Hkv, n}, q.options().dtype(at::kLong));
    if (S > 0 && B > 0) {
      void* stream = current_stream(q.device());
      void *qp = q.data_ptr(), *kp = ck.data_ptr(), *lp = lse.data_ptr(), *ip = ids.data_ptr();
      int iS = int(S), iNc = int(Nc), iHkv = int(Hkv), ihpg = int(hpg), icl = int(cl),
          icd = int(cd);
      float fscale = float(scale);
      void* args[] = {&qp, &kp, &lp, &ip, &iS, &iNc, &iHkv, &ihpg, &icl, &icd, &fscale, &sa};
      launch(tab, fn, "nsa_cmp_select", (S + bq - 1) / bq, Hkv, B, smem(f.w, bq), stream, args,
             int(32 * f.w));
    }
    return new at::Tensor(std::move(ids));
  } catch (const std::exception& e) {
    write_error(e.what(), err, err_len);
    return nullptr;
  }
}

}  // extern "C"
