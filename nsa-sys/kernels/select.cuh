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

// Exclusive prefix sum of v over the CTA's threads in thread order, and the total. Shared:
// sums [32]. Every thread calls it; it synchronises.
__device__ __forceinline__ int cta_exclusive_scan(int v, int* sums, int& total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  int inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += y;
  }
  if (lane == 31) sums[warp] = inc;
  __syncthreads();
  int before = 0;
  total = 0;
  for (int w = 0; w < warps; ++w) {
    const int x = sums[w];
    before += w < warp ? x : 0;
    total += x;
  }
  __syncthreads();  // sums free for the next scan
  return before + inc - v;
}

// Ints of shared work select_top_n_radix needs: a 256-bin histogram, the scan's 32 sums, and 4
// broadcast slots.
#define NSA_SELECT_WORK (256 + 32 + 4)

// Eq. 11 for one token whose current block is cur, by a whole CTA (every thread calls it; it
// synchronises), with the picks of select_top_n_warp: the forced blocks (select_forced: block
// 0, then the local band ascending, at most kmax = min(n, cur + 1) of them), then the best of
// the other blocks 1 .. cur by score, ties to the lower index, kmax picks at most. `sc` holds
// the scores of blocks 0 .. cur (>= 0; read only). The rem-th best candidate is found by a
// radix select on the scores' bits (4 passes of 8 bits: a histogram, then one warp finds the
// bin), so the cost is a few passes over the blocks instead of a pass per pick; the picks are
// written ascending by a CTA-wide scan. dst[0 .. n): the picks ascending, then -1. Shared:
// work [NSA_SELECT_WORK] ints.
__device__ __forceinline__ void select_top_n_radix(const float* sc, int cur, int n, int n_local,
                                                   long long* dst, int* work) {
  const int tid = threadIdx.x, threads = blockDim.x, lane = tid % 32, warp = tid / 32;
  int* hist = work;
  int* sums = work + 256;
  int* bc = work + 288;
  const int nb = cur + 1, kmax = min(n, nb);
  const int band0 = max(1, cur - n_local + 1);
  const int band = max(0, min(cur - band0 + 1, kmax - 1));  // forced band blocks
  const int rem = kmax - 1 - band;
  const auto forced = [&](int j) { return j == 0 || (j >= band0 && j < band0 + band); };
  // A candidate: not forced, block >= 1 with a score (NaN never is, as in select_better).
  const auto cand = [&](int j) { return j >= 1 && !forced(j) && sc[j] >= 0.f; };
  const auto key = [&](int j) { const float v = sc[j]; return v > 0.f ? __float_as_uint(v) : 0u; };
  // Contiguous shares, so that the scans below run in block order.
  const int per = (nb + threads - 1) / threads;
  const int lo = min(nb, tid * per), hi = min(nb, lo + per);

  int total = 0;
  int mine = 0;
  for (int j = lo; j < hi; ++j) mine += cand(j);
  cta_exclusive_scan(mine, sums, total);
  const bool take_all = rem > 0 && total <= rem;
  unsigned thr = 0u;  // the rem-th best candidate's key
  int k_eq = 0;       // candidates with key == thr to take (the lowest blocks)
  if (rem > 0 && !take_all) {
    unsigned prefix = 0u;
    int k = rem;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += threads) hist[i] = 0;
      __syncthreads();
      const unsigned hmask = shift == 24 ? 0u : 0xffffffffu << (shift + 8);
      // Lanes with the same bin add once (scores share their high bits: one address would
      // otherwise take every lane's atomic in turn); every lane runs `per` rounds.
      for (int i = 0; i < per; ++i) {
        const int j = lo + i;
        bool in = j < hi && cand(j);
        unsigned bin = 256u;
        if (in) {
          const unsigned kj = key(j);
          in = (kj & hmask) == prefix;
          bin = in ? (kj >> shift) & 255u : 256u;
        }
        const unsigned same = __match_any_sync(0xffffffffu, bin);
        if (in && lane == __ffs(same) - 1) atomicAdd(hist + bin, __popc(same));
      }
      __syncthreads();
      if (warp == 0) {
        // Lane s holds bins 255 - 8s .. 248 - 8s, highest first; an inclusive scan from the top.
        int cnt[8], local = 0;
#pragma unroll
        for (int r = 0; r < 8; ++r) {
          cnt[r] = hist[255 - 8 * lane - r];
          local += cnt[r];
        }
        int inc = local;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const int y = __shfl_up_sync(0xffffffffu, inc, o);
          if (lane >= o) inc += y;
        }
        int run = inc - local;
        if (run < k && k <= inc) {
#pragma unroll
          for (int r = 0; r < 8; ++r) {
            if (run < k && k <= run + cnt[r]) {
              bc[0] = (int)(prefix | ((unsigned)(255 - 8 * lane - r) << shift));
              bc[1] = k - run;
            }
            run += cnt[r];
          }
        }
      }
      __syncthreads();
      prefix = (unsigned)bc[0];
      k = bc[1];
    }
    thr = prefix;
    k_eq = k;
  }
  // Ties at the threshold go to the lowest blocks: rank them in block order.
  int eq = 0;
  if (rem > 0 && !take_all) {
    for (int j = lo; j < hi; ++j) eq += cand(j) && key(j) == thr;
  }
  int eq_rank = cta_exclusive_scan(eq, sums, total);
  const auto picked = [&](int j, int& rank) {
    if (forced(j)) return true;
    if (rem <= 0 || !cand(j)) return false;
    if (take_all) return true;
    const unsigned kj = key(j);
    if (kj > thr) return true;
    return kj == thr && rank++ < k_eq;
  };
  int count = 0, r0 = eq_rank;
  for (int j = lo; j < hi; ++j) count += picked(j, r0);
  int pos = cta_exclusive_scan(count, sums, total);
  r0 = eq_rank;
  for (int j = lo; j < hi; ++j) {
    if (picked(j, r0)) dst[pos++] = j;
  }
  for (int s = total + tid; s < n; s += threads) dst[s] = -1;
}

}  // namespace nsa
