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
// synchronises): ForcedBlocks' rule with kmax = min(n, cur + 1). `sc` holds
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
  const int nb = cur + 1;
  const ForcedBlocks fb(cur, n_local, min(n, nb));
  const int rem = fb.rem;
  // Blocks 0 .. cur: forced unless a candidate; a candidate with a score (never NaN).
  const auto forced = [&](int j) { return !fb.candidate(j); };
  const auto cand = [&](int j) { return fb.candidate(j) && sc[j] >= 0.f; };
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
