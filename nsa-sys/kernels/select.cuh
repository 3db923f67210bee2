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

// Eq. 11 as nsa-select takes it, for one token whose current block is cur and kmax picks at
// most: the forced blocks first, block 0 and then the local band max(1, cur - n_local + 1) ..
// cur ascending, as many as fit (band0 .. band0 + nband - 1); then the rem = kmax - 1 - nband
// best of the other blocks 1 .. cur (the candidates) by score, ties to the lower index, a
// candidate needing a score >= 0 (NaN never is one).
struct ForcedBlocks {
  int cur, band0, nband, rem;
  __device__ __forceinline__ ForcedBlocks(int cur_, int n_local, int kmax) : cur(cur_) {
    band0 = max(1, cur - n_local + 1);
    nband = max(0, min(cur - band0 + 1, kmax - 1));
    rem = kmax - 1 - nband;
  }
  // A candidate block: 1 .. cur and not forced.
  __device__ __forceinline__ bool candidate(int j) const {
    return j >= 1 && j <= cur && !(j >= band0 && j < band0 + nband);
  }
};

// Eq. 11's top rem by a warp while the scores arrive in ascending block order (the training
// kernel finalises block scores tile by tile, so no [Nb] array is kept): lanes 0 .. len - 1
// hold the best candidates so far, sorted by score descending, ties by block ascending
// (s, j). `offer` takes one batch of candidates, lane l offering (v, block j0 + l) where
// v >= 0 (anything else, NaN included, is no candidate): a candidate enters while the list is
// short, else only if it beats the last entry strictly (every block in the list has a lower
// index, so it wins a tie). The list ends as the top rem by (score desc, block asc).
struct TopListWarp {
  float s;   // this lane's entry: score
  int j;     // and block
  int len;   // entries held (uniform)
  int rem;   // capacity, <= 31 (uniform)
  // Returns whether the list changed (uniform).
  __device__ __forceinline__ bool offer(float v, int j0, int lane) {
    if (rem <= 0) return false;
    const float last0 = __shfl_sync(0xffffffffu, s, max(rem - 1, 0));
    unsigned m = __ballot_sync(0xffffffffu, v >= 0.f && (len < rem || v > last0));
    const bool changed = m != 0u;
    while (m != 0u) {
      const int src = __ffs(m) - 1;
      m &= m - 1;
      const float vs = __shfl_sync(0xffffffffu, v, src);
      if (len == rem && !(vs > __shfl_sync(0xffffffffu, s, rem - 1))) continue;
      const int pos = __popc(__ballot_sync(0xffffffffu, lane < len && s >= vs));
      const float us = __shfl_up_sync(0xffffffffu, s, 1);
      const int uj = __shfl_up_sync(0xffffffffu, j, 1);
      if (lane > pos) {
        s = us;
        j = uj;
      }
      if (lane == pos) {
        s = vs;
        j = j0 + src;
      }
      len = min(len + 1, rem);
    }
    return changed;
  }
  // Writes the forced blocks and the list to dst[0 .. n) ascending, then -1 (select_write).
  __device__ __forceinline__ void write(const ForcedBlocks& fb, int n, long long* dst,
                                        int lane) const {
    const int fc = 1 + fb.nband;
    const int from = __shfl_sync(0xffffffffu, j, max(0, min(lane - fc, 31)));
    const long long mine = lane == 0 ? 0 : lane < fc ? fb.band0 + lane - 1 : from;
    select_write(mine, fc + len, n, dst, lane);
  }
};

// Bitonic steps over one u64 key per lane, the largest first. warp_sort_desc sorts the warp's
// 32 keys; warp_merge_desc returns the 32 largest of two such sorted lists (the first held, the
// second read lane for lane): the elementwise max of one list and the other reversed is a
// bitonic sequence holding the union's 32 largest, which five steps sort.
__device__ __forceinline__ unsigned long long warp_bitonic_step(unsigned long long k, int stride,
                                                                bool keep_max) {
  const unsigned long long o = __shfl_xor_sync(0xffffffffu, k, stride);
  return keep_max == (o > k) ? o : k;
}

__device__ __forceinline__ unsigned long long warp_sort_desc(unsigned long long k, int lane) {
#pragma unroll
  for (int size = 2; size <= 32; size <<= 1) {
#pragma unroll
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      // Runs of `size` alternate direction (descending where lane & size is 0, so the last,
      // of 32, descends); the lower lane of a pair keeps the larger key in a descending run.
      k = warp_bitonic_step(k, stride, ((lane & stride) == 0) == ((lane & size) == 0));
    }
  }
  return k;
}

__device__ __forceinline__ unsigned long long warp_merge_desc(unsigned long long a,
                                                              unsigned long long b, int lane) {
  const unsigned long long rb = __shfl_sync(0xffffffffu, b, 31 - lane);
  unsigned long long k = a > rb ? a : rb;
#pragma unroll
  for (int stride = 16; stride > 0; stride >>= 1) k = warp_bitonic_step(k, stride, (lane & stride) == 0);
  return k;
}

// Eq. 11's order as one u64 key per block: a candidate's score bits (a score >= 0 compares as
// its bits; +0 and -0 both as 0) above its block's complement, so that the larger key is the
// better pick with ties to the lower block and every key is distinct; anything else (a forced
// block, NaN, a negative score, no block) is key 0, below every candidate.
__device__ __forceinline__ unsigned long long top_key(float v, int j, bool candidate) {
  if (!candidate || !(v >= 0.f)) return 0ull;
  const unsigned bits = v > 0.f ? __float_as_uint(v) : 0u;
  return (unsigned long long)bits << 32 | (unsigned long long)(~(unsigned)j);
}

// Unsigned long longs of shared work cta_merge_lists needs: a list of 32 keys per warp.
#define NSA_SELECT_WORK(warps) (32 * (warps))

// Merges the lists of the CTA's first `active` warps (each the warp's 32 largest keys, sorted
// descending; the other warps' lists are ignored) pairwise through `work` [warps][32]: warp 0
// returns their 32 largest. Every thread calls it with the same `active` (1 ..= warps); it
// synchronises (ceil(log2(active)) barriers, then once more so that work may be reused).
__device__ __forceinline__ unsigned long long cta_merge_lists(unsigned long long list,
                                                              unsigned long long* work,
                                                              int active) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  work[warp * 32 + lane] = list;
  for (int span = 1; span < active; span <<= 1) {
    __syncthreads();
    if (warp % (2 * span) == 0 && warp + span < active) {
      list = warp_merge_desc(list, work[(warp + span) * 32 + lane], lane);
      work[warp * 32 + lane] = list;
    }
  }
  __syncthreads();
  return list;
}

// The 32 largest keys of blocks lo .. hi - 1 (their scores at sc[j - lo]) for the token of `fb`:
// each warp sorts chunks of 32 blocks by bitonic steps and keeps the 32 best keys it has seen,
// then cta_merge_lists over the warps that had a chunk (a slice of 32 blocks needs no merge);
// warp 0 returns the CTA's list. Every thread calls it; it synchronises.
__device__ __forceinline__ unsigned long long cta_top_keys(const float* sc, int lo, int hi,
                                                           const ForcedBlocks& fb,
                                                           unsigned long long* work) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  unsigned long long list = 0ull;
  if (fb.rem > 0) {
    for (int c0 = lo + warp * 32; c0 < hi; c0 += warps * 32) {
      const int j = c0 + lane;
      const unsigned long long k =
          warp_sort_desc(j < hi ? top_key(sc[j - lo], j, fb.candidate(j)) : 0ull, lane);
      list = c0 == lo + warp * 32 ? k : warp_merge_desc(list, k, lane);
    }
  }
  return cta_merge_lists(list, work, max(1, min(warps, (hi - lo + 31) / 32)));
}

// Eq. 11's picks by one warp from the token's list (its 32 largest keys): the forced blocks
// (block 0, then the band), then the first rem keys that are candidates; written to dst[0 .. n)
// ascending, then -1 (select_write). n <= 32.
__device__ __forceinline__ void write_top_picks(unsigned long long list, const ForcedBlocks& fb,
                                                int n, long long* dst, int lane) {
  const bool pick = lane < fb.rem && list != 0ull;
  const int count = __popc(__ballot_sync(0xffffffffu, pick));
  const int fc = 1 + fb.nband;
  const unsigned long long from = __shfl_sync(0xffffffffu, list, max(0, min(lane - fc, 31)));
  const long long picked = (long long)(~(unsigned)(from & 0xffffffffull));
  const long long mine = lane == 0 ? 0 : lane < fc ? fb.band0 + lane - 1 : picked;
  select_write(mine, fc + count, n, dst, lane);
}

}  // namespace nsa
