// Selected-branch attention, forward (NSA §3.3.2, the "slc" branch).
//
// Equation. For batch b, token t, key group g with heads h = g*hpg .. g*hpg + hpg - 1 and the
// cleaned block ids J(b, t, g) (distinct, 0 <= j <= t / L):
//   keys K(t) = { s : s / L in J(b, t, g), s <= t },
//   o[b, t, h, :]  = sum_{s in K(t)} softmax_s(scale * q[b, t, h] . k[b, s, g]) * v[b, s, g, :],
//   lse[b, t, h]   = log sum_{s in K(t)} exp(scale * q[b, t, h] . k[b, s, g])   (natural log),
// accumulated in fp32 with an online softmax. Rows with no key (never, once ids are cleaned,
// since block t / L is always valid) would get o = 0 and lse = +inf.
//
// Layouts (row-major, contiguous): q [B, S, H, dk], k [B, S, Hkv, dk], v [B, S, Hkv, dv],
// ids int32 [B, S, Hkv, n] (cleaned by the host glue: distinct valid ids first, -1 after),
// out [B, S, H, dv] in the input type, lse fp32 [B, S, H]. H = Hkv * hpg; query head h reads
// key head h / hpg.
//
// Three forwards (plus the key-outer one, documented at slc_fwd_kv):
//
// nsa_slc_fwd_mma_dk{DK}_dv{DV} (bf16 only, tensor cores through mma.sync m16n8k16):
//   one CTA of 4 warps per (tile of BQ = 64 / hpg consecutive tokens, group g, batch b); its
//   M = BQ * hpg <= 64 rows are (token, head) pairs, row r = token (r / hpg), head (r % hpg),
//   16 rows per warp. The CTA reads the union of its tokens' selected blocks (sorted, deduped
//   in shared memory), flattened into key tiles of BK = 64 keys, so every K/V tile it loads
//   serves all hpg heads of all BQ tokens (group-centric, and M stays 64 when hpg is small);
//   a per-(token, key) bit mask built per tile from a token x union membership bitmap keeps
//   each row to its own blocks and to keys <= t. S = Q K^T and O += P V run on tensor cores
//   with fp32 accumulators in registers (flash-attention-2 style register reuse of the score
//   fragment as the A operand of P V; V's fragments come from its natural [key][d] tile by
//   ldmatrix .trans). Shared memory (dynamic): Q [64][DK+8], K [64][DK+8], V [64][DV+8] (bf16,
//   rows padded by 16 bytes against bank conflicts), then the union tile of mma.cuh.
//
// nsa_slc_fwd_warp_dk{DK}_dv{DV} (bf16, groups of at most 16 heads, n <= 32): one warp per
//   (token, group, batch), the group's heads as its 16 MMA rows, streaming only that token's
//   keys through private cp.async stages (slc_fwd_warp below).
//
// nsa_slc_fwd_simt_{f32,bf16} (any dk, dv): one CTA of 128 threads per (token, group, batch)
//   (the paper's kernel shape), keys of each selected block in chunks of KC = 16 loaded once
//   for all hpg heads; plain fp32 FMAs. The exact fp32 path (and the bf16 fallback for head
//   sizes without an mma instantiation). Shared memory: q, o [hpg][dk | dv], K/V chunk
//   [KC][dk | dv], p [hpg][KC], running max / sum / rescale [hpg], ids [n] (floats, ints).
//
// nsa_clean_ids_{i32,i64} cleans the ids for both: blocks [R = B * S * G, n] (int32 or int64,
// contiguous) -> int32 [R, n], each row's distinct ids j with 0 <= j <= min(t / L, last)
// (t = (r / G) mod S, last = the last key block, -1 for no keys) in descending order, then -1:
// the rule of glue/blocks.h's clean_block_ids (the CPU and lean paths' version, which the GPU
// check compares it with), in one pass of one thread per row (n <= NSA_CLEAN_MAX) instead of
// two segmented sorts and a dozen elementwise kernels.
#include "attend.cuh"
#include "token_warp.cuh"

#define NSA_KC 16
#define NSA_CLEAN_MAX 32

namespace nsa {

template <typename I>
__device__ void clean_ids(const I* __restrict__ in, int* __restrict__ out, long long rows, int S,
                          int G, int n, int L, int last) {
  const long long step = (long long)gridDim.x * blockDim.x;
  for (long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += step) {
    const int t = (int)((r / G) % S);
    const long long hi = min(t / L, last);
    int kept[NSA_CLEAN_MAX];
    int m = 0;
    for (int i = 0; i < n; ++i) {
      const long long j = (long long)in[r * n + i];
      if (j < 0 || j > hi) continue;
      // Insert into kept[0 .. m), descending, unless present.
      int p = 0;
      while (p < m && kept[p] > j) ++p;
      if (p < m && kept[p] == j) continue;
      for (int q = m; q > p; --q) kept[q] = kept[q - 1];
      kept[p] = (int)j;
      ++m;
    }
    for (int i = 0; i < n; ++i) out[r * n + i] = i < m ? kept[i] : -1;
  }
}

template <typename T>
__device__ void slc_fwd_simt(const T* __restrict__ q, const T* __restrict__ k,
                             const T* __restrict__ v, const int* __restrict__ ids,
                             T* __restrict__ out, float* __restrict__ lse, int S, int Hkv,
                             int hpg, int dk, int dv, int n, int L, float scale) {
  extern __shared__ float sm[];
  const int t = blockIdx.x, g = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const int H = Hkv * hpg;
  float* qs = sm;                   // [hpg][dk]
  float* ks = qs + hpg * dk;        // [KC][dk]
  float* vs = ks + NSA_KC * dk;     // [KC][dv]
  float* os = vs + NSA_KC * dv;     // [hpg][dv]
  float* ps = os + hpg * dv;        // [hpg][KC]
  float* ms = ps + hpg * NSA_KC;    // [hpg]
  float* ls = ms + hpg;             // [hpg]
  float* as = ls + hpg;             // [hpg]
  int* idl = (int*)(as + hpg);      // [n]
  const long long row = ((long long)b * S + t) * H + (long long)g * hpg;  // first head's row
  for (int e = tid; e < hpg * dk; e += NSA_THREADS) qs[e] = to_f(q[row * dk + e]);
  for (int e = tid; e < hpg * dv; e += NSA_THREADS) os[e] = 0.f;
  for (int e = tid; e < hpg; e += NSA_THREADS) {
    ms[e] = -INFINITY;
    ls[e] = 0.f;
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
        float acc = -INFINITY;
        if (kk < nk) {
          acc = 0.f;
          for (int d = 0; d < dk; ++d) acc = fmaf(qs[h * dk + d], ks[kk * dk + d], acc);
          acc *= scale;
        }
        ps[e] = acc;
      }
      __syncthreads();
      for (int h = tid; h < hpg; h += NSA_THREADS) {
        float mx = ms[h];
        for (int kk = 0; kk < nk; ++kk) mx = fmaxf(mx, ps[h * NSA_KC + kk]);
        // mx is finite: the chunk holds at least one key.
        const float alpha = __expf(ms[h] - mx);  // exp(-inf) = 0 on the first chunk
        float sum = 0.f;
        for (int kk = 0; kk < NSA_KC; ++kk) {
          const float p = kk < nk ? __expf(ps[h * NSA_KC + kk] - mx) : 0.f;
          ps[h * NSA_KC + kk] = p;
          sum += p;
        }
        ls[h] = ls[h] * alpha + sum;
        ms[h] = mx;
        as[h] = alpha;
      }
      __syncthreads();
      for (int e = tid; e < hpg * dv; e += NSA_THREADS) {
        const int h = e / dv, d = e % dv;
        float acc = os[e] * as[h];
        for (int kk = 0; kk < nk; ++kk) acc = fmaf(ps[h * NSA_KC + kk], vs[kk * dv + d], acc);
        os[e] = acc;
      }
      __syncthreads();
    }
  }
  for (int e = tid; e < hpg * dv; e += NSA_THREADS) {
    const int h = e / dv;
    const float l = ls[h];
    out[row * dv + e] = from_f<T>(l > 0.f ? os[e] / l : 0.f);
  }
  for (int h = tid; h < hpg; h += NSA_THREADS) {
    const float l = ls[h];
    lse[row + h] = l > 0.f ? ms[h] + logf(l) : INFINITY;
  }
}

// ---- key-outer tensor-core forward (bf16) ----------------------------------------------------
//
// Flash Sparse Attention's loop order (arXiv 2508.18224): for each selected block, the queries
// that chose it. One CTA per (work item w, chunk of 64 keys of the item's block) over the
// backward's work plan (segments (b, g, block j) of the inverse index, split into pieces); its
// K / V tile is loaded once and the reader rows (token, head) are taken 64 at a time, so no
// row of a tensor-core tile is padding and no column is masked for being another token's block
// (the union forward's waste when few heads share a group). Per 16-row slice of a warp: S = Q K^T
// over the 64 keys, keys > t masked, a local softmax (max m, sum l), O = P V; written as a
// partial (O / l in bf16, lse = m + log l) at [b, t, g, slot * chunks + chunk, head]. The combine
// kernel merges each row's partials in an order fixed by dv: deterministic. Shared: K [64][DK+8],
// V [64][DV+8], Q [64][DK+8] (bf16), tokens and slots [64].
template <int DK, int DV>
__device__ void slc_fwd_kv(const __nv_bfloat16* __restrict__ q,
                           const __nv_bfloat16* __restrict__ k,
                           const __nv_bfloat16* __restrict__ v, const int* __restrict__ inv_tok,
                           const int* __restrict__ inv_slot,
                           const long long* __restrict__ work_seg,
                           const long long* __restrict__ work_a,
                           const long long* __restrict__ work_b,
                           __nv_bfloat16* __restrict__ part_o, float* __restrict__ part_lse,
                           int S, int Hkv, int hpg, int n, int L, int NB, float scale) {
  constexpr int QS = DK + 8, VS = DV + 8;
  const int nchunks = (L + NSA_BK - 1) / NSA_BK;
  const long long w = blockIdx.x / nchunks;
  const int chunk = blockIdx.x % nchunks;
  const long long seg = work_seg[w];
  if (seg < 0) return;  // a padding item of the plan (uniform over the CTA)
  const int j = (int)(seg % NB);
  const int g = (int)((seg / NB) % Hkv), b = (int)(seg / NB / Hkv);
  const int H = Hkv * hpg, P = n * nchunks;
  const long long c0 = (long long)j * L + chunk * NSA_BK;
  const int nk = (int)max(0LL, min((long long)min(NSA_BK, L - chunk * NSA_BK), S - c0));
  if (nk <= 0) return;  // uniform over the CTA
  extern __shared__ __align__(16) unsigned char smraw[];
  __nv_bfloat16* Ks = reinterpret_cast<__nv_bfloat16*>(smraw);
  __nv_bfloat16* Vs = Ks + NSA_BK * QS;
  __nv_bfloat16* Qs = Vs + NSA_BK * VS;
  int* toks = reinterpret_cast<int*>(Qs + NSA_M * QS);
  int* slots = toks + NSA_M;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int gq = lane / 4, tig = lane % 4;
  const auto key_row = [&](const __nv_bfloat16* base, int width) {
    return [=](int c) -> const __nv_bfloat16* {
      return c < nk ? base + (((long long)b * S + c0 + c) * Hkv + g) * width : nullptr;
    };
  };
  copy_rows<DK>(Ks, QS, NSA_BK, key_row(k, DK), tid, NSA_THREADS);
  copy_rows<DV>(Vs, VS, NSA_BK, key_row(v, DV), tid, NSA_THREADS);
  cp_async_wait_all();  // completed for every thread by the loop's barriers
  const float sl2 = scale * 1.4426950408889634f;
  const int BT = NSA_M / hpg;
  const long long e0 = work_a[w], e1 = work_b[w];
  for (long long ei = e0; ei < e1; ei += BT) {
    const int ntok = (int)min((long long)BT, e1 - ei), nrows = ntok * hpg;
    __syncthreads();  // the previous slice's readers are done with Q
    copy_rows<DK>(Qs, QS, NSA_M, [&](int r) -> const __nv_bfloat16* {
      if (r >= nrows) return nullptr;
      const int t = inv_tok[ei + r / hpg];
      return q + (((long long)b * S + t) * H + g * hpg + r % hpg) * DK;
    }, tid, NSA_THREADS);
    for (int r = tid; r < NSA_M; r += NSA_THREADS) {
      toks[r] = r < nrows ? inv_tok[ei + r / hpg] : -1;
      slots[r] = r < nrows ? inv_slot[ei + r / hpg] : 0;
    }
    cp_async_wait_all();
    __syncthreads();
    if (warp * 16 >= nrows) continue;  // this warp's rows are all padding (uniform per warp)
    const int r0 = warp * 16 + gq, r1 = r0 + 8;
    const int tr[2] = {toks[r0], toks[r1]};
    float sacc[NSA_BK / 8][4];
#pragma unroll
    for (int nt = 0; nt < NSA_BK / 8; ++nt) sacc[nt][0] = sacc[nt][1] = sacc[nt][2] = sacc[nt][3] = 0.f;
#pragma unroll
    for (int kt = 0; kt < DK / 16; ++kt) {
      unsigned a[4];
      load_a(a, Qs, QS, warp * 16 + gq, kt * 16, tig);
#pragma unroll
      for (int nt = 0; nt < NSA_BK / 8; ++nt) {
        unsigned b0, b1;
        load_b(b0, b1, Ks, QS, nt * 8 + gq, kt * 16, tig);
        mma_bf16(sacc[nt], a[0], a[1], a[2], a[3], b0, b1);
      }
    }
    float m[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < NSA_BK / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = nt * 8 + tig * 2 + (e & 1), t = tr[e / 2];
        const bool vis = t >= 0 && c < nk && c0 + c <= t;
        const float s2 = vis ? sacc[nt][e] * sl2 : -INFINITY;
        sacc[nt][e] = s2;
        m[e / 2] = fmaxf(m[e / 2], s2);
      }
    }
    float l[2] = {0.f, 0.f};
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      m[rh] = fmaxf(m[rh], __shfl_xor_sync(0xffffffffu, m[rh], 1));
      m[rh] = fmaxf(m[rh], __shfl_xor_sync(0xffffffffu, m[rh], 2));
    }
    const float ref[2] = {m[0] == -INFINITY ? 0.f : m[0], m[1] == -INFINITY ? 0.f : m[1]};
#pragma unroll
    for (int nt = 0; nt < NSA_BK / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = fast_exp2(sacc[nt][e] - ref[e / 2]);
        sacc[nt][e] = p;
        l[e / 2] += p;
      }
    }
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      l[rh] += __shfl_xor_sync(0xffffffffu, l[rh], 1);
      l[rh] += __shfl_xor_sync(0xffffffffu, l[rh], 2);
    }
    float o[DV / 8][4];
#pragma unroll
    for (int nv = 0; nv < DV / 8; ++nv) o[nv][0] = o[nv][1] = o[nv][2] = o[nv][3] = 0.f;
    mma_c_tile<DV>(o, sacc, Vs, VS, lane);  // O = P V
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const int r = rh == 0 ? r0 : r1, t = tr[rh];
      if (t < 0) continue;
      const long long pidx =
          ((((long long)b * S + t) * Hkv + g) * P + slots[r] * nchunks + chunk) * hpg + r % hpg;
      const float inv = l[rh] > 0.f ? 1.f / l[rh] : 0.f;
#pragma unroll
      for (int nv = 0; nv < DV / 8; ++nv) {
        *reinterpret_cast<__nv_bfloat162*>(part_o + pidx * DV + nv * 8 + tig * 2) =
            __floats2bfloat162_rn(o[nv][2 * rh] * inv, o[nv][2 * rh + 1] * inv);
      }
      if (tig == 0) {
        part_lse[pidx] = l[rh] > 0.f ? (m[rh] + log2f(l[rh])) * 0.6931471805599453f : -INFINITY;
      }
    }
  }
}

// ---- token-per-warp tensor-core forward (bf16) -----------------------------------------------
//
// The paper's kernel shape on tensor cores: one warp (a CTA of 32 threads) per (token t, group
// g, batch b), whose 16 MMA rows are the group's heads (rows >= hpg are zeros, never written),
// streaming only its own token's keys, 16 at a time, through private stages (token_warp.cuh).
// Q's A fragments stay in registers for the whole stream; m, l and O are fwd_mma's (the score
// accumulators become P V's A operand). Compared with the union tiles: a token's blocks are not
// shared with its neighbours (at G = 16 a union-tile warp computes only its own token's blocks
// anyway, but the CTA streams the union, waits at two barriers per tile and keeps one tile in
// flight). Shared: the stages; Q passes through stage 0 first.
template <int DK, int DV>
__device__ void slc_fwd_warp(const __nv_bfloat16* __restrict__ q,
                             const __nv_bfloat16* __restrict__ k,
                             const __nv_bfloat16* __restrict__ v, const int* __restrict__ ids,
                             __nv_bfloat16* __restrict__ out, float* __restrict__ lse, int S,
                             int Hkv, int hpg, int n, int L, float scale) {
  extern __shared__ __align__(16) unsigned char smraw[];
  __nv_bfloat16* stages = reinterpret_cast<__nv_bfloat16*>(smraw);
  const int lane = threadIdx.x, gq = lane / 4, tig = lane % 4;
  const int t = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const long long row0 = ((long long)b * S + t) * (Hkv * hpg) + (long long)g * hpg;
  unsigned qf[DK / 16][4];
  warp_rows_to_a<DK>(qf, stages, q + row0 * DK, hpg, lane);
  const TokenWarpKeys<DK, DV, NSA_FWD_WARP_STAGES> keys(k, v, stages, ids, S, Hkv, n, L, t, g, b,
                                                        lane);
  const float sl2 = scale * 1.4426950408889634f;  // scores in log2 units
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
  float oacc[DV / 8][4];
#pragma unroll
  for (int j = 0; j < DV / 8; ++j) oacc[j][0] = oacc[j][1] = oacc[j][2] = oacc[j][3] = 0.f;
  keys.stream([&](const __nv_bfloat16* ks, const __nv_bfloat16* vs, int nk) {
    float sc[2][4];
    warp_scores<DK>(sc, qf, ks, lane);
    float mx0 = m0, mx1 = m1;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int u = nt * 8 + tig * 2 + (e & 1);
        const float s = u < nk ? sc[nt][e] * sl2 : -INFINITY;
        sc[nt][e] = s;
        if (e < 2) {
          mx0 = fmaxf(mx0, s);
        } else {
          mx1 = fmaxf(mx1, s);
        }
      }
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    // mx0, mx1 are finite (the sub-tile has keys); exp2(-inf - mx) = 0 on the first one.
    const float al0 = fast_exp2(m0 - mx0), al1 = fast_exp2(m1 - mx1);
    m0 = mx0;
    m1 = mx1;
    softmax_pv16<DV>(sc, mx0, mx1, al0, al1, l0, l1, oacc, vs, DV + 8, lane,
                     [](float x) { return fast_exp2(x); });  // O += P V
  });
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    const int r = gq + rh * 8;
    if (r >= hpg) continue;
    const float l = rh == 0 ? l0 : l1, m = rh == 0 ? m0 : m1;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const long long orow = row0 + r;
#pragma unroll
    for (int j = 0; j < DV / 8; ++j) {
      *reinterpret_cast<__nv_bfloat162*>(out + orow * DV + j * 8 + tig * 2) =
          __floats2bfloat162_rn(oacc[j][2 * rh] * inv, oacc[j][2 * rh + 1] * inv);
    }
    if (tig == 0) lse[orow] = l > 0.f ? (m + log2f(l)) * 0.6931471805599453f : INFINITY;
  }
}

// Merges the key-outer partials of each row (b, t, head): one warp per row. lse = log sum_i
// exp(lse_i), out = sum_i exp(lse_i - lse) o_i over the partials with lse_i > -inf (the others
// were never written); a row without partials (never, for cleaned ids) gets out 0, lse +inf.
// A lane reads 8 consecutive values of a partial (one 16-byte load): dv / 8 lanes cover one
// partial, so a warp reads 32 / (dv / 8) partials at once (dv 64: 4, 128: 2, 192: 1, lanes
// 24..31 idle), lane group j taking partials j, j + groups, ...; the groups' sums are then
// added by a fixed butterfly. The maximum and the sum of the weights are butterflies over
// lanes holding one partial's lse each. The order depends on dv and P only: deterministic.
// Needs dv % 8 == 0 and dv <= 256 (the tensor-core head sizes the key-outer forward runs at).
__device__ void slc_fwd_combine(const __nv_bfloat16* __restrict__ part_o,
                                const float* __restrict__ part_lse,
                                __nv_bfloat16* __restrict__ out, float* __restrict__ lse,
                                long long rows, int Hkv, int hpg, int P, int dv) {
  const long long row = (long long)blockIdx.x * (NSA_THREADS / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int H = Hkv * hpg, h = (int)(row % H);
  const long long bt = row / H;
  const long long base = ((bt * Hkv + h / hpg) * P) * hpg + h % hpg;  // partial i: base + i hpg
  // Lane i holds partial i's lse (and, below, its weight) for the first 32 partials; more
  // (P > 32: n * chunks of a long l') are read in a loop. One load per partial, issued by all
  // lanes at once, instead of every lane walking all P serially.
  const float own = lane < P ? part_lse[base + (long long)lane * hpg] : -INFINITY;
  float m = own;
  for (int i = 32 + lane; i < P; i += 32) m = fmaxf(m, part_lse[base + (long long)i * hpg]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  const int per_part = dv / 8, groups = 32 / per_part;
  const int group = lane / per_part, col = (lane % per_part) * 8;
  const bool active = group < groups;
  if (m == -INFINITY) {
    if (active && group == 0) *reinterpret_cast<uint4*>(out + row * dv + col) = make_uint4(0, 0, 0, 0);
    if (lane == 0) lse[row] = INFINITY;
    return;
  }
  const float own_w = own == -INFINITY ? 0.f : __expf(own - m);
  float sum = own_w;
  for (int i = 32 + lane; i < P; i += 32) {
    const float li = part_lse[base + (long long)i * hpg];
    if (li != -INFINITY) sum += __expf(li - m);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  float acc[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] = 0.f;
  // acc += w * this lane's 8 values of partial i.
  auto add_partial = [&](int i, float w) {
    const uint4 raw =
        *reinterpret_cast<const uint4*>(part_o + (base + (long long)i * hpg) * dv + col);
    const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 f = __bfloat1622float2(pairs[e]);
      acc[2 * e] += w * f.x;
      acc[2 * e + 1] += w * f.y;
    }
  };
  // The weights of the first 32 partials come from their lanes (every lane takes part in each
  // shuffle, so the loop runs to the same bound on all of them).
  const int rounds = (min(P, 32) + groups - 1) / groups;
  for (int r = 0; r < rounds; ++r) {
    const int i = r * groups + group;
    const float w = __shfl_sync(0xffffffffu, own_w, i < 32 ? i : 0);
    if (active && i < min(P, 32) && w != 0.f) add_partial(i, w);
  }
  if (active) {
    for (int i = 32 + group; i < P; i += groups) {
      const float li = part_lse[base + (long long)i * hpg];
      if (li != -INFINITY) add_partial(i, __expf(li - m));
    }
  }
  // Lane group j + 2^k adds into group j: groups is 4, 2 or 1, per_part lanes apart.
  for (int off = per_part; off < groups * per_part; off *= 2) {
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] += __shfl_down_sync(0xffffffffu, acc[e], off);
  }
  if (active && group == 0) {
    uint4 packed;
    __nv_bfloat162* o2 = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
    for (int e = 0; e < 4; ++e) o2[e] = __floats2bfloat162_rn(acc[2 * e] / sum, acc[2 * e + 1] / sum);
    *reinterpret_cast<uint4*>(out + row * dv + col) = packed;
  }
  if (lane == 0) lse[row] = m + logf(sum);
}

}  // namespace nsa

#define NSA_SIMT_FWD(NAME, T)                                                                  \
  extern "C" __global__ void __launch_bounds__(NSA_THREADS)                                    \
      NAME(const T* q, const T* k, const T* v, const int* ids, T* out, float* lse, int S,      \
           int Hkv, int hpg, int dk, int dv, int n, int L, float scale) {                      \
    nsa::slc_fwd_simt<T>(q, k, v, ids, out, lse, S, Hkv, hpg, dk, dv, n, L, scale);           \
  }
NSA_SIMT_FWD(nsa_slc_fwd_simt_f32, float)
NSA_SIMT_FWD(nsa_slc_fwd_simt_bf16, __nv_bfloat16)

#define NSA_MMA_FWD(DK, DV)                                                                    \
  extern "C" __global__ void __launch_bounds__(NSA_THREADS) nsa_slc_fwd_mma_dk##DK##_dv##DV(  \
      const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const int* ids, \
      __nv_bfloat16* out, float* lse, int S, int Hkv, int hpg, int n, int L, float scale,      \
      int P) {                                                                                 \
    nsa::fwd_mma<DK, DV>(q, k, v, nsa::selected_keys(ids, n, L, P, S), out, lse, S, Hkv, hpg,  \
                         scale);                                                               \
  }
NSA_MMA_FWD(64, 64)
NSA_MMA_FWD(64, 128)
NSA_MMA_FWD(64, 192)
NSA_MMA_FWD(128, 64)
NSA_MMA_FWD(128, 128)
NSA_MMA_FWD(128, 192)
NSA_MMA_FWD(192, 64)
NSA_MMA_FWD(192, 128)
NSA_MMA_FWD(192, 192)

#define NSA_KV_FWD(DK, DV)                                                                     \
  extern "C" __global__ void __launch_bounds__(NSA_THREADS) nsa_slc_fwd_kv_dk##DK##_dv##DV(   \
      const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v,                 \
      const int* inv_tok, const int* inv_slot, const long long* work_seg,                      \
      const long long* work_a, const long long* work_b, __nv_bfloat16* part_o,                 \
      float* part_lse, int S, int Hkv, int hpg, int n, int L, int NB, float scale) {           \
    nsa::slc_fwd_kv<DK, DV>(q, k, v, inv_tok, inv_slot, work_seg, work_a, work_b, part_o,     \
                            part_lse, S, Hkv, hpg, n, L, NB, scale);                          \
  }
NSA_KV_FWD(64, 64)
NSA_KV_FWD(64, 128)
NSA_KV_FWD(64, 192)
NSA_KV_FWD(128, 64)
NSA_KV_FWD(128, 128)
NSA_KV_FWD(128, 192)
NSA_KV_FWD(192, 64)
NSA_KV_FWD(192, 128)
NSA_KV_FWD(192, 192)

#define NSA_WARP_FWD(DK, DV)                                                                   \
  extern "C" __global__ void __launch_bounds__(32) nsa_slc_fwd_warp_dk##DK##_dv##DV(           \
      const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const int* ids, \
      __nv_bfloat16* out, float* lse, int S, int Hkv, int hpg, int n, int L, float scale) {    \
    nsa::slc_fwd_warp<DK, DV>(q, k, v, ids, out, lse, S, Hkv, hpg, n, L, scale);               \
  }
NSA_WARP_FWD(64, 64)
NSA_WARP_FWD(64, 128)
NSA_WARP_FWD(64, 192)
NSA_WARP_FWD(128, 64)
NSA_WARP_FWD(128, 128)
NSA_WARP_FWD(128, 192)
NSA_WARP_FWD(192, 64)
NSA_WARP_FWD(192, 128)
NSA_WARP_FWD(192, 192)

extern "C" __global__ void __launch_bounds__(NSA_THREADS)
    nsa_slc_fwd_combine(const __nv_bfloat16* part_o, const float* part_lse, __nv_bfloat16* out,
                        float* lse, long long rows, int Hkv, int hpg, int P, int dv) {
  nsa::slc_fwd_combine(part_o, part_lse, out, lse, rows, Hkv, hpg, P, dv);
}

#define NSA_CLEAN_IDS(NAME, I)                                                                 \
  extern "C" __global__ void __launch_bounds__(NSA_THREADS)                                    \
      NAME(const I* in, int* out, long long rows, int S, int G, int n, int L, int last) {      \
    nsa::clean_ids<I>(in, out, rows, S, G, n, L, last);                                        \
  }
NSA_CLEAN_IDS(nsa_clean_ids_i32, int)
NSA_CLEAN_IDS(nsa_clean_ids_i64, long long)
