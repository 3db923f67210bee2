// The query-outer tensor-core kernels shared by the selected and the compressed branch: a CTA
// of 4 warps serves the M = 64 rows (token, head) of BQ = 64 / hpg consecutive tokens of one
// key group and streams "key columns" in tiles of 64, with a per-(token, column) visibility
// mask. The two branches differ only in where the columns come from (KeySpec):
//   selected   (KEYS_SELECTED): the union of the tokens' selected blocks (mma.cuh, UnionTile),
//              column = a key position in [0, S); token t reads it iff it selected the block
//              and the position is <= t;
//   compressed (KEYS_COMPRESSED): compressed tokens 0 .. F - 1 with F the count visible to the
//              tile's last token; token t reads compressed token i iff i < nvis(t), where
//              nvis(t) = (t - l + 1) / d + 1 for t >= l - 1, else 0 (Eq. 7: i d + l - 1 <= t).
// K / V rows of a column live at [b, column, g] of tensors with kv_len rows per batch (S for the
// selected branch, Nc for the compressed one).
//
// fwd_mma: S = Q K^T, online softmax (log2 units), O += P V; out [B, S, H, DV] bf16 and lse
//   (natural log, +inf for a row that reads nothing, whose output is 0). Two-stage pipeline:
//   the next tile's K / V rows are copied (cp.async) while this one is computed. Shared:
//   Q [64][DK+8], K [2][64][DK+8], V [2][64][DV+8] (bf16), then the union tile.
#pragma once
#include "mma.cuh"

#define NSA_BK 64
#define NSA_M 64
#define NSA_THREADS 128

namespace nsa {

#define KEYS_SELECTED 0
#define KEYS_COMPRESSED 1

struct KeySpec {
  int mode;        // KEYS_SELECTED or KEYS_COMPRESSED
  int kv_len;      // K / V rows per batch
  const int* ids;  // selected: cleaned ids [B, S, Hkv, n]
  int n, L, P;     // selected: ids per token, block length l', union candidate list length
  int cl, cd;      // compressed: block length l and stride d
};

__device__ __forceinline__ KeySpec selected_keys(const int* ids, int n, int L, int P, int S) {
  KeySpec ks;
  ks.mode = KEYS_SELECTED;
  ks.kv_len = S;
  ks.ids = ids;
  ks.n = n;
  ks.L = L;
  ks.P = P;
  ks.cl = ks.cd = 1;
  return ks;
}

__device__ __forceinline__ KeySpec compressed_keys(int Nc, int cl, int cd) {
  KeySpec ks;
  ks.mode = KEYS_COMPRESSED;
  ks.kv_len = Nc;
  ks.ids = nullptr;
  ks.n = 0;
  ks.L = 1;
  ks.P = 32;
  ks.cl = cl;
  ks.cd = cd;
  return ks;
}

// Compressed tokens visible to query t (Eq. 7), at most Nc.
__device__ __forceinline__ int num_visible_compressed(const KeySpec& ks, long long t) {
  if (t < ks.cl - 1) return 0;
  return (int)min((long long)ks.kv_len, (t - ks.cl + 1) / ks.cd + 1);
}

// The K or V rows of key group g in batch b of a [B, kv_len, Hkv, width] tensor: row p at
// base + p * stride. Computed once per CTA, so a tile copy costs one multiply-add per row.
struct GroupRows {
  const __nv_bfloat16* base;
  long long stride;
  // Row p, or nullptr (a zero row for copy_rows) for p < 0.
  __device__ __forceinline__ const __nv_bfloat16* operator()(int p) const {
    return p < 0 ? nullptr : base + p * stride;
  }
};

__device__ __forceinline__ GroupRows group_rows(const __nv_bfloat16* t, int b, int kv_len,
                                                int Hkv, int g, int width) {
  return {t + ((long long)b * kv_len * Hkv + g) * width, (long long)Hkv * width};
}

// Sets up the CTA's column stream (the union for the selected branch) and returns its length F.
// Every thread calls it; it synchronises.
__device__ __forceinline__ long long key_columns_begin(const KeySpec& ks, const UnionTile& un,
                                                       int b, int S, int Hkv, int g, int t0,
                                                       int bq, int tid, int threads) {
  if (ks.mode == KEYS_SELECTED) {
    const int U = build_union(un, ks.ids, b, S, Hkv, g, t0, bq, ks.n, ks.L, ks.P, tid, threads);
    return (long long)U * ks.L;
  }
  __syncthreads();
  return num_visible_compressed(ks, min(t0 + bq, S) - 1);
}

// colpos (K / V row, or -1) and colu of the 64 columns from f0; the caller synchronises.
__device__ __forceinline__ void key_columns(const KeySpec& ks, const UnionTile& un, long long f0,
                                            long long F, int S, int tid, int threads) {
  if (ks.mode == KEYS_SELECTED) {
    union_columns(un, f0, F, ks.L, S, tid, threads);
    return;
  }
  for (int c = tid; c < 64; c += threads) {
    un.colpos[c] = f0 + c < F ? (int)(f0 + c) : -1;
    un.colu[c] = 0;
  }
}

// kmask of the tile's tokens (after key_columns and a barrier); the caller synchronises.
__device__ __forceinline__ void key_mask(const KeySpec& ks, const UnionTile& un, int t0, int bq,
                                         int S, int tid, int threads) {
  if (ks.mode == KEYS_SELECTED) {
    union_mask(un, t0, bq, S, tid, threads);
    return;
  }
  const int warp = tid / 32, lane = tid % 32;
  for (int i = warp; i < bq; i += threads / 32) {
    const int t = t0 + i;
    const int nv = t < S ? num_visible_compressed(ks, t) : 0;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int p = un.colpos[half * 32 + lane];
      const unsigned bits = __ballot_sync(0xffffffffu, p >= 0 && p < nv);
      if (lane == 0) un.kmask[i * 2 + half] = bits;
    }
  }
}

// The two-stage column pipeline of fwd_mma. `issue(bi)` starts copying the K and V rows of
// column set bi into tile buffer bi by cp.async, committed as one group, which pipeline_step
// waits for. pipeline_start sets up and issues tile 0; pipeline_step, at the top of tile f0 in
// buffer bi, sets up tile f0 + 64's columns and this tile's mask, issues the next tile into
// buffer bi ^ 1 and returns once this tile's rows are visible to every thread.
template <typename Issue>
__device__ __forceinline__ void pipeline_start(const KeySpec& ks, const UnionTile& un,
                                               long long F, int S, int tid, Issue issue) {
  if (F > 0) {
    key_columns(ks, un.with_buf(0), 0, F, S, tid, NSA_THREADS);
    __syncthreads();
    issue(0);
  }
}

template <typename Issue>
__device__ __forceinline__ void pipeline_step(const KeySpec& ks, const UnionTile& un,
                                              long long f0, long long F, int bi, int t0, int bq,
                                              int S, int tid, Issue issue) {
  const bool next = f0 + NSA_BK < F;
  if (next) key_columns(ks, un.with_buf(bi ^ 1), f0 + NSA_BK, F, S, tid, NSA_THREADS);
  key_mask(ks, un.with_buf(bi), t0, bq, S, tid, NSA_THREADS);
  __syncthreads();  // the next tile's columns and this tile's mask are visible
  if (next) {
    issue(bi ^ 1);
    cp_async_wait<1>();  // this tile's copies are done, the next's may not be
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();  // every thread's part of this tile is visible
}

template <int DK, int DV>
__device__ void fwd_mma(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                        const __nv_bfloat16* __restrict__ v, const KeySpec ks,
                        __nv_bfloat16* __restrict__ out, float* __restrict__ lse, int S, int Hkv,
                        int hpg, float scale) {
  static_assert(DK % 16 == 0 && DV % 16 == 0, "head sizes must be multiples of 16");
  constexpr int QS = DK + 8;  // row stride of the Q and K tiles (elements)
  constexpr int VS = DV + 8;  // row stride of the V tile
  extern __shared__ __align__(16) unsigned char smraw[];
  __nv_bfloat16* Qs = reinterpret_cast<__nv_bfloat16*>(smraw);
  __nv_bfloat16* Ks = Qs + NSA_M * QS;      // two tiles
  __nv_bfloat16* Vs = Ks + 2 * NSA_BK * QS;  // two tiles
  const int BQ = NSA_M / hpg;
  const UnionTile un = carve_union(reinterpret_cast<int*>(Vs + 2 * NSA_BK * VS), BQ, ks.n, ks.P);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int gq = lane / 4, tig = lane % 4;
  const int t0 = blockIdx.x * BQ, g = blockIdx.y, b = blockIdx.z;
  const int H = Hkv * hpg, nrows = BQ * hpg;

  // Q rows (token, head) -> shared, zeros for rows past the tile or the sequence.
  copy_rows<DK>(Qs, QS, NSA_M, [&](int r) -> const __nv_bfloat16* {
    const int t = t0 + r / hpg;
    if (r >= nrows || t >= S) return nullptr;
    return q + (((long long)b * S + t) * H + g * hpg + r % hpg) * DK;
  }, tid, NSA_THREADS);
  cp_async_wait_all();  // completed for every thread by key_columns_begin's barriers
  const long long F = key_columns_begin(ks, un, b, S, Hkv, g, t0, BQ, tid, NSA_THREADS);

  const int r0 = warp * 16 + gq, r1 = r0 + 8;
  const int i0 = r0 / hpg, i1 = r1 / hpg;
  const bool ok0 = r0 < nrows && t0 + i0 < S, ok1 = r1 < nrows && t0 + i1 < S;
  const float sl2 = scale * 1.4426950408889634f;  // scores in log2 units
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[DV / 8][4];
#pragma unroll
  for (int nv = 0; nv < DV / 8; ++nv) o[nv][0] = o[nv][1] = o[nv][2] = o[nv][3] = 0.f;

  // Two-stage pipeline: tile i + 1's columns are set up and its K / V rows copied (cp.async)
  // while tile i is computed; buffers alternate (K / V tile bi, column set bi).
  const GroupRows krows = group_rows(k, b, ks.kv_len, Hkv, g, DK);
  const GroupRows vrows = group_rows(v, b, ks.kv_len, Hkv, g, DV);
  const auto issue = [&](int bi) {
    const UnionTile cu = un.with_buf(bi);
    copy_rows<DK>(Ks + bi * NSA_BK * QS, QS, NSA_BK, [&](int c) { return krows(cu.colpos[c]); },
                  tid, NSA_THREADS);
    copy_rows<DV>(Vs + bi * NSA_BK * VS, VS, NSA_BK, [&](int c) { return vrows(cu.colpos[c]); },
                  tid, NSA_THREADS);
    cp_async_commit();
  };
  pipeline_start(ks, un, F, S, tid, issue);
  int bi = 0;
  for (long long f0 = 0; f0 < F; f0 += NSA_BK, bi ^= 1) {
    const UnionTile cu = un.with_buf(bi);
    pipeline_step(ks, un, f0, F, bi, t0, BQ, S, tid, issue);
    const __nv_bfloat16* Kt = Ks + bi * NSA_BK * QS;
    const __nv_bfloat16* Vt = Vs + bi * NSA_BK * VS;
    const unsigned mk0[2] = {ok0 ? cu.kmask[i0 * 2] : 0u, ok0 ? cu.kmask[i0 * 2 + 1] : 0u};
    const unsigned mk1[2] = {ok1 ? cu.kmask[i1 * 2] : 0u, ok1 ? cu.kmask[i1 * 2 + 1] : 0u};
    // A warp whose rows read none of the tile's columns skips it: for such rows the tile would
    // leave m, l and o exactly as they are. Union tiles hold every token's blocks, so at
    // G = 16 (a warp = one token) a warp computes only the tiles of its own token's blocks.
    if (__any_sync(0xffffffffu, (mk0[0] | mk0[1] | mk1[0] | mk1[1]) != 0u)) {
      float sacc[NSA_BK / 8][4];
#pragma unroll
      for (int nt = 0; nt < NSA_BK / 8; ++nt) {
        sacc[nt][0] = sacc[nt][1] = sacc[nt][2] = sacc[nt][3] = 0.f;
      }
#pragma unroll
      for (int kt = 0; kt < DK / 16; ++kt) {
        unsigned a[4];
        load_a_x4(a, Qs, QS, warp * 16, kt * 16, lane);
#pragma unroll
        for (int nt = 0; nt < NSA_BK / 8; nt += 2) {
          unsigned bb[4];
          load_b_x2(bb, Kt, QS, nt * 8, kt * 16, lane);
          mma_bf16(sacc[nt], a[0], a[1], a[2], a[3], bb[0], bb[1]);
          mma_bf16(sacc[nt + 1], a[0], a[1], a[2], a[3], bb[2], bb[3]);
        }
      }
      // Mask, online softmax (rows r0: elements 0, 1; r1: elements 2, 3).
      float mx[2] = {m[0], m[1]};
#pragma unroll
      for (int nt = 0; nt < NSA_BK / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool vis = frag_visible(e < 2 ? mk0 : mk1, nt, tig, e & 1);
          const float s = vis ? sacc[nt][e] * sl2 : -INFINITY;
          sacc[nt][e] = s;
          mx[e / 2] = fmaxf(mx[e / 2], s);
        }
      }
      float alpha[2];
#pragma unroll
      for (int rh = 0; rh < 2; ++rh) {
        mx[rh] = fmaxf(mx[rh], __shfl_xor_sync(0xffffffffu, mx[rh], 1));
        mx[rh] = fmaxf(mx[rh], __shfl_xor_sync(0xffffffffu, mx[rh], 2));
        // All-masked so far: keep the reference at 0 so exp2(-inf - 0) = 0, never NaN.
        const float ref = mx[rh] == -INFINITY ? 0.f : mx[rh];
        alpha[rh] = fast_exp2(m[rh] - ref);
        m[rh] = mx[rh];
        mx[rh] = ref;
      }
      float lsum[2] = {0.f, 0.f};
#pragma unroll
      for (int nt = 0; nt < NSA_BK / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float p = fast_exp2(sacc[nt][e] - mx[e / 2]);
          sacc[nt][e] = p;
          lsum[e / 2] += p;
        }
      }
      l[0] = l[0] * alpha[0] + lsum[0];
      l[1] = l[1] * alpha[1] + lsum[1];
#pragma unroll
      for (int nv = 0; nv < DV / 8; ++nv) {
        o[nv][0] *= alpha[0];
        o[nv][1] *= alpha[0];
        o[nv][2] *= alpha[1];
        o[nv][3] *= alpha[1];
      }
      mma_c_tile<DV>(o, sacc, Vt, VS, lane);  // O += P V
    }  // the warp reads the tile
    __syncthreads();
  }

#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    l[rh] += __shfl_xor_sync(0xffffffffu, l[rh], 1);
    l[rh] += __shfl_xor_sync(0xffffffffu, l[rh], 2);
  }
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    const int r = rh == 0 ? r0 : r1;
    if (!(rh == 0 ? ok0 : ok1)) continue;
    const int t = t0 + r / hpg;
    const long long orow = ((long long)b * S + t) * H + g * hpg + r % hpg;
    const float inv = l[rh] > 0.f ? 1.f / l[rh] : 0.f;
#pragma unroll
    for (int nv = 0; nv < DV / 8; ++nv) {
      __nv_bfloat162 pair = __floats2bfloat162_rn(o[nv][2 * rh] * inv, o[nv][2 * rh + 1] * inv);
      *reinterpret_cast<__nv_bfloat162*>(out + orow * DV + nv * 8 + tig * 2) = pair;
    }
    if (tig == 0) lse[orow] = l[rh] > 0.f ? (m[rh] + log2f(l[rh])) * 0.6931471805599453f : INFINITY;
  }
}


// dq, query-outer, over the forward's key columns: rows (token, head) as the forward;
// per key tile S = Q K^T and dP = dO V^T on tensor cores, p = exp2(S * scale * log2 e - lse2),
// ds = p (dP - D) scale, dq += ds K (ds re-used from registers as the A operand, K's fragments
// by ldmatrix .trans). Shared: Q [64][DK+8], dO [64][DV+8], K [64][DK+8], V [64][DV+8] (bf16),
// lse2, D [64] (fp32), then the union tile.
template <int DK, int DV>
__device__ void dq_mma(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                       const __nv_bfloat16* __restrict__ v, const KeySpec ks,
                       const __nv_bfloat16* __restrict__ dout, const float* __restrict__ lse,
                       const float* __restrict__ D, __nv_bfloat16* __restrict__ dq, int S, int Hkv,
                       int hpg, float scale) {
  constexpr int QS = DK + 8, VS = DV + 8;
  extern __shared__ __align__(16) unsigned char smraw[];
  __nv_bfloat16* Qs = reinterpret_cast<__nv_bfloat16*>(smraw);
  __nv_bfloat16* dOs = Qs + NSA_M * QS;
  __nv_bfloat16* Ks = dOs + NSA_M * VS;
  __nv_bfloat16* Vs = Ks + NSA_BK * QS;
  float* lse2s = reinterpret_cast<float*>(Vs + NSA_BK * VS);
  float* Dsm = lse2s + NSA_M;
  const int BQ = NSA_M / hpg;
  const UnionTile un = carve_union(reinterpret_cast<int*>(Dsm + NSA_M), BQ, ks.n, ks.P);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int gq = lane / 4, tig = lane % 4;
  const int t0 = blockIdx.x * BQ, g = blockIdx.y, b = blockIdx.z;
  const int H = Hkv * hpg, nrows = BQ * hpg;
  const auto row_of = [&](int r) -> long long {  // global (b, t, head) row, or -1
    const int t = t0 + r / hpg;
    if (r >= nrows || t >= S) return -1;
    return ((long long)b * S + t) * H + g * hpg + r % hpg;
  };
  copy_rows<DK>(Qs, QS, NSA_M, [&](int r) -> const __nv_bfloat16* {
    const long long row = row_of(r);
    return row < 0 ? nullptr : q + row * DK;
  }, tid, NSA_THREADS);
  copy_rows<DV>(dOs, VS, NSA_M, [&](int r) -> const __nv_bfloat16* {
    const long long row = row_of(r);
    return row < 0 ? nullptr : dout + row * DV;
  }, tid, NSA_THREADS);
  for (int r = tid; r < NSA_M; r += NSA_THREADS) {
    const long long row = row_of(r);
    lse2s[r] = row < 0 ? INFINITY : lse[row] * 1.4426950408889634f;
    Dsm[r] = row < 0 ? 0.f : D[row];
  }
  cp_async_wait_all();  // completed for every thread by key_columns_begin's barriers
  const long long F = key_columns_begin(ks, un, b, S, Hkv, g, t0, BQ, tid, NSA_THREADS);

  const int r0 = warp * 16 + gq, r1 = r0 + 8;
  const int i0 = r0 / hpg, i1 = r1 / hpg;
  const bool ok0 = r0 < nrows && t0 + i0 < S, ok1 = r1 < nrows && t0 + i1 < S;
  const float sl2 = scale * 1.4426950408889634f;
  const float lr[2] = {lse2s[r0], lse2s[r1]}, dr[2] = {Dsm[r0], Dsm[r1]};
  const GroupRows krows = group_rows(k, b, ks.kv_len, Hkv, g, DK);
  const GroupRows vrows = group_rows(v, b, ks.kv_len, Hkv, g, DV);
  float acc[DK / 8][4];
#pragma unroll
  for (int nd = 0; nd < DK / 8; ++nd) acc[nd][0] = acc[nd][1] = acc[nd][2] = acc[nd][3] = 0.f;

  for (long long f0 = 0; f0 < F; f0 += NSA_BK) {
    key_columns(ks, un, f0, F, S, tid, NSA_THREADS);
    __syncthreads();
    copy_rows<DK>(Ks, QS, NSA_BK, [&](int c) { return krows(un.colpos[c]); }, tid, NSA_THREADS);
    copy_rows<DV>(Vs, VS, NSA_BK, [&](int c) { return vrows(un.colpos[c]); }, tid, NSA_THREADS);
    key_mask(ks, un, t0, BQ, S, tid, NSA_THREADS);
    cp_async_wait_all();
    __syncthreads();
    const unsigned mk0[2] = {ok0 ? un.kmask[i0 * 2] : 0u, ok0 ? un.kmask[i0 * 2 + 1] : 0u};
    const unsigned mk1[2] = {ok1 ? un.kmask[i1 * 2] : 0u, ok1 ? un.kmask[i1 * 2 + 1] : 0u};
    // As fwd_mma: a warp whose rows read none of the tile's columns would add only zeros (ds = 0).
    if (__any_sync(0xffffffffu, (mk0[0] | mk0[1] | mk1[0] | mk1[1]) != 0u)) {
      float sacc[NSA_BK / 8][4], dpacc[NSA_BK / 8][4];
#pragma unroll
      for (int nt = 0; nt < NSA_BK / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) sacc[nt][e] = dpacc[nt][e] = 0.f;
      }
#pragma unroll
      for (int kt = 0; kt < DK / 16; ++kt) {
        unsigned a[4];
        load_a_x4(a, Qs, QS, warp * 16, kt * 16, lane);
#pragma unroll
        for (int nt = 0; nt < NSA_BK / 8; nt += 2) {
          unsigned bb[4];
          load_b_x2(bb, Ks, QS, nt * 8, kt * 16, lane);
          mma_bf16(sacc[nt], a[0], a[1], a[2], a[3], bb[0], bb[1]);
          mma_bf16(sacc[nt + 1], a[0], a[1], a[2], a[3], bb[2], bb[3]);
        }
      }
#pragma unroll
      for (int kt = 0; kt < DV / 16; ++kt) {
        unsigned a[4];
        load_a_x4(a, dOs, VS, warp * 16, kt * 16, lane);
#pragma unroll
        for (int nt = 0; nt < NSA_BK / 8; nt += 2) {
          unsigned bb[4];
          load_b_x2(bb, Vs, VS, nt * 8, kt * 16, lane);
          mma_bf16(dpacc[nt], a[0], a[1], a[2], a[3], bb[0], bb[1]);
          mma_bf16(dpacc[nt + 1], a[0], a[1], a[2], a[3], bb[2], bb[3]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < NSA_BK / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool vis = frag_visible(e < 2 ? mk0 : mk1, nt, tig, e & 1);
          const float p = vis ? fast_exp2(sacc[nt][e] * sl2 - lr[e / 2]) : 0.f;
          sacc[nt][e] = p * (dpacc[nt][e] - dr[e / 2]) * scale;  // ds
        }
      }
      mma_c_tile<DK>(acc, sacc, Ks, QS, lane);  // dQ += dS K
    }  // the warp reads the tile
    __syncthreads();
  }
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    const long long row = row_of(rh == 0 ? r0 : r1);
    if (row < 0) continue;
#pragma unroll
    for (int nd = 0; nd < DK / 8; ++nd) {
      __nv_bfloat162 pair = __floats2bfloat162_rn(acc[nd][2 * rh], acc[nd][2 * rh + 1]);
      *reinterpret_cast<__nv_bfloat162*>(dq + row * DK + nd * 8 + tig * 2) = pair;
    }
  }
}

// dK / dV, key-outer, over a work plan of (segment, token range) items: one CTA per (work item
// w, chunk of 64 keys of the item's segment). Selected branch: a segment is (b, g, block j)
// with the tokens that selected it listed in inv_tok[work_a .. work_b) (the SIMT kernel's
// plan); compressed branch: a segment is (b, g, tile j of 64 compressed tokens) and the item's
// tokens are work_a .. work_b themselves (inv_tok unused), key i being visible to token t iff
// i d + l - 1 <= t. Warp w owns keys 16w .. 16w + 15 of the chunk and keeps their
// dK [16][DK] and dV [16][DV] in registers. The item's tokens are taken 64 / hpg at a time
// (rows (token, head), ascending), and per 16-row slice S^T = K Q^T, dP^T = V dO^T,
// p^T = exp2(S^T scale log2 e - lse2[row]) (the key's first reader <= t), ds^T = p^T (dP^T - D[row]) scale, then
// dV += p^T dO and dK += ds^T Q (p^T, ds^T re-used from registers, dO and Q fragments by
// ldmatrix .trans). Fixed order, no atomics: deterministic. Shared: K [64][DK+8], V [64][DV+8],
// Q [64][DK+8], dO [64][DV+8] (bf16), lse2, D [64] (fp32), token [64] (int).
// DQ (selected branch, one chunk per block: l' <= 64): the same pass also yields dQ's share of
// this block. Each warp stores its ds^T (bf16, as the dK product rounds it) into dS [64][72]
// (row = (token, head), column = key); after the slice's barrier warp w computes rows
// 16w .. 16w + 15 of dS K (64 columns of dk at a time, to bound registers) and writes them as
// a bf16 partial at part[(b, t, g, slot)][head][DK] (its fp32 sum over the block's keys,
// rounded once: half the bytes of an fp32 partial, the backward's largest buffer), slot = the
// block's position in the token's id row (inv_slot, from the same sort as inv_tok). Every
// valid (token, slot) is written by exactly one CTA; nsa_slc_dq_reduce sums a token's slots in
// slot order (deterministic).
// Shared, after the above: slot [64] (int), dS [64][72] (bf16).
struct DkdvKeys {
  int mode;            // KEYS_SELECTED or KEYS_COMPRESSED
  int kv_len;          // K / V rows per batch (S or Nc)
  int L;               // keys per segment (l', or 64 compressed tokens)
  int NB;              // segments per (b, g)
  int cl, cd;          // compressed: l and d
  const int* inv_tok;  // selected: token lists
};

// Extra arguments of dkdv_mma<DK, DV, true> (DQ above); n = ids per (token, group).
struct DkdvDq {
  const int* inv_slot;  // [E], beside inv_tok
  __nv_bfloat16* part;  // [B, S, Hkv, n, hpg, DK]
  int n;
};

template <int DK, int DV, bool DQ = false>
__device__ void dkdv_mma(const __nv_bfloat16* __restrict__ q,
                             const __nv_bfloat16* __restrict__ k,
                             const __nv_bfloat16* __restrict__ v,
                             const __nv_bfloat16* __restrict__ dout,
                             const float* __restrict__ lse, const float* __restrict__ D,
                             const DkdvKeys dk_keys,
                             const long long* __restrict__ work_seg,
                             const long long* __restrict__ work_a,
                             const long long* __restrict__ work_b,
                             const int* __restrict__ work_slot, float* __restrict__ scratch,
                             __nv_bfloat16* __restrict__ dk_out, __nv_bfloat16* __restrict__ dv_out,
                             int S, int Hkv, int hpg, float scale, const DkdvDq dqa = {}) {
  const int L = dk_keys.L, NB = dk_keys.NB, KV = dk_keys.kv_len;
  const bool sel = dk_keys.mode == KEYS_SELECTED;
  constexpr int QS = DK + 8, VS = DV + 8;
  const int nchunks = (L + NSA_BK - 1) / NSA_BK;
  const long long w = blockIdx.x / nchunks;
  const int chunk = blockIdx.x % nchunks;
  const long long seg = work_seg[w];
  if (seg < 0) return;  // a padding item of the plan (uniform over the CTA)
  const int j = (int)(seg % NB);
  const int g = (int)((seg / NB) % Hkv), b = (int)(seg / NB / Hkv);
  const int H = Hkv * hpg;
  const long long c0 = (long long)j * L + chunk * NSA_BK;
  const int nk = (int)max(0LL, min((long long)min(NSA_BK, L - chunk * NSA_BK), KV - c0));
  if (nk <= 0) return;  // uniform over the CTA
  extern __shared__ __align__(16) unsigned char smraw[];
  __nv_bfloat16* Ks = reinterpret_cast<__nv_bfloat16*>(smraw);
  __nv_bfloat16* Vs = Ks + NSA_BK * QS;
  __nv_bfloat16* Qs = Vs + NSA_BK * VS;
  __nv_bfloat16* dOs = Qs + NSA_M * QS;
  float* lse2s = reinterpret_cast<float*>(dOs + NSA_M * VS);
  float* Dsm = lse2s + NSA_M;
  int* toks = reinterpret_cast<int*>(Dsm + NSA_M);
  int* slots = toks + NSA_M;                                       // DQ: [64]
  __nv_bfloat16* dSs = reinterpret_cast<__nv_bfloat16*>(slots + NSA_M);  // DQ: [64][72]
  constexpr int SS = NSA_BK + 8;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int gq = lane / 4, tig = lane % 4;
  const GroupRows krows = group_rows(k, b, KV, Hkv, g, DK), vrows = group_rows(v, b, KV, Hkv, g, DV);
  copy_rows_strided<DK, NSA_BK, NSA_THREADS>(Ks, QS, krows(c0), krows.stride, nk, tid);
  copy_rows_strided<DV, NSA_BK, NSA_THREADS>(Vs, VS, vrows(c0), vrows.stride, nk, tid);
  cp_async_wait_all();  // completed for every thread by the loop's barriers

  const int kr0 = warp * 16 + gq, kr1 = kr0 + 8;  // this thread's two keys (chunk-relative)
  // The first token that reads each of this thread's two keys.
  const auto first_reader = [&](long long key) {
    return sel ? key : key * dk_keys.cd + dk_keys.cl - 1;
  };
  const long long kp[2] = {first_reader(c0 + kr0), first_reader(c0 + kr1)};
  const bool kok[2] = {kr0 < nk, kr1 < nk};
  const float sl2 = scale * 1.4426950408889634f;
  float dka[DK / 8][4], dva[DV / 8][4];
#pragma unroll
  for (int nd = 0; nd < DK / 8; ++nd) dka[nd][0] = dka[nd][1] = dka[nd][2] = dka[nd][3] = 0.f;
#pragma unroll
  for (int nd = 0; nd < DV / 8; ++nd) dva[nd][0] = dva[nd][1] = dva[nd][2] = dva[nd][3] = 0.f;

  const int BT = NSA_M / hpg;
  const long long e0 = work_a[w], e1 = work_b[w];
  for (long long ei = e0; ei < e1; ei += BT) {
    const int ntok = (int)min((long long)BT, e1 - ei), nrows = ntok * hpg;
    __syncthreads();  // the previous slice's readers are done with Q / dO
    const auto row_of = [&](int r) -> long long {
      if (r >= nrows) return -1;
      const long long t = sel ? dk_keys.inv_tok[ei + r / hpg] : ei + r / hpg;
      return ((long long)b * S + t) * H + g * hpg + r % hpg;
    };
    copy_rows<DK>(Qs, QS, NSA_M, [&](int r) -> const __nv_bfloat16* {
      const long long row = row_of(r);
      return row < 0 ? nullptr : q + row * DK;
    }, tid, NSA_THREADS);
    copy_rows<DV>(dOs, VS, NSA_M, [&](int r) -> const __nv_bfloat16* {
      const long long row = row_of(r);
      return row < 0 ? nullptr : dout + row * DV;
    }, tid, NSA_THREADS);
    for (int r = tid; r < NSA_M; r += NSA_THREADS) {
      const long long row = row_of(r);
      lse2s[r] = row < 0 ? INFINITY : lse[row] * 1.4426950408889634f;
      Dsm[r] = row < 0 ? 0.f : D[row];
      toks[r] = row < 0 ? -1 : (int)(sel ? dk_keys.inv_tok[ei + r / hpg] : ei + r / hpg);
      if constexpr (DQ) slots[r] = row < 0 ? -1 : dqa.inv_slot[ei + r / hpg];
    }
    cp_async_wait_all();
    __syncthreads();
    for (int rc = 0; rc * 16 < nrows; ++rc) {  // 16-row slices (uniform over the CTA)
      float st[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
      float dpt[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int kt = 0; kt < DK / 16; ++kt) {
        unsigned a[4], bb[4];
        load_a_x4(a, Ks, QS, warp * 16, kt * 16, lane);
        load_b_x2(bb, Qs, QS, rc * 16, kt * 16, lane);
        mma_bf16(st[0], a[0], a[1], a[2], a[3], bb[0], bb[1]);
        mma_bf16(st[1], a[0], a[1], a[2], a[3], bb[2], bb[3]);
      }
#pragma unroll
      for (int kt = 0; kt < DV / 16; ++kt) {
        unsigned a[4], bb[4];
        load_a_x4(a, Vs, VS, warp * 16, kt * 16, lane);
        load_b_x2(bb, dOs, VS, rc * 16, kt * 16, lane);
        mma_bf16(dpt[0], a[0], a[1], a[2], a[3], bb[0], bb[1]);
        mma_bf16(dpt[1], a[0], a[1], a[2], a[3], bb[2], bb[3]);
      }
      // Elements: key kr0 (e < 2) or kr1, row rc * 16 + nt * 8 + 2 tig + (e & 1).
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = rc * 16 + nt * 8 + tig * 2 + (e & 1);
          const int t = toks[r];
          const bool vis = t >= 0 && kok[e / 2] && kp[e / 2] <= t;
          const float p = vis ? fast_exp2(st[nt][e] * sl2 - lse2s[r]) : 0.f;
          st[nt][e] = p;
          dpt[nt][e] = p * (dpt[nt][e] - Dsm[r]) * scale;  // ds^T
        }
      }
      const unsigned pa0 = pack_bf16(st[0][0], st[0][1]), pa1 = pack_bf16(st[0][2], st[0][3]);
      const unsigned pa2 = pack_bf16(st[1][0], st[1][1]), pa3 = pack_bf16(st[1][2], st[1][3]);
      const unsigned sa0 = pack_bf16(dpt[0][0], dpt[0][1]), sa1 = pack_bf16(dpt[0][2], dpt[0][3]);
      const unsigned sa2 = pack_bf16(dpt[1][0], dpt[1][1]), sa3 = pack_bf16(dpt[1][2], dpt[1][3]);
      mma_a_rows<DV>(dva, pa0, pa1, pa2, pa3, dOs, VS, rc * 16, lane);
      mma_a_rows<DK>(dka, sa0, sa1, sa2, sa3, Qs, QS, rc * 16, lane);
      if constexpr (DQ) {
        // ds^T element (key kr0 or kr1, row rc * 16 + nt * 8 + 2 tig + (e & 1)) into dS[row][key].
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = rc * 16 + nt * 8 + tig * 2 + (e & 1);
            dSs[r * SS + (e < 2 ? kr0 : kr1)] = __float2bfloat16_rn(dpt[nt][e]);
          }
        }
      }
    }
    if constexpr (DQ) {
      __syncthreads();  // every warp's keys of dS are stored
      if (warp * 16 < nrows) {
        unsigned da[NSA_BK / 16][4];  // A fragments of the warp's 16 rows of dS, all 64 keys
#pragma unroll
        for (int kk = 0; kk < NSA_BK / 16; ++kk) {
          load_a_x4(da[kk], dSs, SS, warp * 16, kk * 16, lane);
        }
        const int rr[2] = {warp * 16 + gq, warp * 16 + gq + 8};
        __nv_bfloat16* prow[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int t = toks[rr[i]];
          prow[i] = t < 0 ? nullptr
                          : dqa.part + ((((long long)b * S + t) * Hkv + g) * dqa.n + slots[rr[i]]) *
                                               hpg * DK + (long long)(rr[i] % hpg) * DK;
        }
#pragma unroll
        for (int c0q = 0; c0q < DK; c0q += 64) {
          float acc[8][4];
#pragma unroll
          for (int nd = 0; nd < 8; ++nd) acc[nd][0] = acc[nd][1] = acc[nd][2] = acc[nd][3] = 0.f;
#pragma unroll
          for (int kk = 0; kk < NSA_BK / 16; ++kk) {
            mma_a_rows<64>(acc, da[kk][0], da[kk][1], da[kk][2], da[kk][3], Ks + c0q, QS, kk * 16,
                           lane);
          }
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            if (prow[i] == nullptr) continue;
#pragma unroll
            for (int nd = 0; nd < 8; ++nd) {
              *reinterpret_cast<__nv_bfloat162*>(prow[i] + c0q + nd * 8 + tig * 2) =
                  __floats2bfloat162_rn(acc[nd][2 * i], acc[nd][2 * i + 1]);
            }
          }
        }
      }
    }
  }
  const int slot = work_slot[w];
  const int width = DK + DV;
#pragma unroll
  for (int kh = 0; kh < 2; ++kh) {
    if (!kok[kh]) continue;
    const int kr = kh == 0 ? kr0 : kr1;
    const long long key = ((long long)b * KV + c0 + kr) * Hkv + g;
    float* part = slot < 0 ? nullptr
                           : scratch + ((long long)slot * L + chunk * NSA_BK + kr) * width;
#pragma unroll
    for (int nd = 0; nd < DK / 8; ++nd) {
      const int col = nd * 8 + tig * 2;
      if (part == nullptr) {
        *reinterpret_cast<__nv_bfloat162*>(dk_out + key * DK + col) =
            __floats2bfloat162_rn(dka[nd][2 * kh], dka[nd][2 * kh + 1]);
      } else {
        part[col] = dka[nd][2 * kh];
        part[col + 1] = dka[nd][2 * kh + 1];
      }
    }
#pragma unroll
    for (int nd = 0; nd < DV / 8; ++nd) {
      const int col = nd * 8 + tig * 2;
      if (part == nullptr) {
        *reinterpret_cast<__nv_bfloat162*>(dv_out + key * DV + col) =
            __floats2bfloat162_rn(dva[nd][2 * kh], dva[nd][2 * kh + 1]);
      } else {
        part[DK + col] = dva[nd][2 * kh];
        part[DK + col + 1] = dva[nd][2 * kh + 1];
      }
    }
  }
}

}  // namespace nsa
