// Compressed-branch attention (NSA §3.3.1, the "cmp" branch) and block selection from it
// (§3.3.2, Eqs. 8-11), without ever holding an [S, Nc] or [S, Nb] tensor in device memory.
//
// Layouts (row-major, contiguous): q [B, S, H, dk], compressed keys ck [B, Nc, Hkv, dk] and
// values cv [B, Nc, Hkv, dv], out [B, S, H, dv], lse fp32 [B, S, H] (natural log), block ids
// int64 [B, S, Hkv, n]. Query head h reads key head h / hpg. Token t sees compressed tokens
// i < nvis(t) (attend.cuh, Eq. 7).
//
// nsa_cmp_fwd_mma_dk{DK}_dv{DV}: attend.cuh's fwd_mma over the compressed columns (bf16, tensor
//   cores): out, and the lse that selection and the backward reuse.
// nsa_cmp_dq_mma_dk{DK}_dv{DV}: attend.cuh's dq_mma over the compressed columns.
// nsa_cmp_dkdv_mma_dk{DK}_dv{DV}: attend.cuh's dkdv_mma over tiles of 64 compressed tokens,
//   each tile's readers (tokens from tile * 64 * d + l - 1 on) split into pieces by the host
//   plan; split tiles are summed by selected_bwd.cu's reduce kernel (deterministic).
// nsa_cmp_select_{bf16, f32}_dk{64, 128, 192}[_w8]: one CTA of 4 warps (8 with _w8, bf16 only)
//   per (tile of BQ = M / hpg tokens, group g, batch b), M = 16 * warps rows (token, head), the
//   CTA size chosen by the host so that an SM holds the most rows (eight warps share each K
//   tile among twice the rows). Per tile of 64 compressed tokens: scores q . k (tensor cores
//   for bf16, fp32 FMAs for fp32), p = exp(scale q . k - lse) (Eq. 8, recomputed from the
//   forward's lse), summed over the group's heads (Eq. 10) into ps [BQ][64], then folded into
//   the selection-block scores with Eq. 9's overlap taps (block j receives compressed token
//   j * step + first + k with integer weight w[k]), only for blocks up to the token's current
//   one; each (token, block) score is updated by one thread per tile, in tile order, so the
//   sums are deterministic. A block's score is final after the tile of its last tap, so the
//   scores live in a small ring per token (R = sa.ring slots, R * step >= 63 + count) and each
//   final block goes straight into the token's top list (select.cuh, TopListWarp: the best
//   candidates so far, sorted, in shared memory between tiles), by the warp that folds that
//   token. After the stream the warp writes Eq. 11's picks as nsa-select makes them: block 0
//   and the n_local blocks ending at the current one floor(t / l') first (ForcedBlocks), then
//   the other candidates (blocks <= the current one) by score, ties to the lower index; n <= 32;
//   padding -1; written ascending. No [Nb] array: shared memory does not grow with S. A token's
//   visible compressed tokens are a prefix of the stream (Eq. 7), so a tile's visible columns
//   follow from one count (nvis) without a column table or mask. The next tile's keys are
//   copied while this one is scored (two K buffers). bf16: a warp keeps its 16 rows' A
//   fragments of Q (all of DK) in registers, so Q passes once through the last M rows of the K
//   buffers and the tile loop loads only K fragments; with G = 16 a warp's rows are one token's
//   heads and Eq. 10 is summed in registers (head_sum16). Shared: K [2][64][DK + pad] (fp32:
//   then Q [64][DK + 1]), lse2 [M], p [M][72] (not for bf16 with G = 16; 72 = 8 mod 32 makes a
//   warp's float2 fragment stores conflict-free), ps [BQ][64], ring [BQ][R], top lists
//   [BQ][32] scores and blocks, [BQ] lengths, nvis and current blocks [BQ]. Two barriers per
//   tile (three with the p tile).
// nsa_cmp_fold_w{1,4}, nsa_cmp_unfold_w{1,4}: the row copies of the cuDNN form of this branch
//   (glue/cmp_cudnn.h), over rows of `words` 32-bit words, W words per thread (W = 4: 16-byte
//   accesses, for rows and strides that are multiples of 4 words on 16-byte aligned memory).
//   Both see H = Hkv * G of the Hs heads of an nsa-layout tensor [B, S, Hs, words]
//   (contiguous), from head h0 on (the glue folds a group of KV heads at a time).
//   Fold: dst [B, Hkv, d, G, m, words] (contiguous) row (b, g, r, h, j) = row
//   (b, t = l - 1 + j * d + r, h0 + g * G + h) of the nsa-layout src, zeros where t >= S.
//   Unfold, its inverse for cuDNN's outputs: row (b, t, h0 + g * G + h) of the nsa-layout dst =
//   src row (b, (g * d + r) * G + h, j) at word strides (sb, sh, sm), the `fill` pattern where
//   t < l - 1. One thread per W words in a grid-stride loop: both sides coalesced along the
//   row. libtorch's copy of the same strided 6-d views ran at about 0.6 TB/s.
#include "attend.cuh"
#include "select.cuh"

namespace nsa {

struct SelectArgs {
  int L;        // selection block length l'
  int n;        // blocks per token
  int n_local;  // local blocks forced (ending at the current block)
  int Nb;       // selection blocks of the sequence
  int bq;       // tokens per CTA
  int ring;     // block scores kept per token: a power of 2 >= (63 + taps.count) / taps.step
  Taps taps;
};

// Column sums over a warp's 16 rows of a 16 x 64 C-fragment tile p (mma.cuh's layout: element
// (nt, e) of lane 4 gq + tig is row gq + 8 (e / 2), column nt * 8 + 2 tig + (e & 1)). Rows gq
// and gq + 8 are added in the lane, then the 8 row groups by a reduce-scatter over lane bits
// 4, 3, 2 (each step halves the values a lane holds; the kept half is v[2 gq + i] after the
// last): lane 4 gq + tig returns the sums of columns gq * 8 + 2 tig and that + 1, 14 shuffles
// in all instead of 48. The order of the additions is fixed, so the sums are deterministic.
__device__ __forceinline__ float2 head_sum16(const float (&p)[NSA_BK / 8][4], int lane) {
  float v[16];  // v[2 nt + j]: rows gq and gq + 8, column nt * 8 + 2 tig + j
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    v[2 * nt] = p[nt][0] + p[nt][2];
    v[2 * nt + 1] = p[nt][1] + p[nt][3];
  }
  // Step over lane bit 4 (gq bit 2): keep v[8..15] if set, else v[0..7].
  const bool b4 = lane & 16, b3 = lane & 8, b2 = lane & 4;
  float w[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float send = b4 ? v[i] : v[i + 8], keep = b4 ? v[i + 8] : v[i];
    w[i] = keep + __shfl_xor_sync(0xffffffffu, send, 16);
  }
  float x[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float send = b3 ? w[i] : w[i + 4], keep = b3 ? w[i + 4] : w[i];
    x[i] = keep + __shfl_xor_sync(0xffffffffu, send, 8);
  }
  float y[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float send = b2 ? x[i] : x[i + 2], keep = b2 ? x[i + 2] : x[i];
    y[i] = keep + __shfl_xor_sync(0xffffffffu, send, 4);
  }
  return make_float2(y[0], y[1]);
}

#define NSA_PT 72  // row stride of cmp_select's p tile (floats)

// floor(a / b) for b > 0.
__device__ __forceinline__ int floor_div(int a, int b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

template <typename T, int DK, int WARPS>
__device__ void cmp_select(const T* __restrict__ q, const T* __restrict__ ck,
                           const float* __restrict__ lse, long long* __restrict__ out_ids,
                           int S, int Nc, int Hkv, int hpg, int cl, int cd, float scale,
                           const SelectArgs sa) {
  constexpr bool MMA = sizeof(T) == 2;
  constexpr int M = 16 * WARPS, THREADS = 32 * WARPS;  // rows (token, head), threads
  constexpr int QS = MMA ? DK + 8 : DK + 1;  // fp32: odd stride, conflict-free column reads
  static_assert(MMA ? (M == NSA_BK || M == 2 * NSA_BK) : M == NSA_BK,
                "bf16: Q is staged in the last M rows of the two K tiles; fp32: 4 warps");
  extern __shared__ __align__(16) unsigned char smraw[];
  T* Ks = reinterpret_cast<T*>(smraw);  // two tiles
  // bf16: Q passes through the K buffers' last M rows (buffer 1 for 4 warps, both for 8) into
  // the warps' registers before the stream starts.
  T* Qs = Ks + (MMA ? 2 * NSA_BK - M : 2 * NSA_BK) * QS;
  float* lse2s = reinterpret_cast<float*>(Ks + (MMA ? 2 : 3) * NSA_BK * QS);  // [M]
  // bf16 at G = 16: a warp's rows are one token's heads, summed in registers (head_sum16).
  const bool head_sum_in_regs = MMA && hpg == 16;
  float* pt = lse2s + M;  // [M][NSA_PT], absent with head_sum_in_regs
  float* ps = pt + (head_sum_in_regs ? 0 : M * NSA_PT);  // [BQ][64]
  const int BQ = sa.bq;
  // Block scores in a ring of R per token, block j at j % R: block j is folded from the tile of
  // its first tap to that of its last, where it is final (or before the first tile if all its
  // taps precede column 0), and block j + R's first tap lies R * step - count + 1 >= 64 columns
  // after j's last, so in a later tile: the two never share a slot.
  const int R = sa.ring;
  float* ring = ps + BQ * 64;                                 // [BQ][R]
  float* list_s = ring + BQ * R;                              // [BQ][32]: TopListWarp per token
  int* list_j = reinterpret_cast<int*>(list_s + BQ * 32);     // [BQ][32]
  int* list_len = list_j + BQ * 32;                           // [BQ]
  int* nvis = list_len + BQ;                                  // [BQ]
  int* curs = nvis + BQ;                                      // [BQ]: current block t / l'

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int t0 = blockIdx.x * BQ, g = blockIdx.y, b = blockIdx.z;
  const int H = Hkv * hpg, nrows = BQ * hpg;
  const auto row_of = [&](int r) -> long long {
    const int t = t0 + r / hpg;
    if (r >= nrows || t >= S) return -1;
    return ((long long)b * S + t) * H + g * hpg + r % hpg;
  };
  if constexpr (MMA) {
    copy_rows<DK>(reinterpret_cast<__nv_bfloat16*>(Qs), QS, M, [&](int r) {
      const long long row = row_of(r);
      return row < 0 ? nullptr : reinterpret_cast<const __nv_bfloat16*>(q) + row * DK;
    }, tid, THREADS);
    cp_async_wait_all();
  } else {
    for (int e = tid; e < M * DK; e += THREADS) {
      const int r = e / DK, d = e % DK;
      const long long row = row_of(r);
      Qs[r * QS + d] = row < 0 ? from_f<T>(0.f) : q[row * DK + d];
    }
  }
  for (int r = tid; r < M; r += THREADS) {
    const long long row = row_of(r);
    lse2s[r] = row < 0 ? INFINITY : lse[row] * 1.4426950408889634f;
  }
  for (int e = tid; e < BQ * R; e += THREADS) ring[e] = 0.f;
  for (int i = tid; i < BQ; i += THREADS) list_len[i] = 0;
  // Token t0 + i reads compressed tokens 0 .. nvis[i] - 1 (Eq. 7): a prefix of the stream of
  // F columns, F = the last token's count, so a tile's visible columns follow from nvis alone.
  const KeySpec ks = compressed_keys(Nc, cl, cd);
  for (int i = tid; i < BQ; i += THREADS) {
    nvis[i] = t0 + i < S ? num_visible_compressed(ks, t0 + i) : 0;
    curs[i] = (t0 + i) / sa.L;
  }
  const int F = num_visible_compressed(ks, min(t0 + BQ, S) - 1);
  __syncthreads();  // Q, lse2s, nvis, curs, the zeroed ring and list lengths are visible
  const float sl2 = scale * 1.4426950408889634f;

  // The warp's rows r0 = warp * 16 + gq (C-fragment elements 0, 1) and r1 = r0 + 8 (2, 3):
  // their visible counts and lse2, and (bf16) the A fragments of all of Q's DK columns, held
  // in registers for the whole stream.
  const int gq = lane / 4, tig = lane % 4;
  const int r0 = warp * 16 + gq, r1 = r0 + 8;
  const int nv0 = r0 < nrows ? nvis[r0 / hpg] : 0, nv1 = r1 < nrows ? nvis[r1 / hpg] : 0;
  const float lr[2] = {lse2s[r0], lse2s[r1]};
  unsigned qa[MMA ? DK / 16 : 1][4];
  if constexpr (MMA) {
#pragma unroll
    for (int kt = 0; kt < DK / 16; ++kt) {
      load_a_x4(qa[kt], reinterpret_cast<const __nv_bfloat16*>(Qs), QS, warp * 16, kt * 16, lane);
    }
  }

  // Two-stage stream: tile f + 64's compressed keys are copied (cp.async for bf16; fp32 copies
  // synchronously) into the other buffer while tile f is scored.
  const auto issue = [&](int f, int buf) {
    T* Kt = Ks + buf * NSA_BK * QS;
    if constexpr (MMA) {
      const long long rs = (long long)Hkv * DK;  // compressed token p of (b, g) at ckg + p * rs
      const __nv_bfloat16* ckg = reinterpret_cast<const __nv_bfloat16*>(ck) + ((long long)b * Nc * Hkv + g) * DK;
      copy_rows_strided<DK, NSA_BK, THREADS>(reinterpret_cast<__nv_bfloat16*>(Kt), QS,
                                             ckg + f * rs, rs, F - f, tid);
      cp_async_commit();
    } else {
      for (int e = tid; e < NSA_BK * DK; e += THREADS) {
        const int c = e / DK, d = e % DK, p = f + c;
        Kt[c * QS + d] = p < F ? ck[(((long long)b * Nc + p) * Hkv + g) * DK + d] : from_f<T>(0.f);
      }
    }
  };
  // Eq. 11 for token i over the final blocks lo .. hi (ascending, each once): its candidates
  // are offered to its top list (TopListWarp, kept in shared memory between tiles), the ring
  // slots of lo .. min(hi, cur) cleared, and the list returned. By the warp that folds token i.
  int fin_next = 0;  // the first block not yet final (uniform)
  const auto finalize = [&](int i, const ForcedBlocks& fb, int lo, int hi) {
    __syncwarp();  // the warp's own earlier writes of the ring and the list are visible
    TopListWarp top{list_s[i * 32 + lane], list_j[i * 32 + lane], list_len[i], fb.rem};
    hi = min(hi, fb.cur);
    if (lo > hi) return top;
    bool changed = false;
    for (int j0 = lo; j0 <= hi; j0 += 32) {
      const int j = j0 + lane;
      float v = -1.f;
      if (j <= hi) {
        float* slot = ring + i * R + (j & (R - 1));
        v = fb.candidate(j) ? *slot : -1.f;
        *slot = 0.f;
      }
      changed |= top.offer(v, j0, lane);
    }
    if (changed) {  // uniform
      list_s[i * 32 + lane] = top.s;
      list_j[i * 32 + lane] = top.j;
      __syncwarp();  // every lane has read list_len
      if (lane == 0) list_len[i] = top.len;
    }
    return top;
  };
  // (Scalars, not sa: a lambda that reads the parameter struct by reference copies it to local
  // memory.)
  const int n_local = sa.n_local, kmax = min(sa.n, sa.Nb);
  const auto forced = [&](int i) { return ForcedBlocks(curs[i], n_local, kmax); };
  // Blocks whose taps all lie before column 0 are final before any tile: finalised first, so
  // that the tile loop only ever finalises blocks whose last tap is in the tile it folded (the
  // ring's reuse rule above).
  const int jpre = min(sa.Nb - 1, floor_div(-sa.taps.first - sa.taps.count, sa.taps.step));
  if (jpre >= 0) {
    for (int i = warp; i < BQ && t0 + i < S; i += WARPS) {
      finalize(i, forced(i), 0, jpre);
    }
    fin_next = jpre + 1;
  }
  // Four warps: Q sits in buffer 1 until the first barrier below, so tile 0 goes into buffer 0
  // at once; eight warps' Q fills both buffers and must be in registers first.
  if constexpr (M > NSA_BK) __syncthreads();
  if (F > 0) issue(0, 0);
  int bi = 0;
  for (int f0 = 0; f0 < F; f0 += NSA_BK, bi ^= 1) {
    if constexpr (MMA) cp_async_wait<0>();
    // Tile f0 is in buffer bi for every thread; buffer bi ^ 1 (the last tile, or Q), pt and ps
    // are no longer read.
    __syncthreads();
    if (f0 + NSA_BK < F) issue(f0 + NSA_BK, bi ^ 1);
    const T* Kt = Ks + bi * NSA_BK * QS;
    if constexpr (MMA) {
      const __nv_bfloat16* Kb = reinterpret_cast<const __nv_bfloat16*>(Kt);
      const int n0 = min(max(nv0 - f0, 0), NSA_BK), n1 = min(max(nv1 - f0, 0), NSA_BK);
      float sacc[NSA_BK / 8][4];
#pragma unroll
      for (int nt = 0; nt < NSA_BK / 8; ++nt) sacc[nt][0] = sacc[nt][1] = sacc[nt][2] = sacc[nt][3] = 0.f;
      // A warp whose rows see none of the tile's columns writes zeros without the products.
      if (__any_sync(0xffffffffu, (n0 | n1) != 0)) {
#pragma unroll
        for (int kt = 0; kt < DK / 16; ++kt) {
#pragma unroll
          for (int nt = 0; nt < NSA_BK / 8; nt += 2) {
            unsigned bb[4];
            load_b_x2(bb, Kb, QS, nt * 8, kt * 16, lane);
            mma_bf16(sacc[nt], qa[kt][0], qa[kt][1], qa[kt][2], qa[kt][3], bb[0], bb[1]);
            mma_bf16(sacc[nt + 1], qa[kt][0], qa[kt][1], qa[kt][2], qa[kt][3], bb[2], bb[3]);
          }
        }
      }
      // Element (nt, e) is column nt * 8 + 2 tig + (e & 1), visible while below its row's count.
      const int lim[2] = {n0 - 2 * tig, n1 - 2 * tig};
#pragma unroll
      for (int nt = 0; nt < NSA_BK / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool vis = nt * 8 + (e & 1) < lim[e / 2];
          sacc[nt][e] = vis ? fast_exp2(sacc[nt][e] * sl2 - lr[e / 2]) : 0.f;
        }
      }
      if (head_sum_in_regs) {
        // The warp's 16 rows are one token's heads: Eq. 10 in registers, straight into ps.
        const float2 sum = head_sum16(sacc, lane);
        if (warp < BQ) {
          const int c = gq * 8 + tig * 2;  // n tile gq, head_sum16's columns
          *reinterpret_cast<float2*>(ps + warp * NSA_BK + c) = sum;
        }
      } else {
#pragma unroll
        for (int nt = 0; nt < NSA_BK / 8; ++nt) {
          const int c = nt * 8 + tig * 2;
          *reinterpret_cast<float2*>(pt + r0 * NSA_PT + c) = make_float2(sacc[nt][0], sacc[nt][1]);
          *reinterpret_cast<float2*>(pt + r1 * NSA_PT + c) = make_float2(sacc[nt][2], sacc[nt][3]);
        }
      }
    } else {
      for (int e = tid; e < M * NSA_BK; e += THREADS) {
        const int r = e / NSA_BK, c = e % NSA_BK;
        float p = 0.f;
        if (r < nrows && f0 + c < nvis[r / hpg]) {
          float s = 0.f;
          for (int d = 0; d < DK; ++d) s = fmaf(to_f(Qs[r * QS + d]), to_f(Kt[c * QS + d]), s);
          p = exp2f(s * sl2 - lse2s[r]);
        }
        pt[r * NSA_PT + c] = p;
      }
    }
    __syncthreads();
    if (!head_sum_in_regs) {
      // Eq. 10: the group's heads, in head order.
      for (int e = tid; e < BQ * NSA_BK; e += THREADS) {
        const int i = e / NSA_BK, c = e % NSA_BK;
        float acc = 0.f;
        for (int h = 0; h < hpg; ++h) acc += pt[(i * hpg + h) * NSA_PT + c];
        ps[e] = acc;
      }
      __syncthreads();
    }
    // Eq. 9: blocks whose taps reach into columns f0 .. f0 + 63, up to the token's current
    // block; one thread per (token, block) adds the tile's taps in tap order. Then the blocks
    // whose last tap is in this tile or before are final: their scores go to the token's top
    // list (Eq. 11) and their ring slots are cleared.
    const Taps& tp = sa.taps;
    int jlo = f0 - tp.first - (tp.count - 1);
    jlo = jlo <= 0 ? 0 : (jlo + tp.step - 1) / tp.step;
    const int jhi = min(sa.Nb - 1, (f0 + NSA_BK - 1 - tp.first) / tp.step);
    const int jfin = min(sa.Nb - 1, floor_div(f0 + NSA_BK - tp.first - tp.count, tp.step));
    for (int i = warp; i < BQ && t0 + i < S; i += WARPS) {
      const ForcedBlocks fb = forced(i);
      for (int j = jlo + lane; j <= min(jhi, fb.cur); j += 32) {
        float acc = 0.f;
        for (int kk = 0; kk < tp.count; ++kk) {
          const int ci = j * tp.step + tp.first + kk - f0;
          if (ci >= 0 && ci < NSA_BK) acc += (float)tp.w[kk] * ps[i * NSA_BK + ci];
        }
        ring[i * R + (j & (R - 1))] += acc;
      }
      __syncwarp();  // the token's ring is folded
      finalize(i, fb, fin_next, jfin);
    }
    fin_next = max(fin_next, jfin + 1);
  }

  // The blocks still open (every block if no tile was streamed), then the picks, one warp per
  // token (the warp that folded it: its ring and list need no barrier).
  for (int i = warp; i < BQ && t0 + i < S; i += WARPS) {
    const int t = t0 + i;
    const ForcedBlocks fb = forced(i);
    const TopListWarp top = finalize(i, fb, fin_next, sa.Nb - 1);
    top.write(fb, sa.n, out_ids + (((long long)b * S + t) * Hkv + g) * sa.n, lane);
  }
}

template <int W> struct Words;
template <> struct Words<1> { using T = unsigned int; };
template <> struct Words<4> { using T = uint4; };

template <int W>
__device__ void cmp_fold(const unsigned int* __restrict__ src, unsigned int* __restrict__ dst,
                         int words, int S, int H, int Hs, int h0, int Hkv, int cl, int cd,
                         int m, long long rows) {
  using V = typename Words<W>::T;
  const int G = H / Hkv, per_row = words / W;
  const long long n = rows * per_row, step = (long long)gridDim.x * blockDim.x;
  for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += step) {
    const long long row = e / per_row;
    const int c = (int)(e - row * per_row);
    long long rest = row;
    const int j = (int)(rest % m);
    rest /= m;
    const int h = (int)(rest % G);
    rest /= G;
    const int r = (int)(rest % cd);
    rest /= cd;
    const int g = (int)(rest % Hkv);
    const long long b = rest / Hkv;
    const long long t = cl - 1 + (long long)j * cd + r;
    V v;
    if (t < S) {
      v = reinterpret_cast<const V*>(src + ((b * S + t) * Hs + h0 + g * G + h) * words)[c];
    } else {
      v = V{};
    }
    reinterpret_cast<V*>(dst + row * words)[c] = v;
  }
}

template <int W>
__device__ void cmp_unfold(const unsigned int* __restrict__ src, long long sb, long long sh,
                           long long sm, unsigned int* __restrict__ dst, int words, int S,
                           int H, int Hs, int h0, int Hkv, int cl, int cd, unsigned int fill,
                           long long rows) {
  using V = typename Words<W>::T;
  const int G = H / Hkv, per_row = words / W;
  const long long n = rows * per_row, step = (long long)gridDim.x * blockDim.x;
  for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += step) {
    const long long row = e / per_row;
    const int c = (int)(e - row * per_row);
    const int hh = (int)(row % H);
    const long long bt = row / H;
    const int t = (int)(bt % S);
    const long long b = bt / S;
    V v;
    if (t < cl - 1) {
      unsigned int* f = reinterpret_cast<unsigned int*>(&v);
#pragma unroll
      for (int i = 0; i < W; ++i) f[i] = fill;
    } else {
      const int j = (t - (cl - 1)) / cd, r = (t - (cl - 1)) % cd;
      const int head = ((hh / G) * cd + r) * G + hh % G;
      v = reinterpret_cast<const V*>(src + b * sb + head * sh + j * sm)[c];
    }
    reinterpret_cast<V*>(dst + (bt * Hs + h0 + hh) * words)[c] = v;
  }
}

}  // namespace nsa

#define NSA_CMP_FOLD(W)                                                                        \
  extern "C" __global__ void __launch_bounds__(NSA_THREADS)                                    \
      nsa_cmp_fold_w##W(const unsigned int* src, unsigned int* dst, int words, int S, int H,   \
                        int Hs, int h0, int Hkv, int cl, int cd, int m, long long rows) {      \
    nsa::cmp_fold<W>(src, dst, words, S, H, Hs, h0, Hkv, cl, cd, m, rows);                    \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(NSA_THREADS) nsa_cmp_unfold_w##W(              \
      const unsigned int* src, long long sb, long long sh, long long sm, unsigned int* dst,   \
      int words, int S, int H, int Hs, int h0, int Hkv, int cl, int cd, unsigned int fill,    \
      long long rows) {                                                                        \
    nsa::cmp_unfold<W>(src, sb, sh, sm, dst, words, S, H, Hs, h0, Hkv, cl, cd, fill, rows);   \
  }
NSA_CMP_FOLD(1)
NSA_CMP_FOLD(4)

#define NSA_CMP_MMA(DK, DV)                                                                    \
  extern "C" __global__ void __launch_bounds__(NSA_THREADS) nsa_cmp_fwd_mma_dk##DK##_dv##DV(  \
      const __nv_bfloat16* q, const __nv_bfloat16* ck, const __nv_bfloat16* cv,               \
      __nv_bfloat16* out, float* lse, int S, int Nc, int Hkv, int hpg, int cl, int cd,         \
      float scale) {                                                                           \
    nsa::fwd_mma<DK, DV>(q, ck, cv, nsa::compressed_keys(Nc, cl, cd), out, lse, S, Hkv, hpg,  \
                         scale);                                                               \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(NSA_THREADS) nsa_cmp_dq_mma_dk##DK##_dv##DV(   \
      const __nv_bfloat16* q, const __nv_bfloat16* ck, const __nv_bfloat16* cv,               \
      const __nv_bfloat16* dout, const float* lse, const float* D, __nv_bfloat16* dq, int S,   \
      int Nc, int Hkv, int hpg, int cl, int cd, float scale) {                                 \
    nsa::dq_mma<DK, DV>(q, ck, cv, nsa::compressed_keys(Nc, cl, cd), dout, lse, D, dq, S, Hkv, \
                        hpg, scale);                                                           \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(NSA_THREADS) nsa_cmp_dkdv_mma_dk##DK##_dv##DV( \
      const __nv_bfloat16* q, const __nv_bfloat16* ck, const __nv_bfloat16* cv,               \
      const __nv_bfloat16* dout, const float* lse, const float* D, const long long* work_seg,  \
      const long long* work_a, const long long* work_b, const int* work_slot, float* scratch,  \
      __nv_bfloat16* dk_out, __nv_bfloat16* dv_out, int S, int Nc, int Hkv, int hpg, int NT,   \
      int cl, int cd, float scale) {                                                           \
    const nsa::DkdvKeys keys = {KEYS_COMPRESSED, Nc, NSA_BK, NT, cl, cd, nullptr};             \
    nsa::dkdv_mma<DK, DV>(q, ck, cv, dout, lse, D, keys, work_seg, work_a, work_b, work_slot, \
                          scratch, dk_out, dv_out, S, Hkv, hpg, scale);                       \
  }
NSA_CMP_MMA(64, 64)
NSA_CMP_MMA(64, 128)
NSA_CMP_MMA(64, 192)
NSA_CMP_MMA(128, 64)
NSA_CMP_MMA(128, 128)
NSA_CMP_MMA(128, 192)
NSA_CMP_MMA(192, 64)
NSA_CMP_MMA(192, 128)
NSA_CMP_MMA(192, 192)

// CTAs per SM the selection kernels' registers allow (the host's CTA-size rule reads the same):
// four of 4 warps at dk 64 (the `125m` shape's shared memory fits four), three at dk 128 / 192,
// two of 8 warps.
#define NSA_SELECT_MIN_CTAS(DK, WARPS) ((WARPS) == 8 ? 2 : (DK) == 64 ? 4 : 3)
#define NSA_CMP_SELECT(NAME, T, DK, WARPS)                                                     \
  extern "C" __global__ void __launch_bounds__(32 * WARPS, NSA_SELECT_MIN_CTAS(DK, WARPS))     \
      NAME(const T* q, const T* ck, const float* lse, long long* ids, int S, int Nc, int Hkv,  \
           int hpg, int cl, int cd, float scale, nsa::SelectArgs sa) {                         \
    nsa::cmp_select<T, DK, WARPS>(q, ck, lse, ids, S, Nc, Hkv, hpg, cl, cd, scale, sa);       \
  }
NSA_CMP_SELECT(nsa_cmp_select_bf16_dk64, __nv_bfloat16, 64, 4)
NSA_CMP_SELECT(nsa_cmp_select_bf16_dk128, __nv_bfloat16, 128, 4)
NSA_CMP_SELECT(nsa_cmp_select_bf16_dk192, __nv_bfloat16, 192, 4)
NSA_CMP_SELECT(nsa_cmp_select_f32_dk64, float, 64, 4)
NSA_CMP_SELECT(nsa_cmp_select_f32_dk128, float, 128, 4)
NSA_CMP_SELECT(nsa_cmp_select_f32_dk192, float, 192, 4)
NSA_CMP_SELECT(nsa_cmp_select_bf16_dk64_w8, __nv_bfloat16, 64, 8)
NSA_CMP_SELECT(nsa_cmp_select_bf16_dk128_w8, __nv_bfloat16, 128, 8)
NSA_CMP_SELECT(nsa_cmp_select_bf16_dk192_w8, __nv_bfloat16, 192, 8)
