// Round 34's prepared variant (not run): window_bwd.cu's dQ kernel with WGS warpgroups a CTA
// (64 WGS tokens, 128 WGS threads) and 32 keys a tile, so that three warpgroups fit the
// register file at dk = 192 (the committed kernel: two warpgroups, 64 keys, 195 registers; three
// allow 168). Nsight Compute found the window kernels issue-bound (round 33), and four
// warpgroups took the forward from 4.71 to 4.11 ms (round 34); this asks whether the dQ kernel
// (7.8 ms of the backward's 14.0 at the paper shape, 64k) gains the same way. S = Q K^T and
// dP = dO V^T by m64n32k16 (wgmma_ss<32>, added here), dQ += dS K by two k16 steps a tile.
// The first 256 threads copy the tiles (the loader's passes of 32 rows). Same arguments and
// delta output as nsa_window_bwd_dq_*, so nsa_window_bwd_dkdv_* runs after it unchanged.
// Shared memory: Q [64 WGS][DK], dO [64 WGS][DV], K [2][32][DK], V [2][32][DV], delta [64 WGS].
#include "window_bwd.cu"

namespace nsa {

// d (+)= A B for m64n32k16, A and B from shared memory by descriptor, both K-major.
__device__ __forceinline__ void wgmma_ss_n32(float (&d)[16], unsigned long long desc_a,
                                             unsigned long long desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}
template <>
__device__ __forceinline__ void wgmma_ss<32>(float (&d)[16], unsigned long long da,
                                             unsigned long long db, int accumulate) {
  wgmma_ss_n32(d, da, db, accumulate);
}

template <int DK, int DV, int BN, int WGS>
__device__ __forceinline__ void window_bwd_dq_wgs(const WindowBwdArgs& a) {
  static_assert(DK % 64 == 0 && DV % 64 == 0 && DV <= DK, "head sizes of whole slabs, DV <= DK");
  constexpr int BM = 64 * WGS, T = 128 * WGS, LT = 256;
  constexpr unsigned Q_BYTES = BM * DK * 2, DO_BYTES = BM * DV * 2, K_BYTES = BN * DK * 2,
                     V_BYTES = BN * DV * 2;
  static_assert(BM * (DK + 8) * 2 <= (int)(Q_BYTES + DO_BYTES), "the dq tile must fit");
  extern __shared__ unsigned char smem_raw[];
  const unsigned base = (shared_addr(smem_raw) + 1023u) & ~1023u;
  const unsigned sq = base, sdo = sq + Q_BYTES, sk = sdo + DO_BYTES, sv = sk + 2 * K_BYTES;
  float* sdelta = reinterpret_cast<float*>(smem_raw + (sv + 2 * V_BYTES - shared_addr(smem_raw)));

  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const int t0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const int S = a.S, H = a.H, Hkv = a.Hkv, w = a.window, kvh = h / (H / Hkv);
  const int q_row = H * DK, k_row = Hkv * DK;
  const long long q_off = ((long long)b * S * H + h) * DK;
  const __nv_bfloat16* q = a.q + q_off;
  const __nv_bfloat16* dout = a.dout + q_off;
  const __nv_bfloat16* k = a.k + ((long long)b * S * Hkv + kvh) * DK;
  const __nv_bfloat16* v = a.v + ((long long)b * S * Hkv + kvh) * DK;
  const bool copier = tid < LT;

  const int j0 = max(0, t0 - w + 1) / BN, j1 = min(S - 1, t0 + BM - 1) / BN;
  const int r_lo = t0 + 64 * wg, r_hi = min(r_lo + 63, S - 1);
  const int lr0 = 64 * wg + 16 * warp + g;
  const int row0 = t0 + lr0, row1 = row0 + 8;
  auto active = [&](int j) { return r_lo < S && j * BN <= r_hi && j * BN + BN - 1 > r_lo - w; };

  if (copier) {
    load_slab_tile<BM, DK, LT>(sq, q, q_row, t0, S, tid);
    load_slab_tile<BM, DV, LT>(sdo, dout, q_row, t0, S, tid);
    load_slab_tile<BN, DK, LT>(sk, k, k_row, j0 * BN, S, tid);
    load_slab_tile<BN, DV, LT>(sv, v, k_row, j0 * BN, S, tid);
  }
  cp_async_commit();

  // delta = do . o over the first DV columns: two threads a token, DV / 2 columns each.
  {
    const int r = tid >> 1, half = tid & 1, t = t0 + r;
    float acc = 0.f;
    if (t < S) {
      const __nv_bfloat16* orow = a.o + q_off + (long long)t * q_row + half * (DV / 2);
      const __nv_bfloat16* drow = dout + (long long)t * q_row + half * (DV / 2);
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
      if (copier) {
        load_slab_tile<BN, DK, LT>(sk + (stg ^ 1u) * K_BYTES, k, k_row, (j + 1) * BN, S, tid);
        load_slab_tile<BN, DV, LT>(sv + (stg ^ 1u) * V_BYTES, v, k_row, (j + 1) * BN, S, tid);
      }
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

  constexpr int OS = DK + 8;
  __nv_bfloat16* so = reinterpret_cast<__nv_bfloat16*>(smem_raw + (base - shared_addr(smem_raw)));
  stage_acc_rows<DK, OS>(so, dq, lr0, a.scale, a.scale, t4);
  __syncthreads();
  copy_staged_rows<BM, DK, OS, T>(a.dq + q_off, q_row, so, t0, S, tid);
}

}  // namespace nsa

#define X_DQ(DK, DV, BN, WGS)                                                                \
  extern "C" __global__ void __launch_bounds__(128 * WGS, 1)                                \
      x_dq##WGS##_bn##BN##_dk##DK##_dv##DV(nsa::WindowBwdArgs a) {                          \
    nsa::window_bwd_dq_wgs<DK, DV, BN, WGS>(a);                                              \
  }
X_DQ(192, 128, 32, 3)
X_DQ(192, 128, 32, 2)
X_DQ(128, 128, 32, 3)
X_DQ(64, 64, 64, 3)
X_DQ(64, 64, 64, 4)
X_DQ(64, 64, 32, 4)
