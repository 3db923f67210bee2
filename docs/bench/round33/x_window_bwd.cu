// Round 33's variant of the dK/dV kernel (window_bwd.cu) in the ping-pong form of the forward
// and the dq kernel: Q, dO, lse and delta through LEAD + 2 stages with full/empty mbarriers,
// two turns a step (named barriers 1 and 2): [dK += dS^T Q of step i - 1, S^T = K Q^T of step
// i], then [dV += P^T dO, dP^T = V dO^T of step i]; one warpgroup's P^T and dS^T run while the
// tensor cores work on the other's products.
// Compiles against window-pingpong.diff applied to nsa-sys/kernels (not kept; BENCHMARKS.md,
// round 33).
#include "window_bwd.cu"

namespace nsa {

// 4 bytes global -> shared by cp.async (zeros when bytes = 0).
__device__ __forceinline__ void cp_async4_zfill(unsigned dst, const void* src, int bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}

template <int DK, int DV, int LEAD>
__device__ __forceinline__ void window_bwd_dkdv_pp(const WindowBwdArgs& a) {
  static_assert(DK % 64 == 0 && DV % 64 == 0 && DV <= DK, "head sizes of whole slabs, DV <= DK");
  constexpr int BK = 128, BQ = 64, T = kWindowBwdThreads, NS = LEAD + 2;
  constexpr unsigned K_BYTES = BK * DK * 2, V_BYTES = BK * DV * 2, Q_BYTES = BQ * DK * 2,
                     DO_BYTES = BQ * DV * 2;
  extern __shared__ unsigned char smem_raw[];
  const unsigned base = (shared_addr(smem_raw) + 1023u) & ~1023u;
  const unsigned sk = base, sv = sk + K_BYTES, sq = sv + V_BYTES, sdo = sq + NS * Q_BYTES;
  const unsigned sstat = sdo + NS * DO_BYTES;  // [NS][2][BQ] fp32: lse, delta
  float(*stat)[2][BQ] = reinterpret_cast<float(*)[2][BQ]>(smem_raw + (sstat - shared_addr(smem_raw)));
  unsigned long long* full = reinterpret_cast<unsigned long long*>(stat + NS);
  unsigned long long* empty = full + NS;

  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const int k0 = blockIdx.x * BK, kvh = blockIdx.y, b = blockIdx.z;
  const int S = a.S, H = a.H, Hkv = a.Hkv, w = a.window, G = H / Hkv;
  const int q_row = H * DK, k_row = Hkv * DK;
  const long long k_off = ((long long)b * S * Hkv + kvh) * DK;
  const long long q_base = (long long)b * S * H * DK;

  const int k_lo = k0 + 64 * wg, k_hi = min(k_lo + 63, S - 1);
  const int key0 = k_lo + 16 * warp + g;
  const int t_last = min(S - 1, k0 + BK - 1 + w - 1);
  const int NT = (t_last - k0) / BQ + 1, steps = G * NT;
  auto tile_m0 = [&](int i) { return k0 + BQ * (i % NT); };
  auto active = [&](int m0) { return k_lo < S && m0 + BQ - 1 >= k_lo && m0 <= k_hi + w - 1; };

  // Step i's Q, dO tiles and its tokens' lse and delta (0 past S) into stage i % NS, this
  // thread's share reported to the stage's full barrier.
  auto load_step = [&](int i) {
    const unsigned st = (unsigned)(i % NS);
    const int hq = kvh * G + i / NT, m0 = tile_m0(i);
    const long long off = q_base + (long long)hq * DK;
    load_slab_tile<BQ, DV, T>(sdo + st * DO_BYTES, a.dout + off, q_row, m0, S, tid);
    load_slab_tile<BQ, DK, T>(sq + st * Q_BYTES, a.q + off, q_row, m0, S, tid);
    if (tid < 2 * BQ) {
      const int t = m0 + (tid & (BQ - 1));
      const float* src = (tid < BQ ? a.lse : a.delta) + ((long long)b * H + hq) * S + (t < S ? t : 0);
      cp_async4_zfill(sstat + ((st * 2 + (tid >= BQ)) * BQ + (tid & (BQ - 1))) * 4, src, t < S ? 4 : 0);
    }
    cp_async_mbar_arrive(full + st);
  };

  if (tid == 0) {
    for (int st = 0; st < NS; ++st) {
      mbar_init(full + st, T);
      mbar_init(empty + st, T);
    }
    mbar_init_fence();
  }
  __syncthreads();
  load_slab_tile<BK, DK, T>(sk, a.k + k_off, k_row, k0, S, tid);  // K and V land with step 0
  load_slab_tile<BK, DV, T>(sv, a.v + k_off, k_row, k0, S, tid);
  for (int i = 0; i < LEAD && i < steps; ++i) load_step(i);

  float dk[DK / 64][32], dv[DV / 64][32];
#pragma unroll
  for (int n = 0; n < DK / 64; ++n)
#pragma unroll
    for (int e = 0; e < 32; ++e) dk[n][e] = 0.f;
#pragma unroll
  for (int n = 0; n < DV / 64; ++n)
#pragma unroll
    for (int e = 0; e < 32; ++e) dv[n][e] = 0.f;
  float st[32], dpt[32];
  unsigned pt[4][4], dst[4][4];

  if (wg == 1) named_bar_arrive(1, T);
  for (int i = 0; i <= steps; ++i) {
    const int m0 = tile_m0(i);
    const bool act = i < steps && active(m0), prev = i > 0 && active(tile_m0(i - 1));
    const unsigned stg = (unsigned)(i % NS), pstg = (unsigned)((i + NS - 1) % NS);
    if (i < steps) {
      mbar_wait(full + stg, (unsigned)(i / NS) & 1u);
      fence_proxy_async_shared();
    }
    // Turn 1: dK += dS^T Q for step i - 1, S^T = K Q^T for step i.
    named_bar_sync(1 + wg, T);
    if (prev && act) {
      wgmma_fence();
      issue_frag_product<DK, BQ>(dk, dst, sq + pstg * Q_BYTES);
      issue_product<DK, 64, true>(st, sk, BK, wg, sq + stg * Q_BYTES);
      wgmma_commit();
    } else if (prev) {
      wgmma_fence();
      issue_frag_product<DK, BQ>(dk, dst, sq + pstg * Q_BYTES);
      wgmma_commit();
    } else if (act) {
      wgmma_fence();
      issue_product<DK, 64, true>(st, sk, BK, wg, sq + stg * Q_BYTES);
      wgmma_commit();
    }
    named_bar_arrive(2 - wg, T);
    wgmma_wait<0>();
    fence_regs(st);
    fence_acc<DK>(dk);
    keep_frags<4>(dst);
    if (i > 0) mbar_arrive(empty + pstg);
    if (i + LEAD < steps) {
      if (i + LEAD >= NS) mbar_wait(empty + (i + LEAD) % NS, (unsigned)((i + LEAD) / NS - 1) & 1u);
      load_step(i + LEAD);
    }
    if (act) {
      if (k_lo + 63 <= m0 && m0 + BQ - 1 - k_lo < w)
        dkdv_tile_p<false>(st, pt, stat[stg][0], m0, key0, w, a.scale_log2, t4);
      else
        dkdv_tile_p<true>(st, pt, stat[stg][0], m0, key0, w, a.scale_log2, t4);
    }
    // Turn 2: dV += P^T dO and dP^T = V dO^T for step i.
    named_bar_sync(1 + wg, T);
    if (act) {
      wgmma_fence();
      issue_frag_product<DV, BQ>(dv, pt, sdo + stg * DO_BYTES);
      issue_product<DV, 64, true>(dpt, sv, BK, wg, sdo + stg * DO_BYTES);
      wgmma_commit();
    }
    named_bar_arrive(2 - wg, T);
    wgmma_wait<0>();
    fence_acc<DV>(dv);
    fence_regs(dpt);
    keep_frags<4>(pt);
    if (act) dkdv_tile_ds(dpt, pt, dst, stat[stg][1], t4);
  }
  if (wg == 0) named_bar_sync(1, T);

  store_acc_rows<DK>(a.dk + k_off, k_row, dk, a.scale, key0, S, 0, t4);
  store_acc_rows<DV>(a.dv + k_off, k_row, dv, 1.f, key0, S, DK - DV, t4);
}

template <int DK, int DV, int LEAD>
__device__ __forceinline__ void window_bwd_dkdv_pp3(const WindowBwdArgs& a) {
  static_assert(DK % 64 == 0 && DV % 64 == 0 && DV <= DK, "head sizes of whole slabs, DV <= DK");
  constexpr int BK = 128, BQ = 64, T = kWindowBwdThreads, NS = LEAD + 2;
  constexpr unsigned K_BYTES = BK * DK * 2, V_BYTES = BK * DV * 2, Q_BYTES = BQ * DK * 2,
                     DO_BYTES = BQ * DV * 2;
  extern __shared__ unsigned char smem_raw[];
  const unsigned base = (shared_addr(smem_raw) + 1023u) & ~1023u;
  const unsigned sk = base, sv = sk + K_BYTES, sq = sv + V_BYTES, sdo = sq + NS * Q_BYTES;
  const unsigned sstat = sdo + NS * DO_BYTES;  // [NS][2][BQ] fp32: lse, delta
  float(*stat)[2][BQ] = reinterpret_cast<float(*)[2][BQ]>(smem_raw + (sstat - shared_addr(smem_raw)));
  unsigned long long* full = reinterpret_cast<unsigned long long*>(stat + NS);
  unsigned long long* empty = full + NS;

  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const int k0 = blockIdx.x * BK, kvh = blockIdx.y, b = blockIdx.z;
  const int S = a.S, H = a.H, Hkv = a.Hkv, w = a.window, G = H / Hkv;
  const int q_row = H * DK, k_row = Hkv * DK;
  const long long k_off = ((long long)b * S * Hkv + kvh) * DK;
  const long long q_base = (long long)b * S * H * DK;

  const int k_lo = k0 + 64 * wg, k_hi = min(k_lo + 63, S - 1);
  const int key0 = k_lo + 16 * warp + g;
  const int t_last = min(S - 1, k0 + BK - 1 + w - 1);
  const int NT = (t_last - k0) / BQ + 1, steps = G * NT;
  auto tile_m0 = [&](int i) { return k0 + BQ * (i % NT); };
  auto active = [&](int m0) { return k_lo < S && m0 + BQ - 1 >= k_lo && m0 <= k_hi + w - 1; };

  // Step i's Q, dO tiles and its tokens' lse and delta (0 past S) into stage i % NS, this
  // thread's share reported to the stage's full barrier.
  auto load_step = [&](int i) {
    const unsigned st = (unsigned)(i % NS);
    const int hq = kvh * G + i / NT, m0 = tile_m0(i);
    const long long off = q_base + (long long)hq * DK;
    load_slab_tile<BQ, DV, T>(sdo + st * DO_BYTES, a.dout + off, q_row, m0, S, tid);
    load_slab_tile<BQ, DK, T>(sq + st * Q_BYTES, a.q + off, q_row, m0, S, tid);
    if (tid < 2 * BQ) {
      const int t = m0 + (tid & (BQ - 1));
      const float* src = (tid < BQ ? a.lse : a.delta) + ((long long)b * H + hq) * S + (t < S ? t : 0);
      cp_async4_zfill(sstat + ((st * 2 + (tid >= BQ)) * BQ + (tid & (BQ - 1))) * 4, src, t < S ? 4 : 0);
    }
    cp_async_mbar_arrive(full + st);
  };

  if (tid == 0) {
    for (int st = 0; st < NS; ++st) {
      mbar_init(full + st, T);
      mbar_init(empty + st, T);
    }
    mbar_init_fence();
  }
  __syncthreads();
  load_slab_tile<BK, DK, T>(sk, a.k + k_off, k_row, k0, S, tid);  // K and V land with step 0
  load_slab_tile<BK, DV, T>(sv, a.v + k_off, k_row, k0, S, tid);
  for (int i = 0; i < LEAD && i < steps; ++i) load_step(i);

  float dk[DK / 64][32], dv[DV / 64][32];
#pragma unroll
  for (int n = 0; n < DK / 64; ++n)
#pragma unroll
    for (int e = 0; e < 32; ++e) dk[n][e] = 0.f;
#pragma unroll
  for (int n = 0; n < DV / 64; ++n)
#pragma unroll
    for (int e = 0; e < 32; ++e) dv[n][e] = 0.f;
  float st[32], dpt[32];
  unsigned pt[4][4], dst[4][4];

  // Three turns a step, nothing carried across steps: [S^T], [dV += P^T dO, dP^T], [dK += dS^T Q].
  if (wg == 1) named_bar_arrive(1, T);
  for (int i = 0; i < steps; ++i) {
    const int m0 = tile_m0(i);
    const bool act = active(m0);
    const unsigned stg = (unsigned)(i % NS);
    mbar_wait(full + stg, (unsigned)(i / NS) & 1u);
    fence_proxy_async_shared();
    named_bar_sync(1 + wg, T);
    if (act) {
      wgmma_fence();
      issue_product<DK, 64, true>(st, sk, BK, wg, sq + stg * Q_BYTES);
      wgmma_commit();
    }
    named_bar_arrive(2 - wg, T);
    wgmma_wait<0>();
    fence_regs(st);
    if (act) {
      if (k_lo + 63 <= m0 && m0 + BQ - 1 - k_lo < w)
        dkdv_tile_p<false>(st, pt, stat[stg][0], m0, key0, w, a.scale_log2, t4);
      else
        dkdv_tile_p<true>(st, pt, stat[stg][0], m0, key0, w, a.scale_log2, t4);
    }
    named_bar_sync(1 + wg, T);
    if (act) {
      wgmma_fence();
      issue_frag_product<DV, BQ>(dv, pt, sdo + stg * DO_BYTES);
      issue_product<DV, 64, true>(dpt, sv, BK, wg, sdo + stg * DO_BYTES);
      wgmma_commit();
    }
    named_bar_arrive(2 - wg, T);
    wgmma_wait<0>();
    fence_acc<DV>(dv);
    fence_regs(dpt);
    keep_frags<4>(pt);
    if (act) dkdv_tile_ds(dpt, pt, dst, stat[stg][1], t4);
    named_bar_sync(1 + wg, T);
    if (act) {
      fence_acc<DK>(dk);
      wgmma_fence();
      issue_frag_product<DK, BQ>(dk, dst, sq + stg * Q_BYTES);
      wgmma_commit();
    }
    named_bar_arrive(2 - wg, T);
    wgmma_wait<0>();
    fence_acc<DK>(dk);
    keep_frags<4>(dst);
    mbar_arrive(empty + stg);
    if (i + LEAD < steps) {
      if (i + LEAD >= NS) mbar_wait(empty + (i + LEAD) % NS, (unsigned)((i + LEAD) / NS - 1) & 1u);
      load_step(i + LEAD);
    }
  }
  if (wg == 0) named_bar_sync(1, T);

  store_acc_rows<DK>(a.dk + k_off, k_row, dk, a.scale, key0, S, 0, t4);
  store_acc_rows<DV>(a.dv + k_off, k_row, dv, 1.f, key0, S, DK - DV, t4);
}

}  // namespace nsa

#define NSA_WINDOW_BWD_X(DK, DV, LEAD)                                                       \
  extern "C" __global__ void __launch_bounds__(nsa::kWindowBwdThreads, 1)                   \
      x_dkdv_pp_dk##DK##_dv##DV(nsa::WindowBwdArgs a) {                                     \
    nsa::window_bwd_dkdv_pp<DK, DV, LEAD>(a);                                                \
  }
NSA_WINDOW_BWD_X(64, 64, 2)
NSA_WINDOW_BWD_X(128, 64, 2)
NSA_WINDOW_BWD_X(128, 128, 2)
NSA_WINDOW_BWD_X(192, 64, 2)
NSA_WINDOW_BWD_X(192, 128, 1)

#define NSA_WINDOW_BWD_X3(DK, DV, LEAD)                                                      \
  extern "C" __global__ void __launch_bounds__(nsa::kWindowBwdThreads, 1)                   \
      x_dkdv_pp3_dk##DK##_dv##DV(nsa::WindowBwdArgs a) {                                    \
    nsa::window_bwd_dkdv_pp3<DK, DV, LEAD>(a);                                               \
  }
NSA_WINDOW_BWD_X3(64, 64, 1)
NSA_WINDOW_BWD_X3(128, 64, 1)
NSA_WINDOW_BWD_X3(128, 128, 1)
NSA_WINDOW_BWD_X3(192, 64, 1)
NSA_WINDOW_BWD_X3(192, 128, 1)
