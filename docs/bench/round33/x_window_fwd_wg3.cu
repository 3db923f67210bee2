// Round 33's prepared variant (needs slab-loader.diff applied; not run): the window forward of
// window_fwd.cu with three warpgroups a CTA (192 tokens, 384 threads) instead of two, so each
// scheduler has three warps to interleave (Nsight Compute: the two-warpgroup kernel issues an
// instruction every 2.1 cycles from 0.65 eligible warps). Fits only with the loader's
// registers (166 a thread at dk = 192, dv = 128; three warpgroups allow 168). The first 256
// threads copy the tiles (the loader's passes are 32 rows); 64 keys a tile (Q [192][192] and
// two stages of K and V fill 153 KB; 128 keys would need 233 KB).
#include "window_fwd.cu"

namespace nsa {

template <int DK, int DV, int BN, int WGS>
__device__ __forceinline__ void window_fwd_wgs(const WindowFwdArgs& a) {
  constexpr int BM = 64 * WGS, T = 128 * WGS, LT = 256;  // LT: the copying threads
  constexpr unsigned Q_BYTES = BM * DK * 2, K_BYTES = BN * DK * 2, V_BYTES = BN * DV * 2;
  static_assert(BM * (DV + 8) * 2 <= (int)(Q_BYTES + K_BYTES), "the output tile must fit");
  extern __shared__ unsigned char smem_raw[];
  const unsigned base = (shared_addr(smem_raw) + 1023u) & ~1023u;
  const unsigned sq = base, sk = base + Q_BYTES, sv = sk + 2 * K_BYTES;

  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const int t0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const int kvh = h / (a.H / a.Hkv);
  const int S = a.S, w = a.window;
  const __nv_bfloat16* q = a.q + b * a.q_batch + (long long)h * a.q_head;
  const __nv_bfloat16* k = a.k + b * a.k_batch + (long long)kvh * a.k_head;
  const __nv_bfloat16* v = a.v + b * a.v_batch + (long long)kvh * a.v_head;
  const bool copier = tid < LT;

  const int j0 = max(0, t0 - w + 1) / BN, j1 = min(S - 1, t0 + BM - 1) / BN;
  const int r_lo = t0 + 64 * wg, r_hi = min(r_lo + 63, S - 1);
  const int lr0 = 64 * wg + 16 * warp + g;
  const int row0 = t0 + lr0, row1 = row0 + 8;
  auto active = [&](int j) { return r_lo < S && j * BN <= r_hi && j * BN + BN - 1 > r_lo - w; };

  float o[DV / 64][32];
#pragma unroll
  for (int n = 0; n < DV / 64; ++n)
#pragma unroll
    for (int i = 0; i < 32; ++i) o[n][i] = 0.f;
  RowState st{-INFINITY, -INFINITY, 0.f, 0.f};
  float s[BN / 2];
  unsigned pa[BN / 16][4];
  float al0, al1;

  if (copier) {
    load_slab_tile<BM, DK, LT>(sq, q, a.q_row, t0, S, tid);
    load_slab_tile<BN, DK, LT>(sk, k, a.k_row, j0 * BN, S, tid);
  }
  cp_async_commit();
  if (copier) load_slab_tile<BN, DV, LT>(sv, v, a.v_row, j0 * BN, S, tid);
  cp_async_commit();

  for (int j = j0; j <= j1; ++j) {
    const unsigned stg = (unsigned)(j - j0) & 1u;
    if (j < j1) {
      if (copier) {
        load_slab_tile<BN, DK, LT>(sk + (stg ^ 1u) * K_BYTES, k, a.k_row, (j + 1) * BN, S, tid);
        load_slab_tile<BN, DV, LT>(sv + (stg ^ 1u) * V_BYTES, v, a.v_row, (j + 1) * BN, S, tid);
      }
      cp_async_commit();
    }
    stage_ready(j < j1);
    if (active(j)) {
      wgmma_fence();
      issue_product<DK, BN, false>(s, sq, BM, wg, sk + stg * K_BYTES);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(s);
      softmax_step<BN>(s, pa, st, al0, al1, j * BN, row0, row1, r_lo, r_hi, w, a.scale_log2, t4);
      rescale<DV>(o, al0, al1);
      fence_acc<DV>(o);
      wgmma_fence();
      issue_frag_product<DV, BN>(o, pa, sv + stg * V_BYTES);
      wgmma_commit();
      wgmma_wait<0>();
      fence_acc<DV>(o);
      keep_frags<BN / 16>(pa);
    }
    __syncthreads();
  }

  // store_rows of window_fwd.cu for BM rows and T threads.
#pragma unroll
  for (int x = 1; x < 4; x <<= 1) {
    st.l0 += __shfl_xor_sync(0xffffffffu, st.l0, x);
    st.l1 += __shfl_xor_sync(0xffffffffu, st.l1, x);
  }
  const float inv0 = st.l0 > 0.f ? 1.f / st.l0 : 0.f, inv1 = st.l1 > 0.f ? 1.f / st.l1 : 0.f;
  constexpr int OS = DV + 8;
  __nv_bfloat16* so = reinterpret_cast<__nv_bfloat16*>(smem_raw + (base - shared_addr(smem_raw)));
  stage_acc_rows<DV, OS>(so, o, lr0, inv0, inv1, t4);
  if (t4 == 0) {
    float* lse = a.lse + ((long long)b * a.H + h) * S;
    if (row0 < S) lse[row0] = 0.69314718f * (st.m0 + __log2f(st.l0));
    if (row1 < S) lse[row1] = 0.69314718f * (st.m1 + __log2f(st.l1));
  }
  __syncthreads();
  __nv_bfloat16* out = a.o + b * a.o_batch + (long long)h * a.o_head;
  copy_staged_rows<BM, DV, OS, T>(out, a.o_row, so, t0, S, tid);
  for (int e = tid; e < BM * (a.pad / 8); e += T) {
    const int r = e / (a.pad / 8), c = e % (a.pad / 8);
    if (t0 + r < S)
      *reinterpret_cast<uint4*>(out + (long long)(t0 + r) * a.o_row + DV + 8 * c) =
          make_uint4(0u, 0u, 0u, 0u);
  }
}

}  // namespace nsa

#define NSA_WINDOW_FWD_WG3(DK, DV, BN)                                                       \
  extern "C" __global__ void __launch_bounds__(384, 1)                                      \
      x_wg3_dk##DK##_dv##DV(nsa::WindowFwdArgs a) {                                          \
    nsa::window_fwd_wgs<DK, DV, BN, 3>(a);                                                   \
  }
NSA_WINDOW_FWD_WG3(192, 128, 64)
NSA_WINDOW_FWD_WG3(64, 64, 64)
NSA_WINDOW_FWD_WG3(128, 128, 64)
