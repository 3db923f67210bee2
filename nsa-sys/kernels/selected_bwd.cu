// Selected-branch attention, backward.
//
// Equations (forward in selected_fwd.cu; K(t) the keys token t reads, p the probabilities
// recomputed from the saved log-sum-exp, D the row dot product of the output gradient):
//   p[t, h, s]  = exp(scale * q[t, h] . k[s] - lse[t, h])                 for s in K(t)
//   D[t, h]     = do[t, h] . o[t, h]                                     (computed by the glue)
//   ds[t, h, s] = p[t, h, s] * (do[t, h] . v[s] - D[t, h])
//   dq[t, h]    = scale * sum_{s in K(t)} ds[t, h, s] * k[s]
//   dk[s]       = scale * sum_{(t, h) : s in K(t)} ds[t, h, s] * q[t, h]
//   dv[s]       = sum_{(t, h) : s in K(t)} p[t, h, s] * do[t, h]
// (batch b and group g fixed throughout; h runs over the group's hpg heads.)
//
// Layouts: as the forward, plus do [B, S, H, dv] (input type), lse and D fp32 [B, S, H],
// dq [B, S, H, dk], dk [B, S, Hkv, dk], dv [B, S, Hkv, dv] in the input type.
// Inverse index (built by the glue from the cleaned ids with a stable device sort, a count
// and a scan): inv_tok int32 [E] lists, for every segment (b, g, block j) in that order, the
// tokens that selected block j in ascending order (NB = ceil(S / L) blocks). Work plan (glue):
// work_seg, work_a, work_b int64 [W] (segment id (b * Hkv + g) * NB + j and token range of each
// piece), work_slot int32 [W] (scratch slot, -1 for single-piece segments); red_seg int64,
// red_slot0 and red_count int32 [R] for the R split segments. W and R are upper bounds from
// the shapes (so the glue never reads the data's sizes back to the host): work items with
// work_seg < 0 and reduce items with red_seg < 0 are padding and return at once.
//
// nsa_slc_dq_{f32,bf16}: one CTA of 128 threads per (token, group, batch), the forward's
//   gather of the selected blocks in chunks of KC = 16 keys; dq accumulated in fp32 shared
//   memory. Shared: q, dq [hpg][dk], do [hpg][dv], K/V chunk [KC][dk | dv], ds [hpg][KC],
//   lse, D [hpg], ids [n].
// nsa_slc_dkdv_{f32,bf16}: one CTA per (work item w, key chunk of KC keys), grid x =
//   W * ceil(L / KC). A work item is a piece of one segment (b, g, j): the tokens
//   inv_tok[work_a[w] .. work_b[w]) (at most `piece` of them, planned by the glue), walked in
//   ascending order, so every partial sum has a fixed order. A segment of one piece writes
//   dK/dV of its keys directly; the pieces of a longer segment (block 0, which every token
//   selects) write fp32 partials to scratch [slot][L][dk + dv] (slot = work_slot[w]), which
//   nsa_slc_dkdv_reduce_* then adds in piece order. Deterministic, no float atomics, and every
//   key of the sequence is written exactly once (zeros for keys nobody read). Shared: K/V chunk
//   and dK/dV accumulators [KC][dk | dv], q [hpg][dk], do [hpg][dv], p and ds [hpg][KC], lse,
//   D [hpg].
// nsa_slc_dkdv_dq_mma_dk{DK}_dv{DV} (bf16, l' <= 64): nsa_slc_dkdv_mma plus dQ, key-outer
//   (attend.cuh, dkdv_mma's DQ): for each (token, block) of the inverse index, the block's share
//   of the token's dq as a bf16 partial (its fp32 sum, rounded once) at part[b, t, g, slot]
//   [hpg][dk]. With small groups this replaces the query-outer dq kernel, whose union tiles
//   compute every block any of 64 / G tokens selected (at G = 3 and 32k, about 250 blocks per
//   row of 16 selected).
// nsa_slc_dq_reduce: dq [B, S, H, dk] (bf16) from those partials: row (b, t, g, head) is the
//   sum of part[b, t, g, s][head] over the slots s whose id is a block of the index
//   (0 <= id < NB, the inverse index's rule), in slot order in fp32, rounded once. One thread per
//   4 columns of a row, grid-stride; 8-byte loads of 4 bf16.
// nsa_slc_dkdv_reduce_{f32,bf16}: grid (split segment (red_seg), slice): CTA (r, y) sums, for
//   slice y of the segment's L x (dk + dv) values, its red_count partials from slot red_slot0
//   in order into dK/dV of the block's keys. The slices (grid y, sized by the host) spread a
//   long segment over many SMs: block 0, which every token selects, has 512 partials per
//   group at 32k, and one CTA summing them all was the tail of the backward. Each value's
//   sum keeps the piece order whatever the slicing: the same bits.
// Both are plain fp32 SIMT kernels for either input type.
// nsa_slc_dq_warp_dk{DK}_dv{DV} (bf16, groups of at most 16 heads, n <= 32): dq with one warp
//   per (token, group, batch) over that token's keys only, the dq of the token-per-warp
//   forward (slc_dq_warp below).
// nsa_row_dot_{f32,bf16}: D[r] = sum_i a[r, i] * b[r, i] in fp32 for rows r of a, b [R, dv]
//   (contiguous, one type): the D above and the compressed branch's, read from do and o as
//   they are instead of from fp32 copies of both and of their product (three [R, dv] fp32
//   temporaries, 6.4 GB at the paper shape and 64k). One warp per row, lanes striding over dv,
//   a fixed butterfly: deterministic.
#include "attend.cuh"
#include "token_warp.cuh"

#define NSA_KC 16

namespace nsa {

template <typename T>
__device__ void slc_dq(const T* __restrict__ q, const T* __restrict__ k,
                       const T* __restrict__ v, const int* __restrict__ ids,
                       const T* __restrict__ dout, const float* __restrict__ lse,
                       const float* __restrict__ D, T* __restrict__ dq, int S, int Hkv, int hpg,
                       int dk, int dv, int n, int L, float scale) {
  extern __shared__ float sm[];
  const int t = blockIdx.x, g = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const int H = Hkv * hpg;
  float* qs = sm;                 // [hpg][dk]
  float* dqs = qs + hpg * dk;     // [hpg][dk]
  float* dos = dqs + hpg * dk;    // [hpg][dv]
  float* ks = dos + hpg * dv;     // [KC][dk]
  float* vs = ks + NSA_KC * dk;   // [KC][dv]
  float* dss = vs + NSA_KC * dv;  // [hpg][KC]
  float* lses = dss + hpg * NSA_KC;
  float* Ds = lses + hpg;
  int* idl = (int*)(Ds + hpg);
  const long long row = ((long long)b * S + t) * H + (long long)g * hpg;
  for (int e = tid; e < hpg * dk; e += NSA_THREADS) {
    qs[e] = to_f(q[row * dk + e]);
    dqs[e] = 0.f;
  }
  for (int e = tid; e < hpg * dv; e += NSA_THREADS) dos[e] = to_f(dout[row * dv + e]);
  for (int h = tid; h < hpg; h += NSA_THREADS) {
    lses[h] = lse[row + h];
    Ds[h] = D[row + h];
  }
  for (int e = tid; e < n; e += NSA_THREADS) idl[e] = ids[(((long long)b * S + t) * Hkv + g) * n + e];
  __syncthreads();
  for (int slot = 0; slot < n; ++slot) {
    const int j = idl[slot];
    if (!id_ok(j, t, L)) continue;
    const int s_end = min(min(j * L + L, t + 1), S);
    for (int c0 = j * L; c0 < s_end; c0 += NSA_KC) {
      const int nk = min(NSA_KC, s_end - c0);
      load_kv_chunk(ks, vs, k, v, b, S, Hkv, g, c0, nk, dk, dv, tid, NSA_THREADS);
      __syncthreads();
      for (int e = tid; e < hpg * NSA_KC; e += NSA_THREADS) {
        const int h = e / NSA_KC, kk = e % NSA_KC;
        float ds = 0.f;
        if (kk < nk) {
          float s = 0.f, dp = 0.f;
          for (int d = 0; d < dk; ++d) s = fmaf(qs[h * dk + d], ks[kk * dk + d], s);
          for (int d = 0; d < dv; ++d) dp = fmaf(dos[h * dv + d], vs[kk * dv + d], dp);
          const float p = __expf(s * scale - lses[h]);
          ds = p * (dp - Ds[h]) * scale;
        }
        dss[e] = ds;
      }
      __syncthreads();
      for (int e = tid; e < hpg * dk; e += NSA_THREADS) {
        const int h = e / dk, d = e % dk;
        float acc = dqs[e];
        for (int kk = 0; kk < nk; ++kk) acc = fmaf(dss[h * NSA_KC + kk], ks[kk * dk + d], acc);
        dqs[e] = acc;
      }
      __syncthreads();
    }
  }
  for (int e = tid; e < hpg * dk; e += NSA_THREADS) dq[row * dk + e] = from_f<T>(dqs[e]);
}

template <typename T>
__device__ void slc_dkdv(const T* __restrict__ q, const T* __restrict__ k,
                         const T* __restrict__ v, const T* __restrict__ dout,
                         const float* __restrict__ lse, const float* __restrict__ D,
                         const int* __restrict__ inv_tok, const long long* __restrict__ work_seg,
                         const long long* __restrict__ work_a,
                         const long long* __restrict__ work_b,
                         const int* __restrict__ work_slot, float* __restrict__ scratch,
                         T* __restrict__ dk_out, T* __restrict__ dv_out, int S, int Hkv,
                         int hpg, int dk, int dv, int L, int NB, float scale) {
  extern __shared__ float sm[];
  const int nchunks = (L + NSA_KC - 1) / NSA_KC;
  const long long w = blockIdx.x / nchunks;
  const int chunk = blockIdx.x % nchunks, tid = threadIdx.x;
  const long long seg = work_seg[w];
  if (seg < 0) return;  // a padding item of the plan (uniform over the CTA)
  const int j = (int)(seg % NB);
  const int g = (int)((seg / NB) % Hkv), b = (int)(seg / NB / Hkv);
  const int H = Hkv * hpg;
  const long long c0 = (long long)j * L + chunk * NSA_KC;
  const int nk = (int)max(0LL, min((long long)min(NSA_KC, L - chunk * NSA_KC), S - c0));
  if (nk <= 0) return;  // uniform over the CTA: no barrier is skipped by some threads only
  float* ks = sm;                    // [KC][dk]
  float* vs = ks + NSA_KC * dk;      // [KC][dv]
  float* dks = vs + NSA_KC * dv;     // [KC][dk]
  float* dvs = dks + NSA_KC * dk;    // [KC][dv]
  float* qs = dvs + NSA_KC * dv;     // [hpg][dk]
  float* dos = qs + hpg * dk;        // [hpg][dv]
  float* ps = dos + hpg * dv;        // [hpg][KC]
  float* dss = ps + hpg * NSA_KC;    // [hpg][KC]
  float* lses = dss + hpg * NSA_KC;  // [hpg]
  float* Ds = lses + hpg;            // [hpg]
  for (int e = tid; e < NSA_KC * dk; e += NSA_THREADS) {
    const int kk = e / dk, d = e % dk;
    ks[e] = kk < nk ? to_f(k[(((long long)b * S + c0 + kk) * Hkv + g) * dk + d]) : 0.f;
    dks[e] = 0.f;
  }
  for (int e = tid; e < NSA_KC * dv; e += NSA_THREADS) {
    const int kk = e / dv, d = e % dv;
    vs[e] = kk < nk ? to_f(v[(((long long)b * S + c0 + kk) * Hkv + g) * dv + d]) : 0.f;
    dvs[e] = 0.f;
  }
  const long long e0 = work_a[w], e1 = work_b[w];
  __syncthreads();
  for (long long ei = e0; ei < e1; ++ei) {
    const int t = inv_tok[ei];
    const long long row = ((long long)b * S + t) * H + (long long)g * hpg;
    for (int e = tid; e < hpg * dk; e += NSA_THREADS) qs[e] = to_f(q[row * dk + e]);
    for (int e = tid; e < hpg * dv; e += NSA_THREADS) dos[e] = to_f(dout[row * dv + e]);
    for (int h = tid; h < hpg; h += NSA_THREADS) {
      lses[h] = lse[row + h];
      Ds[h] = D[row + h];
    }
    __syncthreads();
    for (int e = tid; e < hpg * NSA_KC; e += NSA_THREADS) {
      const int h = e / NSA_KC, kk = e % NSA_KC;
      float p = 0.f, ds = 0.f;
      if (kk < nk && c0 + kk <= t) {
        float s = 0.f, dp = 0.f;
        for (int d = 0; d < dk; ++d) s = fmaf(qs[h * dk + d], ks[kk * dk + d], s);
        for (int d = 0; d < dv; ++d) dp = fmaf(dos[h * dv + d], vs[kk * dv + d], dp);
        p = __expf(s * scale - lses[h]);
        ds = p * (dp - Ds[h]) * scale;
      }
      ps[e] = p;
      dss[e] = ds;
    }
    __syncthreads();
    for (int e = tid; e < NSA_KC * dv; e += NSA_THREADS) {
      const int kk = e / dv, d = e % dv;
      float acc = dvs[e];
      for (int h = 0; h < hpg; ++h) acc = fmaf(ps[h * NSA_KC + kk], dos[h * dv + d], acc);
      dvs[e] = acc;
    }
    for (int e = tid; e < NSA_KC * dk; e += NSA_THREADS) {
      const int kk = e / dk, d = e % dk;
      float acc = dks[e];
      for (int h = 0; h < hpg; ++h) acc = fmaf(dss[h * NSA_KC + kk], qs[h * dk + d], acc);
      dks[e] = acc;
    }
    __syncthreads();
  }
  const int slot = work_slot[w];
  if (slot < 0) {
    for (int e = tid; e < nk * dk; e += NSA_THREADS) {
      const int kk = e / dk, d = e % dk;
      dk_out[(((long long)b * S + c0 + kk) * Hkv + g) * dk + d] = from_f<T>(dks[e]);
    }
    for (int e = tid; e < nk * dv; e += NSA_THREADS) {
      const int kk = e / dv, d = e % dv;
      dv_out[(((long long)b * S + c0 + kk) * Hkv + g) * dv + d] = from_f<T>(dvs[e]);
    }
  } else {
    const int width = dk + dv;
    float* part = scratch + ((long long)slot * L + chunk * NSA_KC) * width;
    for (int e = tid; e < nk * dk; e += NSA_THREADS) {
      const int kk = e / dk, d = e % dk;
      part[(long long)kk * width + d] = dks[e];
    }
    for (int e = tid; e < nk * dv; e += NSA_THREADS) {
      const int kk = e / dv, d = e % dv;
      part[(long long)kk * width + dk + d] = dvs[e];
    }
  }
}

template <typename T>
__device__ void slc_dkdv_reduce(const float* __restrict__ scratch,
                                const long long* __restrict__ red_seg,
                                const int* __restrict__ red_slot0,
                                const int* __restrict__ red_count, T* __restrict__ dk_out,
                                T* __restrict__ dv_out, int S, int Hkv, int dk, int dv, int L,
                                int NB) {
  const long long seg = red_seg[blockIdx.x];
  if (seg < 0) return;  // past the real split segments
  const int j = (int)(seg % NB);
  const int g = (int)((seg / NB) % Hkv), b = (int)(seg / NB / Hkv);
  const int slot0 = red_slot0[blockIdx.x], count = red_count[blockIdx.x];
  const int width = dk + dv;
  const long long c0 = (long long)j * L;
  const int nk = (int)min((long long)L, S - c0);
  // This CTA's slice of the segment's L * width sums (a multiple of the CTA's threads).
  const int span = ((L * width + (int)gridDim.y - 1) / (int)gridDim.y + NSA_THREADS - 1) /
                   NSA_THREADS * NSA_THREADS;
  const int e_end = min(nk * width, ((int)blockIdx.y + 1) * span);
  for (int e = (int)blockIdx.y * span + threadIdx.x; e < e_end; e += NSA_THREADS) {
    const int kk = e / width, d = e % width;
    float acc = 0.f;
#pragma unroll 8
    for (int pc = 0; pc < count; ++pc) acc += scratch[((long long)(slot0 + pc) * L + kk) * width + d];
    const long long key = ((long long)b * S + c0 + kk) * Hkv + g;
    if (d < dk) {
      dk_out[key * dk + d] = from_f<T>(acc);
    } else {
      dv_out[key * dv + (d - dk)] = from_f<T>(acc);
    }
  }
}

// dQ with one warp per (token t, group g, batch b), over the forward's key stream
// (token_warp.cuh): per sub-tile S = Q K^T and dP = dO V^T on tensor cores,
// p = exp2(S scale log2 e - lse2), ds = p (dP - D) scale, dq += ds K (ds re-used from registers
// as the A operand, K's fragments by ldmatrix .trans). Q's A fragments and dq stay in
// registers; dO's rows sit in shared memory ahead of the stages. Rows >= hpg: lse2 = +inf, so
// p = 0; never written. Shared: dO [16][DV + 8], then the stages (Q passes through stage 0).
template <int DK, int DV>
__device__ void slc_dq_warp(const __nv_bfloat16* __restrict__ q,
                            const __nv_bfloat16* __restrict__ k,
                            const __nv_bfloat16* __restrict__ v, const int* __restrict__ ids,
                            const __nv_bfloat16* __restrict__ dout,
                            const float* __restrict__ lse, const float* __restrict__ D,
                            __nv_bfloat16* __restrict__ dq, int S, int Hkv, int hpg, int n,
                            int L, float scale) {
  constexpr int VS = DV + 8, PV = DV / 8;
  extern __shared__ __align__(16) unsigned char smraw[];
  __nv_bfloat16* dos = reinterpret_cast<__nv_bfloat16*>(smraw);
  __nv_bfloat16* stages = dos + 16 * VS;
  const int lane = threadIdx.x, gq = lane / 4, tig = lane % 4;
  const int t = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const long long row0 = ((long long)b * S + t) * (Hkv * hpg) + (long long)g * hpg;
  for (int e = lane; e < 16 * PV; e += 32) {
    const int r = e / PV, ch = e % PV;
    __nv_bfloat16* dst = dos + r * VS + ch * 8;
    if (r < hpg) {
      cp_async16(dst, dout + (row0 + r) * DV + ch * 8);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
  unsigned qf[DK / 16][4];
  warp_rows_to_a<DK>(qf, stages, q + row0 * DK, hpg, lane);  // completes dO's copies too
  const float lr0 = gq < hpg ? lse[row0 + gq] * 1.4426950408889634f : INFINITY;
  const float lr1 = gq + 8 < hpg ? lse[row0 + gq + 8] * 1.4426950408889634f : INFINITY;
  const float d0 = gq < hpg ? D[row0 + gq] : 0.f, d1 = gq + 8 < hpg ? D[row0 + gq + 8] : 0.f;
  const TokenWarpKeys<DK, DV, NSA_DQ_WARP_STAGES> keys(k, v, stages, ids, S, Hkv, n, L, t, g, b,
                                                       lane);
  const float sl2 = scale * 1.4426950408889634f;
  float acc[DK / 8][4];
#pragma unroll
  for (int j = 0; j < DK / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  keys.stream([&](const __nv_bfloat16* ks, const __nv_bfloat16* vs, int nk) {
    float sc[2][4];
    warp_scores<DK>(sc, qf, ks, lane);
    float dp[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int kt = 0; kt < DV / 16; ++kt) {
      unsigned a[4], bb[4];
      load_a_x4(a, dos, VS, 0, kt * 16, lane);
      load_b_x2(bb, vs, VS, 0, kt * 16, lane);
      mma_bf16(dp[0], a[0], a[1], a[2], a[3], bb[0], bb[1]);
      mma_bf16(dp[1], a[0], a[1], a[2], a[3], bb[2], bb[3]);
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int u = nt * 8 + tig * 2 + (e & 1);
        const float p = u < nk ? fast_exp2(sc[nt][e] * sl2 - (e < 2 ? lr0 : lr1)) : 0.f;
        sc[nt][e] = p * (dp[nt][e] - (e < 2 ? d0 : d1)) * scale;  // ds
      }
    }
    const unsigned a0 = pack_bf16(sc[0][0], sc[0][1]), a1 = pack_bf16(sc[0][2], sc[0][3]);
    const unsigned a2 = pack_bf16(sc[1][0], sc[1][1]), a3 = pack_bf16(sc[1][2], sc[1][3]);
    mma_a_rows<DK>(acc, a0, a1, a2, a3, ks, DK + 8, 0, lane);  // dQ += dS K
  });
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    const int r = gq + rh * 8;
    if (r >= hpg) continue;
#pragma unroll
    for (int j = 0; j < DK / 8; ++j) {
      *reinterpret_cast<__nv_bfloat162*>(dq + (row0 + r) * DK + j * 8 + tig * 2) =
          __floats2bfloat162_rn(acc[j][2 * rh], acc[j][2 * rh + 1]);
    }
  }
}

template <typename T>
__device__ void row_dot(const T* __restrict__ a, const T* __restrict__ b, float* __restrict__ out,
                        int dv, long long rows) {
  const int lane = threadIdx.x & 31;
  const long long warps = (long long)gridDim.x * (NSA_THREADS / 32);
  for (long long r = (long long)blockIdx.x * (NSA_THREADS / 32) + threadIdx.x / 32; r < rows;
       r += warps) {
    const T* ar = a + r * dv;
    const T* br = b + r * dv;
    float s = 0.f;
    for (int d = lane; d < dv; d += 32) s += to_f(ar[d]) * to_f(br[d]);
    s = warp_sum(s);
    if (lane == 0) out[r] = s;
  }
}

// ---- tensor-core backward (bf16) -----------------------------------------------------------

}  // namespace nsa

#define NSA_ROW_DOT(NAME, T)                                                                   \
  extern "C" __global__ void __launch_bounds__(NSA_THREADS)                                    \
      NAME(const T* a, const T* b, float* out, int dv, long long rows) {                      \
    nsa::row_dot<T>(a, b, out, dv, rows);                                                      \
  }
NSA_ROW_DOT(nsa_row_dot_f32, float)
NSA_ROW_DOT(nsa_row_dot_bf16, __nv_bfloat16)

#define NSA_DQ(NAME, T)                                                                        \
  extern "C" __global__ void __launch_bounds__(NSA_THREADS)                                    \
      NAME(const T* q, const T* k, const T* v, const int* ids, const T* dout,                  \
           const float* lse, const float* D, T* dq, int S, int Hkv, int hpg, int dk, int dv,   \
           int n, int L, float scale) {                                                        \
    nsa::slc_dq<T>(q, k, v, ids, dout, lse, D, dq, S, Hkv, hpg, dk, dv, n, L, scale);         \
  }
NSA_DQ(nsa_slc_dq_f32, float)
NSA_DQ(nsa_slc_dq_bf16, __nv_bfloat16)

#define NSA_DKDV(NAME, T)                                                                      \
  extern "C" __global__ void __launch_bounds__(NSA_THREADS)                                    \
      NAME(const T* q, const T* k, const T* v, const T* dout, const float* lse,                \
           const float* D, const int* inv_tok, const long long* work_seg,                      \
           const long long* work_a, const long long* work_b, const int* work_slot,             \
           float* scratch, T* dk_out, T* dv_out, int S, int Hkv, int hpg, int dk, int dv,      \
           int L, int NB, float scale) {                                                       \
    nsa::slc_dkdv<T>(q, k, v, dout, lse, D, inv_tok, work_seg, work_a, work_b, work_slot,     \
                     scratch, dk_out, dv_out, S, Hkv, hpg, dk, dv, L, NB, scale);              \
  }
NSA_DKDV(nsa_slc_dkdv_f32, float)
NSA_DKDV(nsa_slc_dkdv_bf16, __nv_bfloat16)

#define NSA_DKDV_REDUCE(NAME, T)                                                               \
  extern "C" __global__ void __launch_bounds__(NSA_THREADS)                                    \
      NAME(const float* scratch, const long long* red_seg, const int* red_slot0,               \
           const int* red_count, T* dk_out, T* dv_out, int S, int Hkv, int dk, int dv, int L,  \
           int NB) {                                                                           \
    nsa::slc_dkdv_reduce<T>(scratch, red_seg, red_slot0, red_count, dk_out, dv_out, S, Hkv,   \
                            dk, dv, L, NB);                                                    \
  }
NSA_DKDV_REDUCE(nsa_slc_dkdv_reduce_f32, float)
NSA_DKDV_REDUCE(nsa_slc_dkdv_reduce_bf16, __nv_bfloat16)

#define NSA_MMA_BWD(DK, DV)                                                                    \
  extern "C" __global__ void __launch_bounds__(NSA_THREADS) nsa_slc_dq_mma_dk##DK##_dv##DV(   \
      const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const int* ids, \
      const __nv_bfloat16* dout, const float* lse, const float* D, __nv_bfloat16* dq, int S,   \
      int Hkv, int hpg, int n, int L, float scale, int P) {                                    \
    nsa::dq_mma<DK, DV>(q, k, v, nsa::selected_keys(ids, n, L, P, S), dout, lse, D, dq, S, Hkv, \
                        hpg, scale);                                                           \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(NSA_THREADS) nsa_slc_dkdv_mma_dk##DK##_dv##DV( \
      const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,                 \
      const __nv_bfloat16* dout, const float* lse, const float* D, const int* inv_tok,         \
      const long long* work_seg, const long long* work_a, const long long* work_b,             \
      const int* work_slot, float* scratch, __nv_bfloat16* dk_out, __nv_bfloat16* dv_out,      \
      int S, int Hkv, int hpg, int L, int NB, float scale) {                                   \
    const nsa::DkdvKeys keys = {KEYS_SELECTED, S, L, NB, 1, 1, inv_tok};                       \
    nsa::dkdv_mma<DK, DV>(q, k, v, dout, lse, D, keys, work_seg, work_a, work_b, work_slot,   \
                          scratch, dk_out, dv_out, S, Hkv, hpg, scale);                       \
  }
#define NSA_MMA_DKDV_DQ(DK, DV)                                                                \
  extern "C" __global__ void __launch_bounds__(NSA_THREADS) nsa_slc_dkdv_dq_mma_dk##DK##_dv##DV( \
      const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,                 \
      const __nv_bfloat16* dout, const float* lse, const float* D, const int* inv_tok,         \
      const long long* work_seg, const long long* work_a, const long long* work_b,             \
      const int* work_slot, float* scratch, __nv_bfloat16* dk_out, __nv_bfloat16* dv_out,      \
      int S, int Hkv, int hpg, int L, int NB, float scale, const int* inv_slot,                \
      __nv_bfloat16* dq_part,                                                                  \
      int n) {                                                                                 \
    const nsa::DkdvKeys keys = {KEYS_SELECTED, S, L, NB, 1, 1, inv_tok};                       \
    nsa::dkdv_mma<DK, DV, true>(q, k, v, dout, lse, D, keys, work_seg, work_a, work_b,        \
                                work_slot, scratch, dk_out, dv_out, S, Hkv, hpg, scale,       \
                                nsa::DkdvDq{inv_slot, dq_part, n});                           \
  }
NSA_MMA_DKDV_DQ(64, 64)
NSA_MMA_DKDV_DQ(64, 128)
NSA_MMA_DKDV_DQ(64, 192)
NSA_MMA_DKDV_DQ(128, 64)
NSA_MMA_DKDV_DQ(128, 128)
NSA_MMA_DKDV_DQ(128, 192)
NSA_MMA_DKDV_DQ(192, 64)
NSA_MMA_DKDV_DQ(192, 128)
NSA_MMA_DKDV_DQ(192, 192)

extern "C" __global__ void __launch_bounds__(NSA_THREADS)
    nsa_slc_dq_reduce(const __nv_bfloat16* __restrict__ part, const int* __restrict__ ids,
                      __nv_bfloat16* __restrict__ dq, long long rows, int hpg, int dk, int n,
                      int NB) {
  const int c4 = dk / 4;
  const long long total = rows * hpg * c4;  // rows = B * S * Hkv
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const int c = (int)(i % c4) * 4;
    const long long rh = i / c4;  // ((b, t, g), head): also dq's row
    const long long bsg = rh / hpg;
    const int h = (int)(rh % hpg);
    const int* id = ids + bsg * n;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s = 0; s < n; ++s) {
      const int j = id[s];
      if (j < 0 || j >= NB) continue;
      const uint2 raw = *reinterpret_cast<const uint2*>(part + ((bsg * n + s) * hpg + h) * dk + c);
      const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
      const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
      acc.x += lo.x;
      acc.y += lo.y;
      acc.z += hi.x;
      acc.w += hi.y;
    }
    __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(dq + rh * dk + c);
    o[0] = __floats2bfloat162_rn(acc.x, acc.y);
    o[1] = __floats2bfloat162_rn(acc.z, acc.w);
  }
}

NSA_MMA_BWD(64, 64)
NSA_MMA_BWD(64, 128)
NSA_MMA_BWD(64, 192)
NSA_MMA_BWD(128, 64)
NSA_MMA_BWD(128, 128)
NSA_MMA_BWD(128, 192)
NSA_MMA_BWD(192, 64)
NSA_MMA_BWD(192, 128)
NSA_MMA_BWD(192, 192)

#define NSA_WARP_DQ(DK, DV)                                                                    \
  extern "C" __global__ void __launch_bounds__(32) nsa_slc_dq_warp_dk##DK##_dv##DV(            \
      const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const int* ids, \
      const __nv_bfloat16* dout, const float* lse, const float* D, __nv_bfloat16* dq, int S,   \
      int Hkv, int hpg, int n, int L, float scale) {                                           \
    nsa::slc_dq_warp<DK, DV>(q, k, v, ids, dout, lse, D, dq, S, Hkv, hpg, n, L, scale);        \
  }
NSA_WARP_DQ(64, 64)
NSA_WARP_DQ(64, 128)
NSA_WARP_DQ(64, 192)
NSA_WARP_DQ(128, 64)
NSA_WARP_DQ(128, 128)
NSA_WARP_DQ(128, 192)
NSA_WARP_DQ(192, 64)
NSA_WARP_DQ(192, 128)
NSA_WARP_DQ(192, 192)
