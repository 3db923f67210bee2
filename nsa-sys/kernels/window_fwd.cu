// Sliding-window attention, forward, on Hopper tensor cores (wgmma; compiled for sm_90a only).
//
// Equation. For batch b, query head h (key head g = h / (H / Hkv)) and token t:
//   keys W(t) = { s : max(0, t - w + 1) <= s <= t },
//   o[b, t, h, :DV]         = sum_{s in W(t)} softmax_s(scale * q[b, t, h] . k[b, s, g]) v[b, s, g, :DV],
//   o[b, t, h, DV : DV + pad] = 0,
//   lse[b, h, t]            = log sum_{s in W(t)} exp(scale * q[b, t, h] . k[b, s, g])  (natural log),
// accumulated in fp32 with an online softmax in log2 units; P is rounded to bf16 for P V. The
// zero columns and lse's [B, H, S] layout are flash attention's: the glue (window.cpp) hands
// this forward's output and lse to libtorch's flash backward, which runs with one head size
// for q, k and v (the glue pads v with zero columns; this kernel reads only the first DV).
//
// Layouts (bf16, the last dimension contiguous, other strides in WindowFwdArgs, in elements):
// q [B, S, H, DK], k [B, S, Hkv, DK], v [B, S, Hkv, >= DV], o [B, S, H, DV + pad]; lse fp32
// [B, H, S] contiguous.
//
// Tiling: one CTA of WGS warpgroups (128 WGS threads) per (64 WGS consecutive tokens, head,
// batch); warpgroup i owns tokens 64i .. 64i + 63 of the block (the wgmma M of 64). The CTA
// walks the tiles of BN keys that meet its tokens' windows (from the tile of max(0, t0 - w + 1)
// to the tile of its last token) with K and V double-buffered in shared memory by cp.async.
// Per tile and warpgroup: S = Q K^T by DK / 16 wgmma m64nBNk16 (Q and K from shared memory,
// K-major), the mask on tiles that cross a window edge, the online softmax in registers, then
// O += P V by m64n64k16 wgmmas with P from registers (the score accumulators packed to bf16)
// and V read transposed from shared memory (MN-major), DV / 64 per 16 keys; tile j + 1 loads
// meanwhile. A warpgroup skips the tiles outside all of its tokens' windows. (FlashAttention-3's
// overlap inside a warpgroup, the softmax of tile j beside the P V of tile j - 1, measured
// slower here at both the paper's and the 125m head sizes: BENCHMARKS.md, round 31.)
// The first 256 threads copy the tiles (wgmma.cuh's loader takes rows in passes of threads / 8:
// three warpgroups' passes of 48 rows would not divide a tile of 64 keys; four warpgroups' 64
// would, but the kernel was measured with 256 copying threads at every size). The output
// leaves through shared memory (the Q and K space) in 16-byte row chunks.
// Shared memory (wgmma.cuh's swizzled slabs, 1024-byte aligned): Q [64 WGS][DK], K [2][BN][DK],
// V [2][BN][DV]. The instantiations at the end pick BN and WGS per head sizes.
#include "wgmma.cuh"

namespace nsa {

// Mirror: glue/window.cpp, NsaWindowFwdArgs.
struct WindowFwdArgs {
  const __nv_bfloat16* q;
  const __nv_bfloat16* k;
  const __nv_bfloat16* v;
  __nv_bfloat16* o;
  float* lse;
  long long q_batch, k_batch, v_batch, o_batch;  // element strides between sequences
  int q_row, k_row, v_row, o_row;                // ... between tokens
  int q_head, k_head, v_head, o_head;            // ... between heads
  int S, H, Hkv, window, pad;
  float scale_log2;  // scale * log2(e)
};

constexpr int kWindowCopyThreads = 256;  // the threads that copy tiles into shared memory

// The running softmax state of this thread's two rows (log2 units).
struct RowState {
  float m0, m1, l0, l1;
};

// Tile c0's online-softmax step for rows row0 and row1: with MASK (the tile crosses a window
// edge of this warpgroup's rows) keys outside a row's window count as -inf; updates the rows'
// maxima and partial sums, writes P = exp2(s scale - max) as bf16 A fragments pa and returns
// the rescale factors of O. s is only read: in a loop with a P V in flight meanwhile (round
// 31's pipelined variant) an ordinary write to a wgmma's accumulators serialises the stage.
template <int BN, bool MASK>
__device__ __forceinline__ void softmax_tile(const float (&s)[BN / 2], unsigned (&pa)[BN / 16][4],
                                             RowState& st, float& al0, float& al1, int c0,
                                             int row0, int row1, int w, float scale_log2, int t4) {
  float x[BN / 2];
#pragma unroll
  for (int j8 = 0; j8 < BN / 8; ++j8) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int key = c0 + 8 * j8 + 2 * t4 + e;
      x[4 * j8 + e] = !MASK || (key <= row0 && key > row0 - w) ? s[4 * j8 + e] : -INFINITY;
      x[4 * j8 + 2 + e] = !MASK || (key <= row1 && key > row1 - w) ? s[4 * j8 + 2 + e] : -INFINITY;
    }
  }
  float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
  for (int j8 = 0; j8 < BN / 8; ++j8) {
    mx0 = fmaxf(mx0, fmaxf(x[4 * j8], x[4 * j8 + 1]));
    mx1 = fmaxf(mx1, fmaxf(x[4 * j8 + 2], x[4 * j8 + 3]));
  }
#pragma unroll
  for (int sh = 1; sh < 4; sh <<= 1) {
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, sh));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, sh));
  }
  const float n0 = fmaxf(st.m0, mx0 * scale_log2), n1 = fmaxf(st.m1, mx1 * scale_log2);
  // A row with no visible key yet keeps max -inf: subtract 0 so exp2 gives 0, not NaN.
  const float b0 = n0 == -INFINITY ? 0.f : n0, b1 = n1 == -INFINITY ? 0.f : n1;
  al0 = fast_exp2(st.m0 - b0);
  al1 = fast_exp2(st.m1 - b1);
  st.m0 = n0;
  st.m1 = n1;
  float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    float p[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const bool second = (e & 2) != 0;  // elements 2, 3, 6, 7 are row1's
      p[e] = fast_exp2(fmaf(x[8 * kk + e], scale_log2, second ? -b1 : -b0));
      (second ? sum1 : sum0) += p[e];
    }
    pa[kk][0] = pack_bf16(p[0], p[1]);
    pa[kk][1] = pack_bf16(p[2], p[3]);
    pa[kk][2] = pack_bf16(p[4], p[5]);
    pa[kk][3] = pack_bf16(p[6], p[7]);
  }
  st.l0 = st.l0 * al0 + sum0;
  st.l1 = st.l1 * al1 + sum1;
}

// softmax_tile with the mask only where tile c0 crosses a window edge of rows r_lo .. r_hi.
template <int BN>
__device__ __forceinline__ void softmax_step(const float (&s)[BN / 2], unsigned (&pa)[BN / 16][4],
                                             RowState& st, float& al0, float& al1, int c0,
                                             int row0, int row1, int r_lo, int r_hi, int w,
                                             float scale_log2, int t4) {
  if (c0 + BN - 1 > r_lo || c0 < r_hi - w + 1)
    softmax_tile<BN, true>(s, pa, st, al0, al1, c0, row0, row1, w, scale_log2, t4);
  else
    softmax_tile<BN, false>(s, pa, st, al0, al1, c0, row0, row1, w, scale_log2, t4);
}

template <int DV>
__device__ __forceinline__ void rescale(float (&o)[DV / 64][32], float al0, float al1) {
#pragma unroll
  for (int n = 0; n < DV / 64; ++n) {
#pragma unroll
    for (int j8 = 0; j8 < 8; ++j8) {
      o[n][4 * j8] *= al0;
      o[n][4 * j8 + 1] *= al0;
      o[n][4 * j8 + 2] *= al1;
      o[n][4 * j8 + 3] *= al1;
    }
  }
}

// Normalises the rows, writes lse, and stores the CTA's BM x DV output tile (through shared
// memory at `so`, row stride DV + 8 elements against bank conflicts) in 16-byte chunks by its
// T threads, then the pad columns' zeros. Starts with a CTA barrier (the tiles' space is reused).
template <int DV, int BM, int T>
__device__ __forceinline__ void store_rows(const WindowFwdArgs& a, float (&o)[DV / 64][32],
                                           RowState st, __nv_bfloat16* so, int t0, int h, int b,
                                           int row0, int row1, int lr0, int t4, int tid) {
#pragma unroll
  for (int x = 1; x < 4; x <<= 1) {
    st.l0 += __shfl_xor_sync(0xffffffffu, st.l0, x);
    st.l1 += __shfl_xor_sync(0xffffffffu, st.l1, x);
  }
  const float inv0 = st.l0 > 0.f ? 1.f / st.l0 : 0.f, inv1 = st.l1 > 0.f ? 1.f / st.l1 : 0.f;
  constexpr int OS = DV + 8;
  const int S = a.S;
  __syncthreads();
  stage_acc_rows<DV, OS>(so, o, lr0, inv0, inv1, t4);
  if (t4 == 0) {
    float* lse = a.lse + ((long long)b * a.H + h) * S;
    // ln 2 * (max + log2 sum): the natural log-sum-exp of the scaled scores.
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

template <int DK, int DV, int BN, int WGS>
__device__ __forceinline__ void window_fwd(const WindowFwdArgs& a) {
  static_assert(DK % 64 == 0 && DV % 64 == 0 && DV <= DK, "head sizes of whole slabs, DV <= DK");
  static_assert(WGS >= 2 && WGS <= 4, "two to four warpgroups");
  constexpr int BM = 64 * WGS, T = 128 * WGS, LT = kWindowCopyThreads;
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
  // This warpgroup's tokens r_lo .. r_hi (none when r_lo >= S) and this thread's two rows.
  const int r_lo = t0 + 64 * wg, r_hi = min(r_lo + 63, S - 1);
  const int lr0 = 64 * wg + 16 * warp + g;
  const int row0 = t0 + lr0, row1 = row0 + 8;
  // Some key of tile j is visible to some token of this warpgroup (key <= t, key > t - w).
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
      issue_product<DK, BN, false>(s, sq, BM, wg, sk + stg * K_BYTES);  // S = Q K^T
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(s);
      softmax_step<BN>(s, pa, st, al0, al1, j * BN, row0, row1, r_lo, r_hi, w, a.scale_log2, t4);
      rescale<DV>(o, al0, al1);
      fence_acc<DV>(o);
      wgmma_fence();
      issue_frag_product<DV, BN>(o, pa, sv + stg * V_BYTES);  // O += P V
      wgmma_commit();
      wgmma_wait<0>();
      fence_acc<DV>(o);
      keep_frags<BN / 16>(pa);
    }
    __syncthreads();
  }
  __nv_bfloat16* so = reinterpret_cast<__nv_bfloat16*>(smem_raw + (base - shared_addr(smem_raw)));
  store_rows<DV, BM, T>(a, o, st, so, t0, h, b, row0, row1, lr0, t4, tid);
}

}  // namespace nsa

// Keys per tile BN and warpgroups WGS per head sizes, measured on an H100 (BENCHMARKS.md,
// rounds 31 and 34). Two warpgroups: 64 keys at dk = dv = 64 (0.24 ms against 0.33 with 128 at
// the 125m shape, 8k x 4), else 128 while the shared memory allows (DK + DV <= 320; 64 at the
// paper's sizes is 3 % slower), else 64. Four warpgroups (each scheduler interleaves four
// warps instead of two; 123 registers a thread, under the 128 that 512 threads allow) at
// dk = dv = 128 and at the paper's 192 / 128, with 64 keys (128 would overflow the shared
// memory): the paper's forward at 64k 4.71 ms with two, 4.33 with three, 4.11 with four. Three
// warpgroups were 20 % slower at dk = dv = 64; the other sizes were not measured with more
// than two. The glue's kWgmmaShapes mirrors this list.
#define NSA_WINDOW_FWD(DK, DV, BN, WGS)                                                      \
  extern "C" __global__ void __launch_bounds__(128 * WGS, 1)                                \
      nsa_window_fwd_dk##DK##_dv##DV(nsa::WindowFwdArgs a) {                                \
    nsa::window_fwd<DK, DV, BN, WGS>(a);                                                     \
  }
NSA_WINDOW_FWD(64, 64, 64, 2)
NSA_WINDOW_FWD(128, 64, 128, 2)
NSA_WINDOW_FWD(128, 128, 64, 4)
NSA_WINDOW_FWD(192, 64, 128, 2)
NSA_WINDOW_FWD(192, 128, 64, 4)
NSA_WINDOW_FWD(192, 192, 64, 2)
