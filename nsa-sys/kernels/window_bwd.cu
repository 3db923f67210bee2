// Sliding-window attention, backward, on Hopper tensor cores (wgmma; compiled for sm_90a only).
// Deterministic: no float atomics; every gradient element is summed by one thread in a fixed
// order.
//
// Equation. With the forward of window_fwd.cu (keys W(t) = { s : t - w < s <= t }, natural-log
// lse[b, h, t], scale the softmax scale), P[t, s] = exp(scale q_t . k_s - lse_t) for s in W(t),
// dP[t, s] = do_t . v_s, delta_t = do_t . o_t (o's first DV columns) and
// dS[t, s] = P[t, s] (dP[t, s] - delta_t):
//   dq[b, t, h]      = scale sum_{s in W(t)} dS[t, s] k[b, s, g],
//   dk[b, s, g]      = scale sum_{h in group g} sum_{t : s in W(t)} dS[t, s] q[b, t, h],
//   dv[b, s, g]      = sum_{h in group g} sum_{t : s in W(t)} P[t, s] do[b, t, h].
// P and dS are rounded to bf16 for their products (as flash attention does); sums in fp32.
//
// Two kernels, launched in this order on one stream:
// - nsa_window_bwd_dq_*: query-outer, one CTA of two warpgroups per (128 tokens, head, batch),
//   warpgroup i over tokens 64i .. 64i + 63. First delta for its tokens (written to
//   delta[b, h, t] for the second kernel), then over the key tiles of BN keys that meet its
//   tokens' windows (K and V double-buffered by cp.async): S = Q K^T and dP = dO V^T by wgmma
//   (m64nBN, operands from shared memory, K-major), P and dS in registers (the mask on tiles
//   that cross a window edge), dQ += dS K by m64n64k16 wgmmas with dS from registers and K read
//   transposed (MN-major). dQ leaves through shared memory in 16-byte row chunks.
// - nsa_window_bwd_dkdv_*: key-outer, one CTA of two warpgroups per (128 keys, KV head, batch),
//   warpgroup i over keys 64i .. 64i + 63, walking every head of the group and every 64-token
//   query tile whose windows meet its keys (Q, dO, lse and delta double-buffered): S^T = K Q^T
//   by m64n64 wgmmas, P^T in registers, dV += P^T dO (P^T from registers, dO read transposed)
//   issued together with dP^T = V dO^T, then dS^T = P^T (dP^T - delta) and dK += dS^T Q (Q read
//   transposed). dK and dV stay in registers over the whole walk (the group's heads summed
//   there), and are written once.
// Recomputing S and dP in both kernels costs about 60 % more tensor work than one kernel with
// dQ summed by atomics, and keeps the result deterministic.
//
// Layouts (bf16, contiguous): q, dq [B, S, H, DK]; do [B, S, H, DV]; o [B, S, H, o_cols] (the
// forward's output: DV columns, or DK with zeros after the first DV when flash's backward might
// have read it; only the first DV are read); k, dk [B, S, Hkv, DK]; v, dv [B, S, Hkv, DV]; lse,
// delta fp32 [B, H, S]. Shared memory (wgmma.cuh's slabs, 1024-byte aligned): dq kernel Q [128][DK],
// dO [128][DV], K [2][BN][DK], V [2][BN][DV], delta [128] fp32; dkdv kernel K [128][DK],
// V [128][DV], Q [2][64][DK], dO [2][64][DV], lse [2][64] and delta [2][64] fp32.
#include "wgmma.cuh"

namespace nsa {

// Mirror: glue/window.cpp, NsaWindowBwdArgs.
struct WindowBwdArgs {
  const __nv_bfloat16* q;
  const __nv_bfloat16* k;
  const __nv_bfloat16* v;
  const __nv_bfloat16* o;
  const __nv_bfloat16* dout;
  const float* lse;
  float* delta;
  __nv_bfloat16* dq;
  __nv_bfloat16* dk;
  __nv_bfloat16* dv;
  int S, H, Hkv, window;
  int o_cols;               // o's columns: DV, or DK (zero-padded)
  float scale, scale_log2;  // scale, scale * log2(e)
};

constexpr int kWindowBwdThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float bf16_lo(unsigned x) { return __uint_as_float(x << 16); }
__device__ __forceinline__ float bf16_hi(unsigned x) { return __uint_as_float(x & 0xffff0000u); }

// ---------------------------------------------------------------------------------------------
// dQ (and delta), query-outer.

// dS for one key tile of this thread's rows row0, row1 (accumulator layout), packed as bf16 A
// fragments; with MASK, keys outside a row's window count as P = 0.
template <int BN, bool MASK>
__device__ __forceinline__ void dq_tile_ds(const float (&s)[BN / 2], const float (&dp)[BN / 2],
                                           unsigned (&ds)[BN / 16][4], int c0, int row0, int row1,
                                           int w, float scale_log2, float l0, float l1, float d0,
                                           float d1, int t4) {
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    float x[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int i = 8 * kk + e;
      const bool second = (e & 2) != 0;  // elements 2, 3, 6, 7 are row1's
      const int key = c0 + 8 * (i >> 2) + 2 * t4 + (e & 1);
      const int row = second ? row1 : row0;
      float p = fast_exp2(fmaf(s[i], scale_log2, second ? -l1 : -l0));
      if (MASK && !(key <= row && key > row - w)) p = 0.f;
      x[e] = p * (dp[i] - (second ? d1 : d0));
    }
    ds[kk][0] = pack_bf16(x[0], x[1]);
    ds[kk][1] = pack_bf16(x[2], x[3]);
    ds[kk][2] = pack_bf16(x[4], x[5]);
    ds[kk][3] = pack_bf16(x[6], x[7]);
  }
}

template <int DK, int DV, int BN>
__device__ __forceinline__ void window_bwd_dq(const WindowBwdArgs& a) {
  static_assert(DK % 64 == 0 && DV % 64 == 0 && DV <= DK, "head sizes of whole slabs, DV <= DK");
  constexpr int BM = 128, T = kWindowBwdThreads;
  constexpr unsigned Q_BYTES = BM * DK * 2, DO_BYTES = BM * DV * 2, K_BYTES = BN * DK * 2,
                     V_BYTES = BN * DV * 2;
  static_assert(BM * (DK + 8) * 2 <= (int)(Q_BYTES + DO_BYTES), "the dq tile must fit");
  extern __shared__ unsigned char smem_raw[];
  const unsigned base = (shared_addr(smem_raw) + 1023u) & ~1023u;
  const unsigned sq = base, sdo = sq + Q_BYTES, sk = sdo + DO_BYTES, sv = sk + 2 * K_BYTES;
  // The tokens' delta after the tiles (dynamic shared memory only: the host allows the
  // device's whole opt-in size as dynamic).
  float* sdelta = reinterpret_cast<float*>(smem_raw + (sv + 2 * V_BYTES - shared_addr(smem_raw)));

  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const int t0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const int S = a.S, H = a.H, Hkv = a.Hkv, w = a.window, kvh = h / (H / Hkv);
  const int q_row = H * DK, k_row = Hkv * DK, do_row = H * DV, v_row = Hkv * DV;
  const int o_row = H * a.o_cols;
  const long long q_off = ((long long)b * S * H + h) * DK;
  const __nv_bfloat16* q = a.q + q_off;
  const __nv_bfloat16* dout = a.dout + ((long long)b * S * H + h) * DV;
  const __nv_bfloat16* o = a.o + ((long long)b * S * H + h) * a.o_cols;
  const __nv_bfloat16* k = a.k + ((long long)b * S * Hkv + kvh) * DK;
  const __nv_bfloat16* v = a.v + ((long long)b * S * Hkv + kvh) * DV;

  const int j0 = max(0, t0 - w + 1) / BN, j1 = min(S - 1, t0 + BM - 1) / BN;
  const int r_lo = t0 + 64 * wg, r_hi = min(r_lo + 63, S - 1);
  const int lr0 = 64 * wg + 16 * warp + g;
  const int row0 = t0 + lr0, row1 = row0 + 8;
  auto active = [&](int j) { return r_lo < S && j * BN <= r_hi && j * BN + BN - 1 > r_lo - w; };

  load_slab_tile<BM, DK, T>(sq, q, q_row, t0, S, tid);
  load_slab_tile<BM, DV, T>(sdo, dout, do_row, t0, S, tid);
  load_slab_tile<BN, DK, T>(sk, k, k_row, j0 * BN, S, tid);
  load_slab_tile<BN, DV, T>(sv, v, v_row, j0 * BN, S, tid);
  cp_async_commit();

  // delta = do . o over the first DV columns: two threads a token, DV / 2 columns each.
  {
    const int r = tid >> 1, half = tid & 1, t = t0 + r;
    float acc = 0.f;
    if (t < S) {
      const __nv_bfloat16* orow = o + (long long)t * o_row + half * (DV / 2);
      const __nv_bfloat16* drow = dout + (long long)t * do_row + half * (DV / 2);
#pragma unroll
      for (int c = 0; c < DV / 2; c += 8) {
        const uint4 x = *reinterpret_cast<const uint4*>(orow + c);
        const uint4 y = *reinterpret_cast<const uint4*>(drow + c);
        const unsigned xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
          acc += bf16_lo(xs[i]) * bf16_lo(ys[i]) + bf16_hi(xs[i]) * bf16_hi(ys[i]);
      }
    }
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    if (half == 0) {
      sdelta[r] = acc;
      if (t < S) a.delta[((long long)b * H + h) * S + t] = acc;
    }
  }
  const float* lse = a.lse + ((long long)b * H + h) * S;
  // Rows past S: Q and dO are zero there, so dS = P (0 - 0) = 0 whatever lse is.
  const float l0 = row0 < S ? lse[row0] * kLog2e : 0.f, l1 = row1 < S ? lse[row1] * kLog2e : 0.f;

  float dq[DK / 64][32];
#pragma unroll
  for (int n = 0; n < DK / 64; ++n)
#pragma unroll
    for (int i = 0; i < 32; ++i) dq[n][i] = 0.f;
  float s[BN / 2], dp[BN / 2];
  unsigned ds[BN / 16][4];
  float d0 = 0.f, d1 = 0.f;

  for (int j = j0; j <= j1; ++j) {
    const unsigned stg = (unsigned)(j - j0) & 1u;
    if (j < j1) {
      load_slab_tile<BN, DK, T>(sk + (stg ^ 1u) * K_BYTES, k, k_row, (j + 1) * BN, S, tid);
      load_slab_tile<BN, DV, T>(sv + (stg ^ 1u) * V_BYTES, v, v_row, (j + 1) * BN, S, tid);
      cp_async_commit();
    }
    stage_ready(j < j1);
    if (j == j0) {
      d0 = sdelta[lr0];
      d1 = sdelta[lr0 + 8];
    }
    if (active(j)) {
      wgmma_fence();
      issue_product<DK, BN, true>(s, sq, BM, wg, sk + stg * K_BYTES);
      issue_product<DV, BN, true>(dp, sdo, BM, wg, sv + stg * V_BYTES);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(s);
      fence_regs(dp);
      const int c0 = j * BN;
      if (c0 + BN - 1 > r_lo || c0 < r_hi - w + 1)
        dq_tile_ds<BN, true>(s, dp, ds, c0, row0, row1, w, a.scale_log2, l0, l1, d0, d1, t4);
      else
        dq_tile_ds<BN, false>(s, dp, ds, c0, row0, row1, w, a.scale_log2, l0, l1, d0, d1, t4);
      fence_acc<DK>(dq);
      wgmma_fence();
      issue_frag_product<DK, BN>(dq, ds, sk + stg * K_BYTES);
      wgmma_commit();
      wgmma_wait<0>();
      fence_acc<DK>(dq);
      keep_frags<BN / 16>(ds);
    }
    __syncthreads();
  }

  // dq * scale through shared memory (the Q and dO space), row stride DK + 8 against bank
  // conflicts, then out in 16-byte chunks.
  constexpr int OS = DK + 8;
  __nv_bfloat16* so = reinterpret_cast<__nv_bfloat16*>(smem_raw + (base - shared_addr(smem_raw)));
  stage_acc_rows<DK, OS>(so, dq, lr0, a.scale, a.scale, t4);
  __syncthreads();
  copy_staged_rows<BM, DK, OS, T>(a.dq + q_off, q_row, so, t0, S, tid);
}

// ---------------------------------------------------------------------------------------------
// dK and dV, key-outer.

// P^T for one query tile (this thread's keys key0, key1 = key0 + 8 are the accumulator rows,
// the tile's queries its columns), packed as bf16 A fragments; with MASK, pairs outside the
// window count as 0. slse: the tile's 64 lse values (natural log).
template <bool MASK>
__device__ __forceinline__ void dkdv_tile_p(const float (&st)[32], unsigned (&pt)[4][4],
                                            const float* slse, int m0, int key0, int w,
                                            float scale_log2, int t4) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    float x[8];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int col = 16 * kk + 8 * half + 2 * t4;  // this thread's two query columns
      const float2 l = *reinterpret_cast<const float2*>(slse + col);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = 8 * kk + 4 * half + e;
        const int key = key0 + ((e & 2) ? 8 : 0), t = m0 + col + (e & 1);
        float p = fast_exp2(fmaf(st[i], scale_log2, -((e & 1) ? l.y : l.x) * kLog2e));
        if (MASK && !(key <= t && key > t - w)) p = 0.f;
        x[4 * half + e] = p;
      }
    }
    pt[kk][0] = pack_bf16(x[0], x[1]);
    pt[kk][1] = pack_bf16(x[2], x[3]);
    pt[kk][2] = pack_bf16(x[4], x[5]);
    pt[kk][3] = pack_bf16(x[6], x[7]);
  }
}

// dS^T = P^T (dP^T - delta) from P^T's bf16 fragments, packed the same way.
__device__ __forceinline__ void dkdv_tile_ds(const float (&dpt)[32], const unsigned (&pt)[4][4],
                                             unsigned (&dst)[4][4], const float* sdel, int t4) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    float x[8];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float2 d = *reinterpret_cast<const float2*>(sdel + 16 * kk + 8 * half + 2 * t4);
      const unsigned p01 = pt[kk][2 * half], p23 = pt[kk][2 * half + 1];
      const int i = 8 * kk + 4 * half;
      x[4 * half + 0] = bf16_lo(p01) * (dpt[i] - d.x);
      x[4 * half + 1] = bf16_hi(p01) * (dpt[i + 1] - d.y);
      x[4 * half + 2] = bf16_lo(p23) * (dpt[i + 2] - d.x);
      x[4 * half + 3] = bf16_hi(p23) * (dpt[i + 3] - d.y);
    }
    dst[kk][0] = pack_bf16(x[0], x[1]);
    dst[kk][1] = pack_bf16(x[2], x[3]);
    dst[kk][2] = pack_bf16(x[4], x[5]);
    dst[kk][3] = pack_bf16(x[6], x[7]);
  }
}

// Writes rows key0, key0 + 8 of a 64 x N accumulator times sc as bf16 into dst (row stride
// `row`); rows at or past S are skipped.
template <int N>
__device__ __forceinline__ void store_acc_rows(__nv_bfloat16* dst, int row,
                                               const float (&acc)[N / 64][32], float sc, int key0,
                                               int S, int t4) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int key = key0 + 8 * half;
    if (key >= S) continue;
    __nv_bfloat16* p = dst + (long long)key * row;
#pragma unroll
    for (int n = 0; n < N / 64; ++n)
#pragma unroll
      for (int j8 = 0; j8 < 8; ++j8)
        *reinterpret_cast<unsigned*>(p + 64 * n + 8 * j8 + 2 * t4) =
            pack_bf16(acc[n][4 * j8 + 2 * half] * sc, acc[n][4 * j8 + 2 * half + 1] * sc);
  }
}

template <int DK, int DV>
__device__ __forceinline__ void window_bwd_dkdv(const WindowBwdArgs& a) {
  static_assert(DK % 64 == 0 && DV % 64 == 0 && DV <= DK, "head sizes of whole slabs, DV <= DK");
  constexpr int BK = 128, BQ = 64, T = kWindowBwdThreads;
  constexpr unsigned K_BYTES = BK * DK * 2, V_BYTES = BK * DV * 2, Q_BYTES = BQ * DK * 2,
                     DO_BYTES = BQ * DV * 2;
  extern __shared__ unsigned char smem_raw[];
  const unsigned base = (shared_addr(smem_raw) + 1023u) & ~1023u;
  const unsigned sk = base, sv = sk + K_BYTES, sq = sv + V_BYTES, sdo = sq + 2 * Q_BYTES;
  // Two stages of the query tile's lse and delta after the tiles (as the dq kernel's delta).
  float(*slse)[BQ] =
      reinterpret_cast<float(*)[BQ]>(smem_raw + (sdo + 2 * DO_BYTES - shared_addr(smem_raw)));
  float(*sdel)[BQ] = slse + 2;

  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const int k0 = blockIdx.x * BK, kvh = blockIdx.y, b = blockIdx.z;
  const int S = a.S, H = a.H, Hkv = a.Hkv, w = a.window, G = H / Hkv;
  const int q_row = H * DK, k_row = Hkv * DK, do_row = H * DV, v_row = Hkv * DV;
  const long long k_off = ((long long)b * S * Hkv + kvh) * DK;
  const long long v_off = ((long long)b * S * Hkv + kvh) * DV;
  const long long q_base = (long long)b * S * H * DK, do_base = (long long)b * S * H * DV;

  // This warpgroup's keys k_lo .. k_hi, this thread's two (key0, key0 + 8).
  const int k_lo = k0 + 64 * wg, k_hi = min(k_lo + 63, S - 1);
  const int key0 = k_lo + 16 * warp + g;
  // Query tiles: 64 tokens from k0 up to the last token whose window holds key k0 + 127.
  const int t_last = min(S - 1, k0 + BK - 1 + w - 1);
  const int NT = (t_last - k0) / BQ + 1, steps = G * NT;
  auto active = [&](int m0) { return k_lo < S && m0 + BQ - 1 >= k_lo && m0 <= k_hi + w - 1; };

  // Step i's Q and dO tiles into stage st by cp.async (committed by the caller).
  auto load_step = [&](int i, unsigned st) {
    const int hq = kvh * G + i / NT, m0 = k0 + BQ * (i % NT);
    load_slab_tile<BQ, DV, T>(sdo + st * DO_BYTES, a.dout + do_base + (long long)hq * DV, do_row,
                              m0, S, tid);
    load_slab_tile<BQ, DK, T>(sq + st * Q_BYTES, a.q + q_base + (long long)hq * DK, q_row, m0, S,
                              tid);
  };
  // Step i's lse (threads 0 .. 63) or delta (64 .. 127) value for one token, 0 past S (Q and
  // dO are zero there, so the token's terms vanish); loaded a step ahead, stored after the
  // step's products (rows of lse are not 16-byte aligned for cp.async).
  auto fetch_stat = [&](int i) {
    const int hq = kvh * G + i / NT, t = k0 + BQ * (i % NT) + (tid & (BQ - 1));
    const float* src = (tid < BQ ? a.lse : a.delta) + ((long long)b * H + hq) * S;
    return t < S ? src[t] : 0.f;
  };
  auto store_stat = [&](float x, unsigned st) {
    if (tid < 2 * BQ) (tid < BQ ? slse[st] : sdel[st])[tid & (BQ - 1)] = x;
  };

  load_slab_tile<BK, DK, T>(sk, a.k + k_off, k_row, k0, S, tid);
  load_slab_tile<BK, DV, T>(sv, a.v + v_off, v_row, k0, S, tid);
  load_step(0, 0);
  cp_async_commit();
  if (tid < 2 * BQ) store_stat(fetch_stat(0), 0);

  float dk[DK / 64][32], dv[DV / 64][32];
#pragma unroll
  for (int n = 0; n < DK / 64; ++n)
#pragma unroll
    for (int i = 0; i < 32; ++i) dk[n][i] = 0.f;
#pragma unroll
  for (int n = 0; n < DV / 64; ++n)
#pragma unroll
    for (int i = 0; i < 32; ++i) dv[n][i] = 0.f;
  float st[32], dpt[32];
  unsigned pt[4][4], dst[4][4];

  for (int i = 0; i < steps; ++i) {
    const unsigned stg = (unsigned)i & 1u;
    const float next_stat = tid < 2 * BQ && i + 1 < steps ? fetch_stat(i + 1) : 0.f;
    if (i + 1 < steps) {
      load_step(i + 1, stg ^ 1u);
      cp_async_commit();
    }
    stage_ready(i + 1 < steps);
    const int m0 = k0 + BQ * (i % NT);
    if (active(m0)) {
      const unsigned sqs = sq + stg * Q_BYTES, sdos = sdo + stg * DO_BYTES;
      wgmma_fence();
      issue_product<DK, 64, true>(st, sk, BK, wg, sqs);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(st);
      // Every pair valid: all keys <= every token and the last token - the first key < w.
      if (k_lo + 63 <= m0 && m0 + BQ - 1 - k_lo < w)
        dkdv_tile_p<false>(st, pt, slse[stg], m0, key0, w, a.scale_log2, t4);
      else
        dkdv_tile_p<true>(st, pt, slse[stg], m0, key0, w, a.scale_log2, t4);
      fence_acc<DV>(dv);
      wgmma_fence();
      issue_frag_product<DV, BQ>(dv, pt, sdos);
      issue_product<DV, 64, true>(dpt, sv, BK, wg, sdos);
      wgmma_commit();
      wgmma_wait<0>();
      fence_acc<DV>(dv);
      fence_regs(dpt);
      keep_frags<4>(pt);
      dkdv_tile_ds(dpt, pt, dst, sdel[stg], t4);
      fence_acc<DK>(dk);
      wgmma_fence();
      issue_frag_product<DK, BQ>(dk, dst, sqs);
      wgmma_commit();
      wgmma_wait<0>();
      fence_acc<DK>(dk);
      keep_frags<4>(dst);
    }
    if (i + 1 < steps) store_stat(next_stat, stg ^ 1u);
    __syncthreads();
  }

  store_acc_rows<DK>(a.dk + k_off, k_row, dk, a.scale, key0, S, t4);
  store_acc_rows<DV>(a.dv + v_off, v_row, dv, 1.f, key0, S, t4);
}

}  // namespace nsa

// Keys per tile of the dq kernel per head sizes: 64 (its dQ, S and dP accumulators and dS
// fragments stay within the register file at DK = 192). The glue's kWgmmaShapes mirrors the
// head-size list (window_fwd.cu's instantiations less (192, 192), whose dK and dV accumulators
// alone would take 192 registers a thread).
#define NSA_WINDOW_BWD(DK, DV, BN)                                                           \
  extern "C" __global__ void __launch_bounds__(nsa::kWindowBwdThreads, 1)                   \
      nsa_window_bwd_dq_dk##DK##_dv##DV(nsa::WindowBwdArgs a) {                             \
    nsa::window_bwd_dq<DK, DV, BN>(a);                                                       \
  }                                                                                          \
  extern "C" __global__ void __launch_bounds__(nsa::kWindowBwdThreads, 1)                   \
      nsa_window_bwd_dkdv_dk##DK##_dv##DV(nsa::WindowBwdArgs a) {                           \
    nsa::window_bwd_dkdv<DK, DV>(a);                                                         \
  }
NSA_WINDOW_BWD(64, 64, 64)
NSA_WINDOW_BWD(128, 64, 64)
NSA_WINDOW_BWD(128, 128, 64)
NSA_WINDOW_BWD(192, 64, 64)
NSA_WINDOW_BWD(192, 128, 64)
