// Tensor-core building blocks of the selected-branch kernels (bf16 in, fp32 accumulate), and the
// "union tile" that lets one CTA serve several query tokens from one stream of K/V tiles.
//
// Fragments (PTX ISA, mma.m16n8k16 with .row.col): in a warp, lane = 4 * gq + tig.
//   A (16 x 16, row-major): a0 = A[gq][2tig, 2tig+1], a1 = A[gq+8][2tig..], a2 = A[gq][8+2tig..],
//     a3 = A[gq+8][8+2tig..] (each a pair of bf16 in one 32-bit register);
//   B (16 x 8, "col"): b0 = B[2tig, 2tig+1][gq], b1 = B[8+2tig, 8+2tig+1][gq];
//   C/D (16 x 8, fp32): c0, c1 = C[gq][2tig, 2tig+1], c2, c3 = C[gq+8][2tig, 2tig+1].
// So two neighbouring C tiles (n = 0..7 and 8..15) of one row block are, packed to bf16, the A
// fragment of the next product over k = those 16 columns (flash-attention-2's register reuse).
// A B operand whose k index runs along the rows of a row-major shared tile (P V: k = key, the
// tile is V [key][d]) is loaded with ldmatrix .trans; one whose k runs along the columns
// (Q K^T: k = d, the tile is K [key][d]) with plain ldmatrix (load_b_x2, two n tiles per
// instruction; load_b reads the same words as two 32-bit loads), A fragments likewise
// (load_a_x4; load_a). Tiles with a row stride of 16 bytes mod 128 keep ldmatrix free of bank
// conflicts.
#pragma once
#include "common.cuh"

namespace nsa {

__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
  __nv_bfloat162 x = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&x);
}

// 2^x by the SFU alone (ex2.approx.ftz: relative error ~2^-22, results below 2^-126 flushed to
// 0, 2^-inf = 0). exp2f without fast math adds a range test and a rescale around the same
// instruction; the bf16 tensor-core kernels round p to bf16 anyway.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// d += a * b for one m16n8k16 tile (A row-major 16x16, B "col" 16x8, fp32 accumulators).
__device__ __forceinline__ void mma_bf16(float* d, unsigned a0, unsigned a1, unsigned a2,
                                         unsigned a3, unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// A fragment of rows r0 = 16-row block + gq and r1 = r0 + 8, columns c .. c + 15 of a row-major
// bf16 shared tile with row stride `stride` elements.
__device__ __forceinline__ void load_a(unsigned (&a)[4], const __nv_bfloat16* tile, int stride,
                                       int r0, int c, int tig) {
  const unsigned* x = reinterpret_cast<const unsigned*>(tile + r0 * stride + c + tig * 2);
  const unsigned* y = reinterpret_cast<const unsigned*>(tile + (r0 + 8) * stride + c + tig * 2);
  a[0] = x[0];
  a[1] = y[0];
  a[2] = x[4];
  a[3] = y[4];
}

// B fragment with n = tile row n0 + gq and k = columns c .. c + 15 (B[k][n] = tile[n][k]).
__device__ __forceinline__ void load_b(unsigned& b0, unsigned& b1, const __nv_bfloat16* tile,
                                       int stride, int n_row, int c, int tig) {
  const unsigned* x = reinterpret_cast<const unsigned*>(tile + n_row * stride + c + tig * 2);
  b0 = x[0];
  b1 = x[4];
}

// Four 8x8 bf16 matrices from shared memory (ldmatrix .x4, not transposed): lane l gives the
// address p of row l % 8 of matrix l / 8 and receives r[i] = row l / 4, columns 2 (l % 4) and
// 2 (l % 4) + 1 of matrix i.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const __nv_bfloat16* p) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// The A fragment of load_a by one ldmatrix .x4 (instead of four 32-bit loads): rows
// r .. r + 15 (r = the warp's 16-row block, not r0), columns c .. c + 15. Lanes 8m .. 8m + 7
// address the rows of 8x8 matrix m = a[m]: m & 1 the row half, m >> 1 the column half.
__device__ __forceinline__ void load_a_x4(unsigned (&a)[4], const __nv_bfloat16* tile,
                                          int stride, int r, int c, int lane) {
  const int m = lane >> 3, rr = lane & 7;
  ldmatrix_x4(a, tile + (r + (m & 1) * 8 + rr) * stride + c + (m >> 1) * 8);
}

// load_b's fragments of two n tiles, rows n0 .. n0 + 7 (b[0], b[1]) and n0 + 8 .. n0 + 15
// (b[2], b[3]), k = columns c .. c + 15, by one ldmatrix .x4: matrix m covers rows
// n0 + (m >> 1) * 8, columns c + (m & 1) * 8.
__device__ __forceinline__ void load_b_x2(unsigned (&b)[4], const __nv_bfloat16* tile,
                                          int stride, int n0, int c, int lane) {
  const int m = lane >> 3, rr = lane & 7;
  ldmatrix_x4(b, tile + (n0 + (m >> 1) * 8 + rr) * stride + c + (m & 1) * 8);
}

// Two B fragments (n tiles n0 .. n0 + 7 and n0 + 8 .. n0 + 15) with k = tile rows k0 .. k0 + 15
// and n = tile columns (B[k][n] = tile[k0 + k][n0 + n]), by ldmatrix .x4 .trans: lanes 8m .. 8m+7
// address the rows of 8x8 matrix m (m & 1: k half, m >> 1: n half).
__device__ __forceinline__ void load_b_trans_x2(unsigned (&b)[4], const __nv_bfloat16* tile,
                                                int stride, int k0, int n0, int lane) {
  const int m = lane >> 3, r = lane & 7;
  const __nv_bfloat16* p = tile + (k0 + (m & 1) * 8 + r) * stride + n0 + (m >> 1) * 8;
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
               : "r"(addr));
}

// acc += A · T for a warp's 16 x 16 A fragment (a0..a3, mma.cuh's A layout) and T = tile rows
// k0 .. k0 + 15, columns 0 .. W - 1 (stride `stride`), loaded by ldmatrix .trans: the inner
// product every P V, dS K, dV += P^T dO and dK += dS^T Q of the kernels runs per 16 keys.
template <int W>
__device__ __forceinline__ void mma_a_rows(float (&acc)[W / 8][4], unsigned a0, unsigned a1,
                                           unsigned a2, unsigned a3,
                                           const __nv_bfloat16* tile, int stride, int k0,
                                           int lane) {
#pragma unroll
  for (int n = 0; n < W / 16; ++n) {
    unsigned b[4];
    load_b_trans_x2(b, tile, stride, k0, n * 16, lane);
    mma_bf16(acc[2 * n], a0, a1, a2, a3, b[0], b[1]);
    mma_bf16(acc[2 * n + 1], a0, a1, a2, a3, b[2], b[3]);
  }
}

// FlashAttention-2's online-softmax step for a warp's 16 x 16 score sub-tile sc (C layout:
// elements e < 2 of row gq, the others of row gq + 8; log2 units, masked keys at -inf), given
// the rows' new maxima n0, n1 and the old state's rescale factors al0, al1: sc becomes
// p = exp2(s - n) (`exp2_`: the exp2 the caller's precision wants), l = l * al + this thread's
// row sums (summed over the quad by the caller at the end), O *= al, then O += P V with P
// rounded to bf16 as the A operand and V = rows 0 .. 15 of `vs` (row stride `stride`). The
// token-warp forward and the decode tiles run the same step; every lane of the warp calls it.
template <int DV, bool SKIP_ONES = false, typename Exp2>
__device__ __forceinline__ void softmax_pv16(float (&sc)[2][4], float n0, float n1, float al0,
                                             float al1, float& l0, float& l1,
                                             float (&oacc)[DV / 8][4],
                                             const __nv_bfloat16* vs, int stride, int lane,
                                             Exp2 exp2_) {
  float ps0 = 0.f, ps1 = 0.f;
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float p = exp2_(sc[nt][e] - (e < 2 ? n0 : n1));  // 0 for masked keys
      sc[nt][e] = p;
      if (e < 2) {
        ps0 += p;
      } else {
        ps1 += p;
      }
    }
  }
  l0 = l0 * al0 + ps0;
  l1 = l1 * al1 + ps1;
  // Most steps leave every row's max where it was (al = 1): with SKIP_ONES, the warp skips the
  // DV / 2 multiplies by one, which would change nothing (the decode tiles; in the token-warp
  // forward the branch costs registers, spills at dk = dv = 192).
  if (!SKIP_ONES || __any_sync(0xffffffffu, al0 != 1.f || al1 != 1.f)) {
#pragma unroll
    for (int j = 0; j < DV / 8; ++j) {
      oacc[j][0] *= al0;
      oacc[j][1] *= al0;
      oacc[j][2] *= al1;
      oacc[j][3] *= al1;
    }
  }
  const unsigned a0 = pack_bf16(sc[0][0], sc[0][1]), a1 = pack_bf16(sc[0][2], sc[0][3]);
  const unsigned a2 = pack_bf16(sc[1][0], sc[1][1]), a3 = pack_bf16(sc[1][2], sc[1][3]);
  mma_a_rows<DV>(oacc, a0, a1, a2, a3, vs, stride, 0, lane);
}

// acc += C · T for a warp's 16 x 64 C-fragment tile c (scores or dS, mma.cuh's C layout)
// rounded to bf16 and fed straight back as the A operand (FlashAttention-2's register reuse),
// and T = tile rows 0 .. 63, columns 0 .. W - 1 (stride `stride`), loaded by ldmatrix .trans:
// O += P V in the forwards, dQ += dS K in dQ.
template <int W>
__device__ __forceinline__ void mma_c_tile(float (&acc)[W / 8][4], const float (&c)[8][4],
                                           const __nv_bfloat16* tile, int stride, int lane) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const unsigned a0 = pack_bf16(c[2 * kk][0], c[2 * kk][1]);
    const unsigned a1 = pack_bf16(c[2 * kk][2], c[2 * kk][3]);
    const unsigned a2 = pack_bf16(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    const unsigned a3 = pack_bf16(c[2 * kk + 1][2], c[2 * kk + 1][3]);
    mma_a_rows<W>(acc, a0, a1, a2, a3, tile, stride, kk * 16, lane);
  }
}

// Starts copying `rows` rows of `WIDTH` bf16 (a multiple of 8) from global memory (row pointers
// given by `src_row(r)`, nullptr = zeros) into a shared tile with row stride `stride`, 16 bytes
// a thread, with cp.async: every load of the tile is in flight at once and nothing passes
// through registers. The copy is complete after cp_async_wait_all() by the issuing threads and
// a barrier.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}

__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// sm_90's bulk copies (the TMA unit, no tensor map): one instruction copies `bytes` (a multiple
// of 16, both addresses 16-byte aligned) from global to shared memory and reports them to an
// mbarrier's transaction count, so a warp waits on one barrier instead of its lanes' cp.async
// groups. A barrier's phase completes when its one arrival (with the expected bytes) and every
// byte have come; waits name the phase's parity.
#if __CUDA_ARCH__ >= 900
__device__ __forceinline__ unsigned shared_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_addr(bar)), "r"(arrivals)
               : "memory");
}

// Makes the barriers' initialisation visible to the async proxy (the bulk copies).
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

__device__ __forceinline__ void mbar_arrive_expect(unsigned long long* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(shared_addr(bar)),
               "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
  unsigned done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(shared_addr(bar)), "r"(parity)
        : "memory");
  } while (done == 0);
}

__device__ __forceinline__ void bulk_copy_to_shared(void* dst, const void* src, unsigned bytes,
                                                    unsigned long long* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
          shared_addr(dst)),
      "l"(src), "r"(bytes), "r"(shared_addr(bar))
      : "memory");
}

// Orders this thread's earlier generic-proxy accesses of shared memory before its later
// async-proxy ones: a zero-filled row or the fragments read from a stage before a bulk copy
// into it; the cp.async writes of a tile (after their wait) before wgmma reads it.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
#endif

// Rows 0 .. rows - 1 of WIDTH bf16 from src_row(r) (nullptr: zeros) into tile (row stride
// `stride`), in 16-byte cp.async chunks. CP threads share a row, thread sub taking chunks sub,
// sub + CP, ...: src_row (a gather's index arithmetic) runs once per (thread, row) instead of
// once per chunk, and the CP threads of a row read 16 * CP adjacent bytes per instruction.
// `threads` must be a multiple of CP.
template <int WIDTH, typename RowFn>
__device__ __forceinline__ void copy_rows(__nv_bfloat16* tile, int stride, int rows,
                                          RowFn src_row, int tid, int threads) {
  constexpr int CH = WIDTH / 8;  // 16-byte chunks per row
  constexpr int CP = CH % 4 == 0 ? 4 : CH % 2 == 0 ? 2 : 1;
  const int sub = tid % CP;
  for (int r = tid / CP; r < rows; r += threads / CP) {
    const __nv_bfloat16* src = src_row(r);
    __nv_bfloat16* dst = tile + r * stride;
#pragma unroll
    for (int k = 0; k < CH / CP; ++k) {
      const int ch = sub + k * CP;
      if (src != nullptr) {
        cp_async16(dst + ch * 8, src + ch * 8);
      } else {
        *reinterpret_cast<uint4*>(dst + ch * 8) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  }
}

// Rows 0 .. ROWS - 1 of a strided source (row r at src + r * src_stride; rows r >= valid are
// zeros) into tile (row stride `stride`), WIDTH bf16 a row, by THREADS threads in 16-byte
// cp.async chunks as copy_rows splits them. For contiguous row ranges (the compressed keys of a
// key group): a thread's row and chunk offsets are fixed, so the address arithmetic is one
// multiply-add per row instead of copy_rows' per-row gather.
template <int WIDTH, int ROWS, int THREADS>
__device__ __forceinline__ void copy_rows_strided(__nv_bfloat16* tile, int stride,
                                                  const __nv_bfloat16* src, long long src_stride,
                                                  int valid, int tid) {
  constexpr int CH = WIDTH / 8;  // 16-byte chunks per row
  constexpr int CP = CH % 4 == 0 ? 4 : CH % 2 == 0 ? 2 : 1;
  constexpr int RP = THREADS / CP;  // rows per pass
  static_assert(THREADS % CP == 0 && ROWS % RP == 0, "whole passes");
  const int sub = tid % CP, r0 = tid / CP;
#pragma unroll
  for (int pass = 0; pass < ROWS / RP; ++pass) {
    const int r = r0 + pass * RP;
    const __nv_bfloat16* s = src + r * src_stride + sub * 8;
    __nv_bfloat16* d = tile + r * stride + sub * 8;
#pragma unroll
    for (int k = 0; k < CH / CP; ++k) {
      if (r < valid) {
        cp_async16(d + k * CP * 8, s + k * CP * 8);
      } else {
        *reinterpret_cast<uint4*>(d + k * CP * 8) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  }
}

// ---- union tile ------------------------------------------------------------------------------
//
// A CTA of the query-outer kernels serves BQ consecutive tokens t0 .. t0 + BQ - 1 of one group.
// It reads the union of their selected blocks (ascending, distinct) as a flat stream of key
// "columns" f = u * L + i (key uni[u] * L + i), in tiles of 64 columns; per tile, bit c of
// kmask[token][c / 32] says whether the token reads column c (it selected block uni[u] and the
// key is <= t and < S). Shared memory (ints), P = next power of two >= max(32, BQ * n):
//   ids [BQ][n], cand [P], uni [P], membership bits [BQ][P / 32], kmask [BQ][2], colpos [64],
//   colu [64], count [1].
// The per-tile column state (kmask, colpos, colu) exists twice, so a pipelined loop can fill
// tile i + 1's while tile i's is in use; with_buf(i) views set i through the same fields.
struct UnionTile {
  int* ids;
  int* cand;
  int* uni;
  unsigned* mbits;
  unsigned* kmask;
  int* colpos;
  int* colu;
  int* count;
  int words;  // P / 32
  int bq;

  __device__ __forceinline__ UnionTile with_buf(int i) const {
    UnionTile v = *this;
    const int stride = bq * 2 + 64 + 64;  // ints per column set
    v.kmask = kmask + i * stride;
    v.colpos = colpos + i * stride;
    v.colu = colu + i * stride;
    return v;
  }
};

// Ints of shared memory a UnionTile takes (the glue's smem formulas use the same count).
__device__ __forceinline__ int union_ints(int bq, int n, int P) {
  return bq * n + 2 * P + bq * (P / 32) + 2 * (bq * 2 + 64 + 64) + 1;
}

__device__ __forceinline__ UnionTile carve_union(int* base, int bq, int n, int P) {
  UnionTile u;
  u.bq = bq;
  u.ids = base;
  u.cand = u.ids + bq * n;
  u.uni = u.cand + P;
  u.words = P / 32;
  u.mbits = reinterpret_cast<unsigned*>(u.uni + P);
  // Column sets: [kmask bq * 2][colpos 64][colu 64], twice.
  u.kmask = u.mbits + bq * u.words;
  u.colpos = reinterpret_cast<int*>(u.kmask + bq * 2);
  u.colu = u.colpos + 64;
  u.count = u.colu + 64 + (bq * 2 + 64 + 64);
  return u;
}

// Builds the union of the tile's tokens' valid ids and the membership bits; returns its size U.
// Every thread of the CTA calls it (it synchronises).
__device__ int build_union(const UnionTile& u, const int* __restrict__ ids, int b, int S, int Hkv,
                           int g, int t0, int bq, int n, int L, int P, int tid, int threads) {
  const int warp = tid / 32, lane = tid % 32;
  for (int e = tid; e < P; e += threads) {
    int j = -1;
    if (e < bq * n) {
      const int i = e / n, slot = e % n, t = t0 + i;
      if (t < S) {
        j = ids[(((long long)b * S + t) * Hkv + g) * n + slot];
        if (!id_ok(j, t, L)) j = -1;
      }
      u.ids[e] = j;
    }
    u.cand[e] = j < 0 ? 0x7fffffff : j;
  }
  __syncthreads();
  // Bitonic sort of the candidates (P is a power of two).
  for (int kk = 2; kk <= P; kk <<= 1) {
    for (int jj = kk >> 1; jj > 0; jj >>= 1) {
      for (int i = tid; i < P; i += threads) {
        const int ixj = i ^ jj;
        if (ixj > i) {
          const int a = u.cand[i], c = u.cand[ixj];
          const bool up = (i & kk) == 0;
          if ((a > c) == up) {
            u.cand[i] = c;
            u.cand[ixj] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  // Distinct ids in ascending order -> uni[0 .. U).
  if (warp == 0) {
    int base = 0;
    for (int c0 = 0; c0 < P; c0 += 32) {
      const int i = c0 + lane;
      const int x = u.cand[i];
      const bool keep = x != 0x7fffffff && (i == 0 || u.cand[i - 1] != x);
      const unsigned m = __ballot_sync(0xffffffffu, keep);
      if (keep) u.uni[base + __popc(m & ((1u << lane) - 1u))] = x;
      base += __popc(m);
    }
    if (lane == 0) *u.count = base;
  }
  for (int e = tid; e < bq * u.words; e += threads) u.mbits[e] = 0u;
  __syncthreads();
  const int U = *u.count;
  // Membership: token i selected union entry lo.
  for (int e = tid; e < bq * n; e += threads) {
    const int j = u.ids[e];
    if (j < 0) continue;
    int lo = 0, hi = U - 1;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (u.uni[mid] < j) lo = mid + 1; else hi = mid;
    }
    atomicOr(&u.mbits[(e / n) * u.words + lo / 32], 1u << (lo % 32));
  }
  __syncthreads();
  return U;
}

// Key position (or -1 past the stream / the sequence) and union slot of the tile's 64 columns
// starting at column f0 of F = U * L. The caller synchronises before reading them.
__device__ __forceinline__ void union_columns(const UnionTile& u, long long f0, long long F,
                                              int L, int S, int tid, int threads) {
  // A stream has at most P * L columns and positions are below S, so 32-bit arithmetic
  // suffices (a 64-bit division is a called subroutine per column and tile).
  for (int c = tid; c < 64; c += threads) {
    const int f = (int)f0 + c;
    int p = -1, slot = 0;
    if (f < (int)F) {
      slot = f / L;
      const int pos = u.uni[slot] * L + (f - slot * L);
      if (pos < S) p = pos;
    }
    u.colpos[c] = p;
    u.colu[c] = slot;
  }
}

// kmask for the tile's tokens (after union_columns and a barrier); the caller synchronises.
__device__ __forceinline__ void union_mask(const UnionTile& u, int t0, int bq, int S, int tid,
                                           int threads) {
  const int warp = tid / 32, lane = tid % 32;
  for (int i = warp; i < bq; i += threads / 32) {
    const int t = t0 + i;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int c = half * 32 + lane, p = u.colpos[c], s = u.colu[c];
      const bool vis =
          t < S && p >= 0 && p <= t && ((u.mbits[i * u.words + s / 32] >> (s % 32)) & 1u);
      const unsigned bits = __ballot_sync(0xffffffffu, vis);
      if (lane == 0) u.kmask[i * 2 + half] = bits;
    }
  }
}

// Whether a row (kmask words mk) reads the tile column of C-fragment element (nt, j): column
// nt * 8 + 2 * tig + j. With nt unrolled the word is chosen at compile time, so mk stays in
// registers (an index c / 32 computed at run time put it in local memory).
__device__ __forceinline__ bool frag_visible(const unsigned (&mk)[2], int nt, int tig, int j) {
  const unsigned w = nt < 4 ? mk[0] : mk[1];
  return (w >> ((nt & 3) * 8 + tig * 2 + j)) & 1u;
}

}  // namespace nsa
