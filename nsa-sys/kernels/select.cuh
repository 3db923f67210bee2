// Block selection's rules shared by the training kernel (compressed.cu, cmp_select) and the
// decode kernels (decode.cu): Eq. 9's overlap taps and Eq. 11's top-n with the forced blocks.
#pragma once
#include "common.cuh"

#define NSA_MAX_TAPS 32

namespace nsa {

// Eq. 9 as taps (nsa-select's SelectConfig::overlap_taps): selection block j receives
// compressed token j * step + first + k with integer weight w[k], k < count.
struct Taps {
  int first, step, count;
  int w[NSA_MAX_TAPS];
};

// Eq. 11's forced blocks for a token whose current block is cur: block 0, then the local band
// max(1, cur - n_local + 1) .. cur, ascending, at most kmax of them. Lane s < count gets pick s
// in `mine`; lane 0 marks the picks taken in `sc` (score -1). Returns the count.
__device__ __forceinline__ int select_forced(float* sc, int cur, int n_local, int kmax,
                                             long long& mine, int lane) {
  int count = 0;
  const int band0 = max(1, cur - n_local + 1);
  for (int j = -1; j <= cur - band0 && count < kmax; ++j) {
    const int blk = j < 0 ? 0 : band0 + j;
    if (lane == count) mine = blk;
    if (lane == 0) sc[blk] = -1.f;
    ++count;
  }
  return count;
}

// The better of two (score, block) candidates: higher score, ties to the lower block.
__device__ __forceinline__ bool select_better(float v, int j, float best, int bj) {
  return v > best || (v == best && j < bj);
}

// The warp's best (score, block) over its lanes' candidates.
__device__ __forceinline__ void select_warp_best(float& best, int& bj) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, best, o);
    const int oj = __shfl_xor_sync(0xffffffffu, bj, o);
    if (select_better(ov, oj, best, bj)) {
      best = ov;
      bj = oj;
    }
  }
}

// Writes the warp's `count` picks (lane s holds pick s in `mine`) to dst[0 .. n) ascending, then
// -1 padding.
__device__ __forceinline__ void select_write(long long mine, int count, int n, long long* dst,
                                             int lane) {
  const long long key = lane < count ? mine : 0x7fffffffffffffffLL;
  int rank = 0;
  for (int o = 0; o < 32; ++o) {
    const long long other = __shfl_sync(0xffffffffu, key, o);
    rank += other < key || (other == key && o < lane);
  }
  if (lane < count) dst[rank] = mine;
  for (int s = count + lane; s < n; s += 32) dst[s] = -1;
}

// Eq. 11 for one token at position t, by one warp, as nsa-select does: the forced blocks first
// (select_forced), then the other candidates (blocks 1 .. cur = t / L) by score, highest first,
// ties to the lower index; at most min(n, nb) picks (n <= 32). `sc` holds the scores of blocks
// 0 .. cur (>= 0; consumed: picked entries are overwritten). Writes dst[0 .. n): the picks
// ascending, then -1.
__device__ __forceinline__ void select_top_n_warp(float* sc, long long t, int L, int n,
                                                  int n_local, int nb, long long* dst,
                                                  int lane) {
  const int cur = (int)(t / L);
  const int kmax = min(n, nb);
  long long mine = -1;
  int count = select_forced(sc, cur, n_local, kmax, mine, lane);
  __syncwarp();
  while (count < kmax) {
    float best = -1.f;
    int bj = 0x7fffffff;
    for (int j = 1 + lane; j <= cur; j += 32) {
      const float v = sc[j];
      if (select_better(v, j, best, bj)) {
        best = v;
        bj = j;
      }
    }
    select_warp_best(best, bj);
    if (best < 0.f) break;  // no candidate left
    if (lane == count) mine = bj;
    if (lane == 0) sc[bj] = -1.f;
    __syncwarp();
    ++count;
  }
  select_write(mine, count, n, dst, lane);
}

// select_top_n_warp by a whole CTA of `warps` warps (every thread calls it): each warp takes the
// best remaining candidates of its contiguous share of blocks 1 .. cur, then warp 0 the best of
// those (the same picks: the best k of a union are among the best k of each part). Shared:
// cand_s, cand_j [warps * 32].
__device__ __forceinline__ void select_top_n_cta(float* sc, long long t, int L, int n,
                                                 int n_local, int nb, long long* dst,
                                                 float* cand_s, int* cand_j, int warps) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int cur = (int)(t / L);
  const int kmax = min(n, nb);
  long long mine = -1;
  int count = select_forced(sc, cur, n_local, kmax, mine, lane);  // same count in every warp
  __syncthreads();  // warp 0's marks seen by all
  const int rem = kmax - count;
  const int per = (cur + warps - 1) / warps;
  const int lo = 1 + warp * per, hi = min(cur, lo + per - 1);
  cand_s[warp * 32 + lane] = -1.f;
  cand_j[warp * 32 + lane] = 0x7fffffff;
  for (int r = 0; r < rem; ++r) {
    float best = -1.f;
    int bj = 0x7fffffff;
    for (int j = lo + lane; j <= hi; j += 32) {
      const float v = sc[j];
      if (select_better(v, j, best, bj)) {
        best = v;
        bj = j;
      }
    }
    select_warp_best(best, bj);
    if (best < 0.f) break;
    if (lane == r) {
      cand_s[warp * 32 + r] = best;
      cand_j[warp * 32 + r] = bj;
    }
    if (lane == 0) sc[bj] = -1.f;
    __syncwarp();
  }
  __syncthreads();
  if (warp != 0) return;
  for (int r = 0; r < rem; ++r) {
    float best = -1.f;
    int bj = 0x7fffffff, slot = -1;
    for (int e = lane; e < warps * 32; e += 32) {
      if (select_better(cand_s[e], cand_j[e], best, bj)) {
        best = cand_s[e];
        bj = cand_j[e];
        slot = e;
      }
    }
    const int mj = bj;
    select_warp_best(best, bj);
    if (best < 0.f) break;
    if (bj == mj && slot >= 0) cand_s[slot] = -2.f;  // the owner retires it
    if (lane == count) mine = bj;
    __syncwarp();
    ++count;
  }
  select_write(mine, count, n, dst, lane);
}

}  // namespace nsa
