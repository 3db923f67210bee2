// One decode step of NSA attention (§3, Eqs. 5-11) for one new query token per sequence, over
// the per-branch caches of nsa-attn's decode path, in four kernels (split-K "flash decoding":
// every branch's keys are cut into tiles of 64 keys, one CTA per tile, partial softmax states
// merged at the end, so a handful of groups still fills the GPU):
//
// nsa_dec_cmp_{bf16_dk64, bf16_dk128, bf16_dk192, f32}: grid (chunks_cmp, Hkv, B). CTA (c, g, b)
//   takes compressed tokens c * 64 .. c * 64 + 63 that sequence b's token t sees (i < nvis(t),
//   Eq. 7) and the group's hpg query heads: scores s = scale * log2(e) * q . k (tensor cores for
//   bf16, fp32 FMAs for fp32), written to `scores` for selection, and the tile's partial state
//   per head (max m, sum l of exp2(s - m), o = sum exp2(s - m) v) to the partials. The last CTA
//   of each (b, g) to finish (a ticket counter, reset by that CTA, so the kernel can be
//   replayed in a CUDA graph) merges the tiles' (m, l) into each head's log2-sum-exp lse2.
// nsa_dec_scores: grid (ceil(nb / 64), Hkv, B). Eq. 8 (p = exp2(s - lse2)), Eq. 10 (sum over
//   the group's heads, in head order) and Eq. 9 (the overlap taps) for 64 selection blocks per
//   CTA, written to block_scores; the last CTA of each (b, g) takes Eq. 11's top n with the
//   forced blocks (select.cuh, the rule the training kernel uses) and writes the ids [B, Hkv, n]
//   ascending, -1 padded.
// nsa_dec_attend_{bf16_dk64, ..., f32}: grid (n * tiles_per_block + chunks_win, Hkv, B). The
//   same per-tile partial as the first kernel over 64 keys: selected block ids[x / tpb], keys
//   id * l' + (x % tpb) * 64 + u <= t (raw buffer), or window tile x - n * tpb: positions
//   t + 1 - min(w, t + 1) + tile * 64 + u <= t (ring slot p mod w, or the raw buffer).
// nsa_dec_combine_{bf16, f32}: grid (hpg, Hkv, B). Merges each branch's partials (scaled by
//   exp2(m - max)), divides by the merged sum (a branch without keys gives 0, as the reference
//   does), mixes the three with the gates (Eq. 5) and writes the output row.
//
// Layouts (contiguous): q [B, Hkv, hpg, dk] (query head g * hpg + h); caches [B, Hkv, slots, d]
// (raw: slot = position; compressed: slot = index; window ring: slot = position mod w);
// positions int64 [B] (t_b, the new token's position, already written to every buffer); gates
// [B, Hkv * hpg, 3] (cmp, slc, win); out [B, Hkv * hpg, dv]; partials: ml fp32 [B, Hkv, C, hpg, 2]
// and o fp32 [B, Hkv, C, hpg, dv] with C = chunks_cmp + n * tpb + chunks_win tiles (that order);
// scores fp32 [B, Hkv, hpg, nc]; lse2 fp32 [B, Hkv, hpg]; block_scores fp32 [B, Hkv, nb];
// tickets int32 [2, B, Hkv] (zero between launches); ids int64 [B, Hkv, n].
//
// Shared memory of the tile kernels (bytes, the host's decode_tile_smem): Q [HR][QS], K [64][QS]
// (bf16 QS = dk + 8, fp32 dk + 1), V [64][VS] (bf16 dv + 8, fp32 dv + 1), scores [HR][65] fp32,
// HR = hpg rounded up to 16. 128 threads (4 warps); for bf16 warp w computes Q K^T for query
// rows 16w .. 16w + 15 (hpg <= 64).
#include "attend.cuh"
#include "select.cuh"

#define NSA_DEC_KEYS 64
#define DECODE_MAX_HPG 64

namespace nsa {

struct DecodeArgs {
  int B, Hkv, hpg, dk, dv;
  int cl, cd;                 // compressed block length l and stride d
  int L, n, n_local, w;       // selection block length l', picks, forced local blocks, window
  int chunks_cmp, tpb, chunks_win, nb, nc;  // tiles (see above), block-score and score widths
  long long cap_raw, cap_cmp, cap_win;      // slots per (b, g) of each buffer; cap_win 0: no ring
  float scale_log2;                         // softmax scale * log2(e)
  Taps taps;
};

__device__ __forceinline__ int dec_chunks(const DecodeArgs& a) {
  return a.chunks_cmp + a.n * a.tpb + a.chunks_win;
}

__device__ __forceinline__ int dec_rows(int hpg) { return (hpg + 15) / 16 * 16; }

// The shared tiles of a tile kernel.
template <typename T>
struct DecTiles {
  T* q;
  T* k;
  T* v;
  float* s;  // [HR][65]
  int qs, vs;
};

template <typename T>
__device__ __forceinline__ DecTiles<T> carve_tiles(const DecodeArgs& a) {
  extern __shared__ __align__(16) unsigned char smraw[];
  constexpr bool BF = sizeof(T) == 2;
  DecTiles<T> d;
  d.qs = BF ? a.dk + 8 : a.dk + 1;
  d.vs = BF ? a.dv + 8 : a.dv + 1;
  const int hr = dec_rows(a.hpg);
  d.q = reinterpret_cast<T*>(smraw);
  d.k = d.q + hr * d.qs;
  d.v = d.k + NSA_DEC_KEYS * d.qs;
  d.s = reinterpret_cast<float*>(d.v + NSA_DEC_KEYS * d.vs);
  return d;
}

// Copies `rows` rows of `width` elements (row r from src(r), nullptr: zeros) into a shared tile
// with row stride `stride`: cp.async 16-byte pieces for bf16 (width a multiple of 8), plain
// loads for fp32. Complete after cp_async_wait_all() and a barrier.
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

// The partial softmax state of the group's heads over one tile of up to 64 keys: key u's rows
// come from krow(u) / vrow(u) (nullptr: not a key of this tile). Loads Q (rows of `qg`, the
// group's [hpg][dk] block), K and V, computes the scores into d.s (log2 units, -inf where no
// key), calls on_score(h, u, s) for every valid score, then per head m, l and o into ml / o
// (this tile's slices: ml [hpg][2], o [hpg][dv]).
template <typename T, int DK, typename KRow, typename VRow, typename OnScore>
__device__ __forceinline__ void tile_partial(const DecodeArgs& a, const DecTiles<T>& d,
                                             const T* __restrict__ qg, KRow krow, VRow vrow,
                                             OnScore on_score, float* __restrict__ ml,
                                             float* __restrict__ o) {
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int hr = dec_rows(a.hpg), dk = DK > 0 ? DK : a.dk, dv = a.dv;
  dec_copy<T>(d.q, d.qs, hr, dk,
              [&](int r) -> const T* { return r < a.hpg ? qg + (long long)r * dk : nullptr; },
              tid);
  dec_copy<T>(d.k, d.qs, NSA_DEC_KEYS, dk, krow, tid);
  dec_copy<T>(d.v, d.vs, NSA_DEC_KEYS, dv, vrow, tid);
  if constexpr (sizeof(T) == 2) cp_async_wait_all();
  __syncthreads();

  if constexpr (sizeof(T) == 2) {
    // S = Q K^T on tensor cores: warp w owns query rows 16w .. 16w + 15.
    if (warp * 16 < hr) {
      const int gq = lane / 4, tig = lane % 4;
      const __nv_bfloat16* Qb = reinterpret_cast<const __nv_bfloat16*>(d.q);
      const __nv_bfloat16* Kb = reinterpret_cast<const __nv_bfloat16*>(d.k);
      float acc[NSA_DEC_KEYS / 8][4];
#pragma unroll
      for (int nt = 0; nt < NSA_DEC_KEYS / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
#pragma unroll
      for (int kt = 0; kt < DK / 16; ++kt) {
        unsigned fa[4];
        load_a(fa, Qb, d.qs, warp * 16 + gq, kt * 16, tig);
#pragma unroll
        for (int nt = 0; nt < NSA_DEC_KEYS / 8; ++nt) {
          unsigned b0, b1;
          load_b(b0, b1, Kb, d.qs, nt * 8 + gq, kt * 16, tig);
          mma_bf16(acc[nt], fa[0], fa[1], fa[2], fa[3], b0, b1);
        }
      }
#pragma unroll
      for (int nt = 0; nt < NSA_DEC_KEYS / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = warp * 16 + gq + (e / 2) * 8, c = nt * 8 + tig * 2 + (e & 1);
          d.s[r * 65 + c] = acc[nt][e] * a.scale_log2;
        }
      }
    }
  } else {
    for (int e = tid; e < hr * NSA_DEC_KEYS; e += NSA_THREADS) {
      const int r = e / NSA_DEC_KEYS, c = e % NSA_DEC_KEYS;
      float s = 0.f;
      for (int x = 0; x < dk; ++x) s = fmaf(to_f(d.q[r * d.qs + x]), to_f(d.k[c * d.qs + x]), s);
      d.s[r * 65 + c] = s * a.scale_log2;
    }
  }
  __syncthreads();

  // Per head (one warp each): mask, report, m, exp2 into the score row, l.
  for (int h = warp; h < hr; h += NSA_THREADS / 32) {
    float* srow = d.s + h * 65;
    if (h >= a.hpg) {  // padding rows of the tensor-core tile: P = 0
      srow[lane] = srow[lane + 32] = 0.f;
      continue;
    }
    float s0 = srow[lane], s1 = srow[lane + 32];
    const bool v0 = krow(lane) != nullptr, v1 = krow(lane + 32) != nullptr;
    if (v0) on_score(h, lane, s0);
    if (v1) on_score(h, lane + 32, s1);
    s0 = v0 ? s0 : -INFINITY;
    s1 = v1 ? s1 : -INFINITY;
    float m = fmaxf(s0, s1);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    const float e0 = v0 ? exp2f(s0 - m) : 0.f, e1 = v1 ? exp2f(s1 - m) : 0.f;
    const float l = warp_sum(e0 + e1);
    srow[lane] = e0;
    srow[lane + 32] = e1;
    if (lane == 0) {
      ml[h * 2] = m;  // -inf for a tile without keys (then l = 0 and o = 0)
      ml[h * 2 + 1] = l;
    }
  }
  __syncthreads();

  // o = P V: bf16 on tensor cores (warp w takes column groups of 16: w, w + 4, ...; P rounded
  // to bf16 as the flash kernels do), fp32 with FMAs (thread per (head, column)).
  if constexpr (sizeof(T) == 2) {
    const int gq = lane / 4, tig = lane % 4;
    const __nv_bfloat16* Vb = reinterpret_cast<const __nv_bfloat16*>(d.v);
    for (int cg = warp; cg < dv / 16; cg += NSA_THREADS / 32) {
      for (int mt = 0; mt < hr / 16; ++mt) {
        float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        const float* p0 = d.s + (mt * 16 + gq) * 65;
        const float* p1 = p0 + 8 * 65;
#pragma unroll
        for (int kk = 0; kk < NSA_DEC_KEYS / 16; ++kk) {
          const int c = kk * 16 + tig * 2;
          const unsigned a0 = pack_bf16(p0[c], p0[c + 1]), a1 = pack_bf16(p1[c], p1[c + 1]);
          const unsigned a2 = pack_bf16(p0[c + 8], p0[c + 9]), a3 = pack_bf16(p1[c + 8], p1[c + 9]);
          unsigned vb[4];
          load_b_trans_x2(vb, Vb, d.vs, kk * 16, cg * 16, lane);
          mma_bf16(acc[0], a0, a1, a2, a3, vb[0], vb[1]);
          mma_bf16(acc[1], a0, a1, a2, a3, vb[2], vb[3]);
        }
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const int col = cg * 16 + nt * 8 + tig * 2;
          const int h0 = mt * 16 + gq, h1 = h0 + 8;
          if (h0 < a.hpg) *reinterpret_cast<float2*>(o + (long long)h0 * dv + col) = make_float2(acc[nt][0], acc[nt][1]);
          if (h1 < a.hpg) *reinterpret_cast<float2*>(o + (long long)h1 * dv + col) = make_float2(acc[nt][2], acc[nt][3]);
        }
      }
    }
  } else {
    for (int e = tid; e < a.hpg * dv; e += NSA_THREADS) {
      const int h = e / dv, col = e % dv;
      const float* srow = d.s + h * 65;
      float acc = 0.f;
      for (int u = 0; u < NSA_DEC_KEYS; ++u) acc = fmaf(srow[u], to_f(d.v[u * d.vs + col]), acc);
      o[(long long)h * dv + col] = acc;
    }
  }
}

// The merged state of `count` partials (m, l) at ml[x * stride] (log2 units), by one warp:
// returns the max m (-inf if none has keys) and the sum of l * exp2(m - max).
__device__ __forceinline__ float2 merge_ml(const float* ml, int count, long long stride,
                                           int lane) {
  float m = -INFINITY;
  for (int x = lane; x < count; x += 32) m = fmaxf(m, __ldcg(ml + x * stride));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  float l = 0.f;
  if (m > -INFINITY) {
    for (int x = lane; x < count; x += 32) l += __ldcg(ml + x * stride + 1) * exp2f(__ldcg(ml + x * stride) - m);
  }
  return make_float2(m, warp_sum(l));
}

// No static shared memory (the kernels opt into the device's whole dynamic maximum): the
// verdict reaches every thread through __syncthreads_or.
__device__ __forceinline__ bool last_to_finish(int* ticket, int total) {
  __threadfence();
  __syncthreads();
  int mine = 0;
  if (threadIdx.x == 0) {
    mine = atomicAdd(ticket, 1) == total - 1;
    if (mine) *ticket = 0;
  }
  const bool last = __syncthreads_or(mine) != 0;
  if (last) __threadfence();
  return last;
}

template <typename T, int DK>
__device__ void dec_cmp(const T* __restrict__ q, const T* __restrict__ ck,
                        const T* __restrict__ cv, const long long* __restrict__ positions,
                        float* __restrict__ part_ml, float* __restrict__ part_o,
                        float* __restrict__ scores, float* __restrict__ lse2,
                        int* __restrict__ tickets, const DecodeArgs a) {
  const int c = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const long long bg = (long long)b * a.Hkv + g;
  const long long t = positions[b];
  const int nvis = num_visible_compressed(compressed_keys((int)a.cap_cmp, a.cl, a.cd), t);
  const int i0 = c * NSA_DEC_KEYS;
  const int dk = DK > 0 ? DK : a.dk;
  const DecTiles<T> d = carve_tiles<T>(a);
  const int C = dec_chunks(a);
  const auto row = [&](const T* base, int width) {
    return [=](int u) -> const T* {
      const int i = i0 + u;
      return i < nvis ? base + (bg * a.cap_cmp + i) * width : nullptr;
    };
  };
  float* srow = scores + bg * a.hpg * a.nc;
  tile_partial<T, DK>(
      a, d, q + bg * a.hpg * dk, row(ck, dk), row(cv, a.dv),
      [&](int h, int u, float s) { srow[(long long)h * a.nc + i0 + u] = s; },
      part_ml + (bg * C + c) * a.hpg * 2, part_o + (bg * C + c) * a.hpg * a.dv);

  if (!last_to_finish(tickets + bg, a.chunks_cmp)) return;
  // lse2 of each head over every compressed tile (one warp per head).
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int h = warp; h < a.hpg; h += NSA_THREADS / 32) {
    const float2 st = merge_ml(part_ml + (bg * C * a.hpg + h) * 2, a.chunks_cmp, 2LL * a.hpg, lane);
    if (lane == 0) lse2[bg * a.hpg + h] = st.x > -INFINITY ? st.x + __log2f(st.y) : -INFINITY;
  }
}

// Eqs. 8-11 from the scores and lse2 of dec_cmp. Shared: lse2 [hpg], cand [2][4 * 32], then
// pc [64 * step + count] floats, reused by the last CTA for the block scores [nb].
__device__ void dec_scores(const long long* __restrict__ positions,
                           const float* __restrict__ scores, const float* __restrict__ lse2,
                           float* __restrict__ block_scores, int* __restrict__ tickets,
                           long long* __restrict__ ids, const DecodeArgs a) {
  extern __shared__ __align__(16) unsigned char smraw[];
  float* lse2s = reinterpret_cast<float*>(smraw);
  float* cand_s = lse2s + DECODE_MAX_HPG;
  int* cand_j = reinterpret_cast<int*>(cand_s + NSA_THREADS);
  float* pc = reinterpret_cast<float*>(cand_j + NSA_THREADS);
  const int tid = threadIdx.x;
  const int j0 = blockIdx.x * 64, g = blockIdx.y, b = blockIdx.z;
  const long long bg = (long long)b * a.Hkv + g;
  const long long t = positions[b];
  const int nvis = num_visible_compressed(compressed_keys(a.nc, a.cl, a.cd), t);
  const int cur = min((int)(t / a.L), a.nb - 1);
  const Taps& tp = a.taps;
  for (int h = tid; h < a.hpg; h += NSA_THREADS) lse2s[h] = lse2[bg * a.hpg + h];
  __syncthreads();
  // Compressed tokens this CTA's blocks read: base .. base + span - 1; p summed over the
  // group's heads in head order (Eq. 10).
  const long long base = (long long)j0 * tp.step + tp.first;
  const int span = 64 * tp.step + tp.count;
  const float* s = scores + bg * a.hpg * a.nc;
  for (int e = tid; e < span; e += NSA_THREADS) {
    const long long i = base + e;
    float acc = 0.f;
    if (i >= 0 && i < nvis) {
#pragma unroll 8
      for (int h = 0; h < a.hpg; ++h) acc += exp2f(__ldg(s + h * (long long)a.nc + i) - lse2s[h]);
    }
    pc[e] = acc;
  }
  __syncthreads();
  for (int jj = tid; jj < 64; jj += NSA_THREADS) {
    const int j = j0 + jj;
    if (j >= a.nb) break;
    float acc = 0.f;
    if (j <= cur) {
      for (int k = 0; k < tp.count; ++k) acc += (float)tp.w[k] * pc[jj * tp.step + k];
    }
    block_scores[bg * a.nb + j] = acc;
  }
  if (!last_to_finish(tickets + bg, gridDim.x)) return;
  float* sc = pc;  // reused: the block scores of blocks 0 .. cur
  for (int j = tid; j <= cur; j += NSA_THREADS) sc[j] = __ldcg(block_scores + bg * a.nb + j);
  __syncthreads();
  select_top_n_cta(sc, (long long)cur * a.L + (t % a.L), a.L, a.n, a.n_local, cur + 1,
                   ids + bg * a.n, cand_s, cand_j, NSA_THREADS / 32);
}

template <typename T, int DK>
__device__ void dec_attend(const T* __restrict__ q, const T* __restrict__ raw_k,
                           const T* __restrict__ raw_v, const T* __restrict__ win_k,
                           const T* __restrict__ win_v, const long long* __restrict__ positions,
                           const long long* __restrict__ ids, float* __restrict__ part_ml,
                           float* __restrict__ part_o, const DecodeArgs a) {
  const int x = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const long long bg = (long long)b * a.Hkv + g;
  const long long t = positions[b];
  const int dk = DK > 0 ? DK : a.dk;
  const DecTiles<T> d = carve_tiles<T>(a);
  const int C = dec_chunks(a), nslc = a.n * a.tpb;
  // Key u of this tile: its position p (or -1) and which buffer holds it.
  long long first = -1;  // position of key 0
  int keys = 0;          // keys in this tile
  bool ring = false;
  if (x < nslc) {
    const long long j = ids[bg * a.n + x / a.tpb];
    const long long p0 = j * a.L + (long long)(x % a.tpb) * NSA_DEC_KEYS;
    if (j >= 0 && p0 <= t) {
      first = p0;
      keys = (int)min((long long)min(NSA_DEC_KEYS, a.L - (x % a.tpb) * NSA_DEC_KEYS), t - p0 + 1);
    }
  } else {
    const long long cnt = min((long long)a.w, t + 1);
    const long long p0 = t + 1 - cnt + (long long)(x - nslc) * NSA_DEC_KEYS;
    if (p0 <= t) {
      first = p0;
      keys = (int)min((long long)NSA_DEC_KEYS, t - p0 + 1);
      ring = a.cap_win > 0;
    }
  }
  const T* kb = ring ? win_k : raw_k;
  const T* vb = ring ? win_v : raw_v;
  const long long cap = ring ? a.cap_win : a.cap_raw;
  const auto row = [&](const T* base, int width) {
    return [=](int u) -> const T* {
      if (u >= keys) return nullptr;
      const long long p = first + u;
      return base + (bg * cap + (ring ? p % a.w : p)) * width;
    };
  };
  tile_partial<T, DK>(a, d, q + bg * a.hpg * dk, row(kb, dk), row(vb, a.dv),
                      [](int, int, float) {},
                      part_ml + (bg * C + a.chunks_cmp + x) * a.hpg * 2,
                      part_o + (bg * C + a.chunks_cmp + x) * a.hpg * a.dv);
}

// Shared: weights [C] (exp2(m_x - max) / sum of the tile's branch, times the branch's gate),
// padded to a multiple of 4, then the partial sums [parts][dv].
template <typename T>
__device__ void dec_combine(const float* __restrict__ part_ml, const float* __restrict__ part_o,
                            const T* __restrict__ gates, T* __restrict__ out,
                            const DecodeArgs a) {
  extern __shared__ __align__(16) unsigned char smraw[];
  const int h = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const long long bg = (long long)b * a.Hkv + g;
  const int C = dec_chunks(a), dv = a.dv;
  float* wts = reinterpret_cast<float*>(smraw);
  float* red = wts + (C + 3) / 4 * 4;  // 16-byte aligned for the float4 stores
  const long long row = (long long)b * a.Hkv * a.hpg + g * a.hpg + h;
  const float* ml = part_ml + (bg * C * a.hpg + h) * 2;  // tile x at ml[x * 2 * hpg]
  if (warp < 3) {
    const int lo = warp == 0 ? 0 : warp == 1 ? a.chunks_cmp : a.chunks_cmp + a.n * a.tpb;
    const int hi = warp == 0 ? a.chunks_cmp : warp == 1 ? a.chunks_cmp + a.n * a.tpb : C;
    const float2 st = merge_ml(ml + lo * 2LL * a.hpg, hi - lo, 2LL * a.hpg, lane);
    const float scale = st.y > 0.f ? to_f(gates[row * 3 + warp]) / st.y : 0.f;
    for (int x = lo + lane; x < hi; x += 32) {
      wts[x] = scale > 0.f || scale < 0.f ? scale * exp2f(__ldcg(ml + x * 2LL * a.hpg) - st.x) : 0.f;
    }
  }
  __syncthreads();
  // Thread (part, column group of 4): tiles part, part + parts, ...; then the parts in order.
  const int groups = dv / 4, parts = max(1, NSA_THREADS / groups);
  const int cg = tid % groups, part = tid / groups;
  if (part < parts && tid < parts * groups) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int x = part; x < C; x += parts) {
      const float wx = wts[x];
      if (wx == 0.f) continue;
      const float4 o = __ldcg(reinterpret_cast<const float4*>(part_o + ((bg * C + x) * a.hpg + h) * dv) + cg);
      acc.x = fmaf(wx, o.x, acc.x);
      acc.y = fmaf(wx, o.y, acc.y);
      acc.z = fmaf(wx, o.z, acc.z);
      acc.w = fmaf(wx, o.w, acc.w);
    }
    *reinterpret_cast<float4*>(red + part * dv + cg * 4) = acc;
  }
  __syncthreads();
  for (int col = tid; col < dv; col += NSA_THREADS) {
    float acc = 0.f;
    for (int p = 0; p < parts; ++p) acc += red[p * dv + col];
    out[row * dv + col] = from_f<T>(acc);
  }
  (void)lane;
}

}  // namespace nsa

#define NSA_DEC_TILES(SUFFIX, T, DK)                                                            \
  extern "C" __global__ void __launch_bounds__(NSA_THREADS) nsa_dec_cmp_##SUFFIX(               \
      const T* q, const T* ck, const T* cv, const long long* positions, float* part_ml,         \
      float* part_o, float* scores, float* lse2, int* tickets, nsa::DecodeArgs a) {             \
    nsa::dec_cmp<T, DK>(q, ck, cv, positions, part_ml, part_o, scores, lse2, tickets, a);      \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(NSA_THREADS) nsa_dec_attend_##SUFFIX(            \
      const T* q, const T* raw_k, const T* raw_v, const T* win_k, const T* win_v,               \
      const long long* positions, const long long* ids, float* part_ml, float* part_o,          \
      nsa::DecodeArgs a) {                                                                      \
    nsa::dec_attend<T, DK>(q, raw_k, raw_v, win_k, win_v, positions, ids, part_ml, part_o, a); \
  }
NSA_DEC_TILES(bf16_dk64, __nv_bfloat16, 64)
NSA_DEC_TILES(bf16_dk128, __nv_bfloat16, 128)
NSA_DEC_TILES(bf16_dk192, __nv_bfloat16, 192)
NSA_DEC_TILES(f32, float, 0)

extern "C" __global__ void __launch_bounds__(NSA_THREADS)
    nsa_dec_scores(const long long* positions, const float* scores, const float* lse2,
                   float* block_scores, int* tickets, long long* ids, nsa::DecodeArgs a) {
  nsa::dec_scores(positions, scores, lse2, block_scores, tickets, ids, a);
}

#define NSA_DEC_COMBINE(SUFFIX, T)                                                              \
  extern "C" __global__ void __launch_bounds__(NSA_THREADS) nsa_dec_combine_##SUFFIX(           \
      const float* part_ml, const float* part_o, const T* gates, T* out, nsa::DecodeArgs a) {   \
    nsa::dec_combine<T>(part_ml, part_o, gates, out, a);                                        \
  }
NSA_DEC_COMBINE(bf16, __nv_bfloat16)
NSA_DEC_COMBINE(f32, float)
