// The tile partials of the decode kernels (decode.cu): the step's arguments, a tile's keys,
// and the partial softmax state of a group's heads over a CTA's tiles, in two forms: CTA-wide
// tiles for any group and dtype (tiles_partial), warp-level tiles for bf16 groups up to 16 heads
// at the tensor-core head sizes (warp_tiles_partial). The layouts are decode.cu's.
#pragma once
#include "attend.cuh"
#include "select.cuh"

#define NSA_DEC_KEYS 64
#define NSA_DEC_SCORE_THREADS 256  // threads of an nsa_dec_scores CTA
#define NSA_DEC_COMBINE_THREADS 1024  // most threads of an nsa_dec_combine CTA
#define NSA_DEC_MAX_SELECT_SLICES 64  // most nsa_dec_scores CTAs per (b, g) (MAX_SELECT_SLICES)
#define DECODE_MAX_HPG 64
// Shared bytes before a warp-level tile kernel's Q: each warp's two stage barriers (sm_90's
// bulk copies; reserved on every architecture, so the host's sizes need no arch).
#define NSA_DEC_BARRIER_BYTES 64

namespace nsa {

struct DecodeArgs {
  int B, Hkv, hpg, dk, dv;
  int cl, cd;                 // compressed block length l and stride d
  int L, n, n_local, w;       // selection block length l', picks, forced local blocks, window
  int chunks_cmp, tpb, chunks_win, nb, nc;  // tiles (see above), block-score and score widths
  int tpc_cmp, tpc_att;                     // tiles per CTA of the two tile launches
  int parts_cmp, parts_slc, parts_win;      // partial states per (b, g) of each branch
  int sel_slices, slice_blocks;             // selection CTAs per (b, g) and blocks each takes
  long long cap_raw, cap_cmp, cap_win;      // slots per (b, g) of each buffer; cap_win 0: no ring
  float scale_log2;                         // softmax scale * log2(e)
  Taps taps;
};

__device__ __forceinline__ int dec_parts(const DecodeArgs& a) {
  return a.parts_cmp + a.parts_slc + a.parts_win;
}

__device__ __forceinline__ int dec_rows(int hpg) { return (hpg + 15) / 16 * 16; }

// One tile's keys: the first `keys` rows from buffer row `first` on (modulo `wrap`, the window
// ring's slots, when nonzero) of the (b, g) slices `k` [rows][dk] and `v` [rows][dv].
template <typename T>
struct DecTile {
  const T* k;
  const T* v;
  long long first, wrap;
  int keys;
};

// The buffer slot of the tile's key u (the ring's slot when the tile wraps).
template <typename T>
__device__ __forceinline__ long long tile_slot(const DecTile<T>& tl, int u) {
  const long long r = tl.first + u;
  return tl.wrap > 0 ? r % tl.wrap : r;
}

template <typename T>
__device__ __forceinline__ const T* tile_row(const DecTile<T>& tl, const T* base, int u,
                                             int width) {
  return u < tl.keys ? base + tile_slot(tl, u) * width : nullptr;
}

// Copies `rows` rows of `width` elements (row r from src(r), nullptr: zeros) into a shared tile
// with row stride `stride`: cp.async 16-byte pieces for bf16 (width a multiple of 8; the caller
// commits the group), plain loads for fp32. Complete after the wait and a barrier.
template <typename T, typename RowFn>
__device__ __forceinline__ void dec_copy(T* tile, int stride, int rows, int width, RowFn src,
                                         int tid) {
  if constexpr (sizeof(T) == 2) {
    const int pieces = width / 8;
    for (int e = tid; e < rows * pieces; e += NSA_THREADS) {
      const int r = e / pieces, ch = e % pieces;
      const T* g = src(r);
      T* dst = tile + r * stride + ch * 8;
      if (g != nullptr) {
        cp_async16(dst, g + ch * 8);
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  } else {
    for (int e = tid; e < rows * width; e += NSA_THREADS) {
      const int r = e / width, c = e % width;
      const T* g = src(r);
      tile[r * stride + c] = g != nullptr ? g[c] : T(0);
    }
  }
}

// One warp's copy of 16 rows of P 16-byte pieces into a shared tile with row stride `stride`:
// row r's source address is lane r's `addr` (0: zeros, for rows past a tile's keys, where P V
// needs 0 * V = 0), taken by a shuffle; consecutive lanes copy consecutive pieces, 512
// contiguous bytes an instruction, by cp.async (the caller commits the group).
template <int P>
__device__ __forceinline__ void warp_copy_rows16(__nv_bfloat16* tile, int stride,
                                                 unsigned long long addr, int lane) {
#pragma unroll
  for (int i = 0; i < 16 * P / 32; ++i) {
    const int e = i * 32 + lane, r = e / P, ch = e % P;
    const __nv_bfloat16* src = reinterpret_cast<const __nv_bfloat16*>(__shfl_sync(0xffffffffu, addr, r));
    __nv_bfloat16* dst = tile + r * stride + ch * 8;
    if (src != nullptr) {
      cp_async16(dst, src + ch * 8);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// The partial softmax state of the group's heads over `ntiles` tiles of up to 64 keys
// (tile_of(y) describes tile y; ntiles > 1 needs multi, the running state in shared memory):
// loads Q (rows of `qg`, the group's [hpg][dk] block) once and the tiles' K and V (the next
// tile's copy in flight while this one is computed), computes each tile's scores (log2 units),
// calls on_score(y, h, u, s0, s1, n) for every valid score (n = 1: s0 is key u's; n = 2: s0 and
// s1 are keys u and u + 1's, u even: one 8-byte store), and writes per head m, l and o into ml / o
// (this CTA's slices: ml [hpg][2], o [hpg][dv]). An empty tile (no keys) costs no loads.
template <typename T, int DK, typename TileOf, typename OnScore>
__device__ __forceinline__ void tiles_partial(const DecodeArgs& a, int ntiles, bool multi,
                                              const T* __restrict__ qg, TileOf tile_of,
                                              OnScore on_score, float* __restrict__ ml,
                                              float* __restrict__ o) {
  extern __shared__ __align__(16) unsigned char smraw[];
  constexpr bool BF = sizeof(T) == 2;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int hr = dec_rows(a.hpg), dk = DK > 0 ? DK : a.dk, dv = a.dv;
  const int qs = BF ? dk + 8 : dk + 1, vs = BF ? dv + 8 : dv + 1;
  const int nbuf = multi ? 2 : 1;
  T* qsm = reinterpret_cast<T*>(smraw);
  T* kbuf = qsm + hr * qs;
  T* vbuf = kbuf + nbuf * NSA_DEC_KEYS * qs;
  float* ssm = reinterpret_cast<float*>(vbuf + nbuf * NSA_DEC_KEYS * vs);
  float* osm = ssm + hr * 65;  // multi only: o [hr][dv], then m, l, rescale [hr]
  float* mrun = osm + hr * dv;
  float* lrun = mrun + hr;
  float* alpha = lrun + hr;
  if (multi) {
    for (int e = tid; e < hr * dv; e += NSA_THREADS) osm[e] = 0.f;
    for (int h = tid; h < hr; h += NSA_THREADS) {
      mrun[h] = -INFINITY;
      lrun[h] = 0.f;
      alpha[h] = 0.f;
    }
  }
  const auto load = [&](int y, int buf) {
    const DecTile<T> tl = tile_of(y);
    if (tl.keys <= 0) return;
    dec_copy<T>(kbuf + buf * NSA_DEC_KEYS * qs, qs, NSA_DEC_KEYS, dk,
                [&](int u) { return tile_row(tl, tl.k, u, dk); }, tid);
    dec_copy<T>(vbuf + buf * NSA_DEC_KEYS * vs, vs, NSA_DEC_KEYS, dv,
                [&](int u) { return tile_row(tl, tl.v, u, dv); }, tid);
  };
  dec_copy<T>(qsm, qs, hr, dk,
              [&](int r) -> const T* { return r < a.hpg ? qg + (long long)r * dk : nullptr; },
              tid);
  load(0, 0);
  if constexpr (BF) cp_async_commit();

  for (int y = 0; y < ntiles; ++y) {
    const int buf = multi ? (y & 1) : 0;
    if (y + 1 < ntiles) {
      load(y + 1, (y + 1) & 1);
      if constexpr (BF) {
        cp_async_commit();
        cp_async_wait<1>();
      }
    } else if constexpr (BF) {
      cp_async_wait<0>();
    }
    __syncthreads();
    const DecTile<T> tl = tile_of(y);
    const T* ks = kbuf + buf * NSA_DEC_KEYS * qs;
    const T* vsm = vbuf + buf * NSA_DEC_KEYS * vs;
    if (tl.keys > 0) {
      if constexpr (BF) {
        // S = Q K^T on tensor cores: warp w owns keys 16w .. 16w + 15 of every row block.
        const int gq = lane / 4, tig = lane % 4;
        const __nv_bfloat16* Qb = reinterpret_cast<const __nv_bfloat16*>(qsm);
        const __nv_bfloat16* Kb = reinterpret_cast<const __nv_bfloat16*>(ks);
        for (int mt = 0; mt < hr / 16; ++mt) {
          float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
          for (int kt = 0; kt < DK / 16; ++kt) {
            unsigned fa[4];
            load_a(fa, Qb, qs, mt * 16 + gq, kt * 16, tig);
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
              unsigned b0, b1;
              load_b(b0, b1, Kb, qs, warp * 16 + nt * 8 + gq, kt * 16, tig);
              mma_bf16(acc[nt], fa[0], fa[1], fa[2], fa[3], b0, b1);
            }
          }
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int r = mt * 16 + gq + (e / 2) * 8, c = warp * 16 + nt * 8 + tig * 2 + (e & 1);
              ssm[r * 65 + c] = acc[nt][e] * a.scale_log2;
            }
          }
        }
      } else {
        for (int e = tid; e < hr * NSA_DEC_KEYS; e += NSA_THREADS) {
          const int r = e / NSA_DEC_KEYS, c = e % NSA_DEC_KEYS;
          float s = 0.f;
          for (int x = 0; x < dk; ++x) s = fmaf(to_f(qsm[r * qs + x]), to_f(ks[c * qs + x]), s);
          ssm[r * 65 + c] = s * a.scale_log2;
        }
      }
      __syncthreads();

      // Per head (one warp each): mask, report, the running max, exp2 into the score row, l.
      for (int h = warp; h < hr; h += NSA_THREADS / 32) {
        float* srow = ssm + h * 65;
        if (h >= a.hpg) {  // padding rows of the tensor-core tile: P = 0
          srow[lane] = srow[lane + 32] = 0.f;
          if (multi && lane == 0) alpha[h] = 0.f;
          continue;
        }
        float s0 = srow[lane], s1 = srow[lane + 32];
        const bool v0 = lane < tl.keys, v1 = lane + 32 < tl.keys;
        if (v0) on_score(y, h, lane, s0, 0.f, 1);
        if (v1) on_score(y, h, lane + 32, s1, 0.f, 1);
        s0 = v0 ? s0 : -INFINITY;
        s1 = v1 ? s1 : -INFINITY;
        float mt = fmaxf(s0, s1);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, off));
        const float m_prev = multi ? mrun[h] : -INFINITY;
        const float m = fmaxf(m_prev, mt);
        const float e0 = v0 ? exp2f(s0 - m) : 0.f, e1 = v1 ? exp2f(s1 - m) : 0.f;
        const float l = warp_sum(e0 + e1);
        srow[lane] = e0;
        srow[lane + 32] = e1;
        if (lane == 0) {
          if (multi) {
            const float al = m_prev == -INFINITY ? 0.f : exp2f(m_prev - m);
            alpha[h] = al;
            mrun[h] = m;
            lrun[h] = lrun[h] * al + l;
          } else {
            ml[h * 2] = m;
            ml[h * 2 + 1] = l;
          }
        }
      }
      __syncthreads();

      // o = P V: bf16 on tensor cores ((row block, 16 columns) pairs w, w + 4, ...; P rounded
      // to bf16 as the flash kernels do), fp32 with FMAs (thread per (head, column)); with
      // multi, o = o * rescale + P V in shared memory.
      if constexpr (BF) {
        const int gq = lane / 4, tig = lane % 4, cgs = dv / 16;
        const __nv_bfloat16* Vb = reinterpret_cast<const __nv_bfloat16*>(vsm);
        for (int pr = warp; pr < (hr / 16) * cgs; pr += NSA_THREADS / 32) {
          const int mt = pr / cgs, cg = pr % cgs;
          float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
          const float* p0 = ssm + (mt * 16 + gq) * 65;
          const float* p1 = p0 + 8 * 65;
#pragma unroll
          for (int kk = 0; kk < NSA_DEC_KEYS / 16; ++kk) {
            const int c = kk * 16 + tig * 2;
            const unsigned a0 = pack_bf16(p0[c], p0[c + 1]), a1 = pack_bf16(p1[c], p1[c + 1]);
            const unsigned a2 = pack_bf16(p0[c + 8], p0[c + 9]), a3 = pack_bf16(p1[c + 8], p1[c + 9]);
            unsigned vb[4];
            load_b_trans_x2(vb, Vb, vs, kk * 16, cg * 16, lane);
            mma_bf16(acc[0], a0, a1, a2, a3, vb[0], vb[1]);
            mma_bf16(acc[1], a0, a1, a2, a3, vb[2], vb[3]);
          }
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            const int col = cg * 16 + nt * 8 + tig * 2;
            const int h0 = mt * 16 + gq, h1 = h0 + 8;
            if (multi) {
              float2* o0 = reinterpret_cast<float2*>(osm + h0 * dv + col);
              float2* o1 = reinterpret_cast<float2*>(osm + h1 * dv + col);
              const float al0 = alpha[h0], al1 = alpha[h1];
              const float2 x0 = *o0, x1 = *o1;
              *o0 = make_float2(fmaf(x0.x, al0, acc[nt][0]), fmaf(x0.y, al0, acc[nt][1]));
              *o1 = make_float2(fmaf(x1.x, al1, acc[nt][2]), fmaf(x1.y, al1, acc[nt][3]));
            } else {
              if (h0 < a.hpg) *reinterpret_cast<float2*>(o + (long long)h0 * dv + col) = make_float2(acc[nt][0], acc[nt][1]);
              if (h1 < a.hpg) *reinterpret_cast<float2*>(o + (long long)h1 * dv + col) = make_float2(acc[nt][2], acc[nt][3]);
            }
          }
        }
      } else {
        for (int e = tid; e < a.hpg * dv; e += NSA_THREADS) {
          const int h = e / dv, col = e % dv;
          const float* srow = ssm + h * 65;
          float acc = 0.f;
          for (int u = 0; u < NSA_DEC_KEYS; ++u) acc = fmaf(srow[u], to_f(vsm[u * vs + col]), acc);
          if (multi) {
            osm[h * dv + col] = fmaf(osm[h * dv + col], alpha[h], acc);
          } else {
            o[(long long)h * dv + col] = acc;
          }
        }
      }
    } else if (!multi) {
      // A tile without keys: m = -inf and l = 0 (the combine skips its o).
      for (int h = tid; h < a.hpg; h += NSA_THREADS) {
        ml[h * 2] = -INFINITY;
        ml[h * 2 + 1] = 0.f;
      }
    }
    __syncthreads();  // this buffer and the score rows are free for the next tile
  }
  if (multi) {
    for (int h = tid; h < a.hpg; h += NSA_THREADS) {
      ml[h * 2] = mrun[h];  // -inf when no tile had keys (then l = 0 and o = 0)
      ml[h * 2 + 1] = lrun[h];
    }
    for (int e = tid; e < a.hpg * dv / 4; e += NSA_THREADS) {
      reinterpret_cast<float4*>(o)[e] = reinterpret_cast<const float4*>(osm)[e];
    }
  }
}

// The warp-level form of tiles_partial for bf16 with hpg <= 16 (one m16 row block) and
// (dk, dv) = (DK, DV) in {64, 128, 192}^2, the shapes of the paper and the presets: warp w takes
// keys 16w .. 16w + 15 of every tile into stages of its own shared memory (the next tile's copy
// in flight: on sm_90 K by a bulk copy per row, lane l < 16 K's row l, reported to the stage's
// mbarrier, and V by cp.async, 16 bytes a lane, one commit group per stage, so that both copy
// paths carry each stage; on sm_80 all by cp.async), keeps its rows' running max,
// sum and o in registers (the score accumulators become P V's A operand without a trip through
// shared memory, as in FlashAttention-2), and synchronises only with itself; the four warps'
// states are merged once at the end. Shared: the warps' stage barriers (NSA_DEC_BARRIER_BYTES),
// Q [16][DK + 8], then per warp `stages` stages of K [16][DK + 8] and V [16][DV + 8] bf16,
// reused at the end for the warps' m, l [4][16] and o [4][16][DV + 8] fp32 (warp_tile_smem on
// the host).
template <int DK, int DV, typename TileOf, typename OnScore>
__device__ __forceinline__ void warp_tiles_partial(const DecodeArgs& a, int ntiles, int stages,
                                                   const __nv_bfloat16* __restrict__ qg,
                                                   TileOf tile_of, OnScore on_score,
                                                   float* __restrict__ ml,
                                                   float* __restrict__ o) {
  using bf = __nv_bfloat16;
  extern __shared__ __align__(16) unsigned char smraw[];
  constexpr int QS = DK + 8, VS = DV + 8, PK = DK / 8;
  constexpr int STAGE = 16 * (QS + VS);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, gq = lane / 4, tig = lane % 4;
  bf* qsm = reinterpret_cast<bf*>(smraw + NSA_DEC_BARRIER_BYTES);
  bf* wbuf = qsm + 16 * QS + warp * stages * STAGE;
#if __CUDA_ARCH__ >= 900
  unsigned long long* bars = reinterpret_cast<unsigned long long*>(smraw) + warp * 2;
  if (lane == 0) {
    mbar_init(bars, 1);
    mbar_init(bars + 1, 1);
    mbar_init_fence();
  }
  __syncwarp();
#endif
  for (int e = tid; e < 16 * PK; e += NSA_THREADS) {
    const int r = e / PK, ch = e % PK;
    bf* dst = qsm + r * QS + ch * 8;
    if (r < a.hpg) {
      cp_async16(dst, qg + (long long)r * DK + ch * 8);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
  cp_async_commit();
  // This warp's 16 rows of tile y into stage st. Lanes l and l + 16 find row l's address; the
  // cp.async copies go by warp_copy_rows16, 512 contiguous bytes an instruction (copies by lane
  // pairs per row, 32 bytes of each of 16 rows an instruction, measured 20 % slower: BENCHMARKS
  // round 22).
  const auto load = [&](int y, int st) {
    const DecTile<bf> tl = tile_of(y);
    const int rows = max(0, min(16, tl.keys - warp * 16));
#if __CUDA_ARCH__ >= 900
    // On sm_90 K goes by bulk copies (lane l < 16: row l), reported to the stage's mbarrier, V
    // by cp.async, so that both copy engines of the SM carry the stage. Every use of a stage
    // arrives once (with no bytes when the warp has no keys), so the stage's phases stay in
    // step with its uses.
    if (lane == 0) mbar_arrive_expect(bars + st, rows * DK * 2);
#endif
    if (rows == 0) return;
    const int r = lane & 15, u = warp * 16 + r;
    bf* kd = wbuf + st * STAGE;
    bf* vd = kd + 16 * QS;
#if __CUDA_ARCH__ >= 900
    if (lane < 16) {
      if (u < tl.keys) {
        fence_proxy_async_shared();
        bulk_copy_to_shared(kd + r * QS, tile_row(tl, tl.k, u, DK), DK * 2, bars + st);
      } else {  // past the tile's keys: zeros (P is 0 there)
        for (int c = 0; c < DK / 8; ++c) reinterpret_cast<uint4*>(kd + r * QS)[c] = make_uint4(0u, 0u, 0u, 0u);
      }
    }
#else
    warp_copy_rows16<PK>(kd, QS, reinterpret_cast<unsigned long long>(tile_row(tl, tl.k, u, DK)), lane);
#endif
    warp_copy_rows16<DV / 8>(vd, VS, reinterpret_cast<unsigned long long>(tile_row(tl, tl.v, u, DV)), lane);
  };
  // Rows gq (index 0) and gq + 8 (index 1) of this warp's state.
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
  float oacc[DV / 8][4];
#pragma unroll
  for (int j = 0; j < DV / 8; ++j) oacc[j][0] = oacc[j][1] = oacc[j][2] = oacc[j][3] = 0.f;
  load(0, 0);
  cp_async_commit();
  for (int y = 0; y < ntiles; ++y) {
    const int st = stages > 1 ? (y & 1) : 0;
#if __CUDA_ARCH__ >= 900
    if (y + 1 < ntiles) {
      load(y + 1, (y + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();  // Q and this tile's V
    } else {
      cp_async_wait<0>();
    }
    if (y == 0) __syncthreads();  // Q, copied by every thread
    mbar_wait(bars + st, (y / stages) & 1);
    __syncwarp();  // the V pieces and zero rows other lanes wrote
#else
    if (y + 1 < ntiles) {
      load(y + 1, (y + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    if (y == 0) {
      __syncthreads();  // Q, copied by every thread
    } else {
      __syncwarp();
    }
#endif
    const DecTile<bf> tl = tile_of(y);
    const int kw = min(16, tl.keys - warp * 16);
    if (kw > 0) {
      const bf* ks = wbuf + st * STAGE;
      const bf* vs = ks + 16 * QS;
      float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int kt = 0; kt < DK / 16; ++kt) {
        unsigned fa[4], kb[4];
        load_a_x4(fa, qsm, QS, 0, kt * 16, lane);
        load_b_x2(kb, ks, QS, 0, kt * 16, lane);
        mma_bf16(sc[0], fa[0], fa[1], fa[2], fa[3], kb[0], kb[1]);
        mma_bf16(sc[1], fa[0], fa[1], fa[2], fa[3], kb[2], kb[3]);
      }
      // Each lane's two neighbouring keys u, u + 1 of a row reported together (a sector of 8
      // such pairs per row: whole 32-byte sectors, where two 4-byte stores filled 17.8 of 32
      // bytes a sector, BENCHMARKS round 22).
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int u = nt * 8 + tig * 2, h = gq + half * 8;
          const bool ok0 = u < kw, ok1 = u + 1 < kw;
          float v0 = sc[nt][half * 2] * a.scale_log2, v1 = sc[nt][half * 2 + 1] * a.scale_log2;
          if (ok0 && h < a.hpg) on_score(y, h, warp * 16 + u, v0, v1, ok1 ? 2 : 1);
          v0 = ok0 ? v0 : -INFINITY;
          v1 = ok1 ? v1 : -INFINITY;
          sc[nt][half * 2] = v0;
          sc[nt][half * 2 + 1] = v1;
          if (half == 0) {
            mx0 = fmaxf(mx0, fmaxf(v0, v1));
          } else {
            mx1 = fmaxf(mx1, fmaxf(v0, v1));
          }
        }
      }
#pragma unroll
      for (int off = 1; off < 4; off <<= 1) {
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
      }
      const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);  // finite: the warp has keys
      const float al0 = m0 == -INFINITY ? 0.f : exp2f(m0 - n0);
      const float al1 = m1 == -INFINITY ? 0.f : exp2f(m1 - n1);
      m0 = n0;
      m1 = n1;
      // P rounded to bf16, as the flash kernels do, for P V.
      softmax_pv16<DV, true>(sc, n0, n1, al0, al1, l0, l1, oacc, vs, VS, lane,
                       [](float x) { return exp2f(x); });
    }
    __syncwarp();  // this stage is free for the copy two tiles on
  }
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  __syncthreads();  // every warp is done with its stages: reuse them for the merge
  // The warps' o rows DV + 8 floats apart: rows gq and gq + 1 start 8 banks apart, so a
  // half-warp's 8-byte stores (four rows, four lanes each) meet no bank twice (DV apart, they
  // conflicted 7.2-way, BENCHMARKS round 22).
  constexpr int WS = DV + 8;
  float* wm = reinterpret_cast<float*>(qsm + 16 * QS);
  float* wl = wm + 64;
  float* wo = wl + 64;
  // Each warp scales its rows to the CTA's max m of their head (exp2 once per row, in
  // registers), so the merge below is a plain sum of four rows, 16 bytes a thread.
  if (tig == 0) {
    wm[warp * 16 + gq] = m0;
    wm[warp * 16 + gq + 8] = m1;
  }
  __syncthreads();
  float top0 = -INFINITY, top1 = -INFINITY;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    top0 = fmaxf(top0, wm[w * 16 + gq]);
    top1 = fmaxf(top1, wm[w * 16 + gq + 8]);
  }
  const float f0 = m0 > -INFINITY ? exp2f(m0 - top0) : 0.f;  // a warp without keys adds 0
  const float f1 = m1 > -INFINITY ? exp2f(m1 - top1) : 0.f;
  if (tig == 0) {
    wl[warp * 16 + gq] = l0 * f0;
    wl[warp * 16 + gq + 8] = l1 * f1;
  }
#pragma unroll
  for (int j = 0; j < DV / 8; ++j) {
    const int col = j * 8 + tig * 2;
    *reinterpret_cast<float2*>(wo + (warp * 16 + gq) * WS + col) =
        make_float2(oacc[j][0] * f0, oacc[j][1] * f0);
    *reinterpret_cast<float2*>(wo + (warp * 16 + gq + 8) * WS + col) =
        make_float2(oacc[j][2] * f1, oacc[j][3] * f1);
  }
  __syncthreads();
  constexpr int V4 = DV / 4;
  for (int e = tid; e < a.hpg * V4; e += NSA_THREADS) {
    const int h = e / V4, c = (e % V4) * 4;
    float4 acc = *reinterpret_cast<const float4*>(wo + h * WS + c);
#pragma unroll
    for (int w = 1; w < 4; ++w) {
      const float4 x = *reinterpret_cast<const float4*>(wo + (w * 16 + h) * WS + c);
      acc.x += x.x;
      acc.y += x.y;
      acc.z += x.z;
      acc.w += x.w;
    }
    *reinterpret_cast<float4*>(o + (long long)h * DV + c) = acc;
  }
  for (int h = tid; h < a.hpg; h += NSA_THREADS) {
    float mx = -INFINITY, l = 0.f;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      mx = fmaxf(mx, wm[w * 16 + h]);
      l += wl[w * 16 + h];
    }
    ml[h * 2] = mx;  // -inf when no warp had keys (then l = 0 and o = 0)
    ml[h * 2 + 1] = l;
  }
}

// tiles_partial (DV == 0) or, for its shapes, warp_tiles_partial (DV > 0, T bf16).
template <typename T, int DK, int DV, typename TileOf, typename OnScore>
__device__ __forceinline__ void dec_partial(const DecodeArgs& a, int ntiles, int tpc,
                                            const T* __restrict__ qg, TileOf tile_of,
                                            OnScore on_score, float* __restrict__ ml,
                                            float* __restrict__ o) {
  if constexpr (DV > 0) {
    warp_tiles_partial<DK, DV>(a, ntiles, tpc > 1 ? 2 : 1, qg, tile_of, on_score, ml, o);
  } else {
    tiles_partial<T, DK>(a, ntiles, tpc > 1, qg, tile_of, on_score, ml, o);
  }
}

}  // namespace nsa
