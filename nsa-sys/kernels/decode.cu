// One decode step of NSA attention (§3, Eqs. 5-11) for one new query token per sequence, over
// the per-branch caches of nsa-attn's decode path, in four kernels (split-K "flash decoding":
// every branch's keys are cut into tiles of 64 keys; a CTA takes `tpc` consecutive tiles of one
// branch, double-buffering their loads (cp.async) and keeping its heads' softmax state across
// them, and writes one partial state; the partials are merged at the end). The host picks tpc
// per launch so that the grid fills the GPU once (many sequences: several tiles per CTA, few
// partials; one sequence: a tile per CTA, every SM loading):
//
// nsa_dec_cmp_{bf16_dk64, bf16_dk128, bf16_dk192, f32} and, for bf16 groups up to 16 heads at
//   (dk, dv) in {64, 128, 192}^2, nsa_dec_cmp_warp_dk{dk}_dv{dv} (decode_tiles.cuh has both tile
//   forms): grid (parts_cmp, Hkv, B). CTA (x, g, b) takes compressed tiles x * tpc_cmp ..
//   (tokens i < nvis(t) that sequence b's token t sees, Eq. 7) and the group's hpg query heads: scores s = scale * log2(e) * q . k (tensor cores for
//   bf16, fp32 FMAs for fp32), written to `scores` for selection, and its partial state per head
//   (max m, sum l of exp2(s - m), o = sum exp2(s - m) v). The last CTA of each (b, g) to finish
//   (a ticket counter, reset by that CTA, so the kernel can be replayed in a CUDA graph) merges
//   the partials' (m, l) into each head's log2-sum-exp lse2.
// nsa_dec_scores: grid (sel_slices, Hkv, B), NSA_DEC_SCORE_THREADS threads. Eq. 8 (p = exp2(s -
//   lse2)), Eq. 10 (sum over the group's heads, in head order) and Eq. 9 (the overlap taps) for
//   a slice of the selection blocks into shared memory, then the slice's best candidates
//   (select.cuh's cta_top_keys: each warp's best 32 kept by bitonic steps, the lists of the
//   warps that had blocks merged pairwise); the last slice to finish loads the slices' lists
//   (each warp all of its share at once), merges them and writes Eq. 11's top n with the
//   forced blocks (ForcedBlocks, the training kernel's rule): ids [B, Hkv, n] ascending, -1
//   padded.
// nsa_dec_attend_{bf16_dk64, ..., f32} (and _warp_dk{dk}_dv{dv}): grid (parts_slc + parts_win,
//   Hkv, B). The same partial over selected tiles (tile y: block ids[y / tpb], keys id * l' + (y % tpb) * 64 + u <= t of
//   the raw buffer) or window tiles (tile y: positions t + 1 - min(w, t + 1) + y * 64 + u <= t,
//   ring slot p mod w, or the raw buffer), tpc_att tiles per CTA.
// nsa_dec_combine_{bf16, f32}: grid (hpg, Hkv, B), parts * dv / 4 threads (up to
//   NSA_DEC_COMBINE_THREADS: enough part groups that each thread takes a few partials). Merges
//   each branch's partials online (scaled by exp2(m - max)), divides by the merged sum (a branch
//   without keys gives 0, as the reference does), mixes the three with the gates (Eq. 5) and
//   writes the output row.
//
// nsa_dec_append_{bf16, f32}: the step's prologue, before the kernels above: grid (X, B), 256
//   threads; the gates one warp per output, then one thread per unit of sequence b's other
//   work, each grid-stride. From the row x[b] of the
//   stacked projection output ([B, W]: queries, keys, values and, with gates, W_1's hidden
//   pre-activations), it writes the rotated queries q [B, H, 2 half] (RoPE, rotate-half form,
//   the fused RoPE kernel's arithmetic; tables cos, sin fp32 [B, half], row b = sequence b's
//   position; a unit is one pair (i, i + half) of a head), up to NSA_APPEND_MAX_WRITES cache
//   writes (AppendWrite: the Hkv rows of `width` columns from column `col` into slot slots[b]
//   of dst [B, Hkv, cap, width], rotated as the queries when `rotate`, one unit per pair, or
//   copied, one unit per element; a slot outside [0, cap) writes nothing) and, with hidden > 0,
//   the gates [B, 3H] = sigmoid(W_2 silu(x[b, gate_col ..] + b_1) + b_2) (a warp per output,
//   its lanes over the hidden units, fp32 arithmetic, W_2 [3H, hidden] row-major, b_1 / b_2
//   optional). One launch where the
//   libtorch step took a RoPE launch, one scatter per cache tensor and the gate MLP's six.
//
// Programmatic dependent launches (sm_90, host's DecodeLaunch::programmatic): the selection,
// the selected/window and the combine kernels may start while the kernel before them ends. Each
// CTA waits (griddepcontrol.wait: that kernel complete, its stores visible) before it reads
// what that kernel wrote, then lets the next kernel launch (launch_dependents): the selection
// after its wait (so the attend kernel's CTAs, once running, see a finished compressed
// kernel), the compressed kernel at once. Window CTAs read only the caches: they work first and
// wait at their end, so that the attend kernel's completion still implies the selection's and,
// through it, the compressed kernel's, whose partials the combine reads. Without the launch
// attribute (or below sm_90) both instructions are no-ops.
//
// Layouts (contiguous): q [B, Hkv, hpg, dk] (query head g * hpg + h); caches [B, Hkv, slots, d]
// (raw: slot = position; compressed: slot = index; window ring: slot = position mod w);
// positions int64 [B] (t_b, the new token's position, already written to every buffer); gates
// [B, Hkv * hpg, 3] (cmp, slc, win); out [B, Hkv * hpg, dv]; partials: ml fp32 [B, Hkv, P, hpg, 2]
// and o fp32 [B, Hkv, P, hpg, dv] with P = parts_cmp + parts_slc + parts_win (that order);
// scores fp32 [B, Hkv, hpg, nc]; lse2 fp32 [B, Hkv, hpg]; tickets int32 [B, Hkv] (zero between
// launches; the compressed and the selection kernels count on them in turn); lists u64 [B, Hkv,
// sel_slices, 32]; ids int64 [B, Hkv, n].
//
// Shared memory of the CTA-wide tile kernels (bytes, the host's tile_smem; the warp-level ones:
// decode_tiles.cuh and warp_tile_smem): Q [HR][QS], K [nbuf][64][QS] (bf16 QS = dk + 8, fp32 dk + 1), V [nbuf][64][VS] (bf16 dv + 8, fp32 dv + 1),
// scores [HR][65] fp32, and with tpc > 1 (nbuf 2, else 1) the running o [HR][dv], m, l and the
// rescale factor [HR] in fp32; HR = hpg rounded up to 16. 128 threads (4 warps); for bf16 warp w
// computes Q K^T for keys 16w .. 16w + 15 of every row block, then P V for (row block, 16
// columns) pairs w, w + 4, ...
#include "decode_tiles.cuh"

namespace nsa {

__device__ __forceinline__ void grid_dependency_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void grid_launch_dependents() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
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

template <typename T, int DK, int DV>
__device__ void dec_cmp(const T* __restrict__ q, const T* __restrict__ ck,
                        const T* __restrict__ cv, const long long* __restrict__ positions,
                        float* __restrict__ part_ml, float* __restrict__ part_o,
                        float* __restrict__ scores, float* __restrict__ lse2,
                        int* __restrict__ tickets, const DecodeArgs a) {
  grid_launch_dependents();
  const int x = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const long long bg = (long long)b * a.Hkv + g;
  const long long t = positions[b];
  const int nvis = num_visible_compressed(compressed_keys((int)a.cap_cmp, a.cl, a.cd), t);
  const int dk = DK > 0 ? DK : a.dk;
  const int P = dec_parts(a), y0 = x * a.tpc_cmp;
  const int ny = min(a.tpc_cmp, a.chunks_cmp - y0);
  const T* kb = ck + bg * a.cap_cmp * dk;
  const T* vb = cv + bg * a.cap_cmp * a.dv;
  float* srow = scores + bg * a.hpg * a.nc;
  dec_partial<T, DK, DV>(
      a, ny, a.tpc_cmp, q + bg * a.hpg * dk,
      [&](int y) {
        const int i0 = (y0 + y) * NSA_DEC_KEYS;
        return DecTile<T>{kb, vb, i0, 0, max(0, min(NSA_DEC_KEYS, nvis - i0))};
      },
      [&](int y, int h, int u, float s0, float s1, int n) {
        float* at = srow + (long long)h * a.nc + (y0 + y) * NSA_DEC_KEYS + u;
        if (n == 2) {
          *reinterpret_cast<float2*>(at) = make_float2(s0, s1);  // u even, nc a multiple of 64
        } else {
          *at = s0;
        }
      },
      part_ml + (bg * P + x) * a.hpg * 2, part_o + (bg * P + x) * a.hpg * a.dv);

  if (!last_to_finish(tickets + bg, gridDim.x)) return;
  // lse2 of each head over every compressed partial: tph threads per head (a power of two,
  // within a warp), each folding its share of partials into a running (m, l), then merged by
  // shuffles, so the loads of all heads are in flight at once.
  int tph = 32;
  while (tph > 1 && tph * a.hpg > NSA_THREADS) tph >>= 1;
  const int h = threadIdx.x / tph, sub = threadIdx.x % tph;
  float m = -INFINITY, l = 0.f;
  if (h < a.hpg) {
    const float* mlh = part_ml + (bg * P * a.hpg + h) * 2;
#pragma unroll 4
    for (int x = sub; x < a.parts_cmp; x += tph) {
      const float2 st = __ldcg(reinterpret_cast<const float2*>(mlh + x * 2LL * a.hpg));
      const float mn = fmaxf(m, st.x);
      if (mn > -INFINITY) {
        l = l * exp2f(m - mn) + st.y * exp2f(st.x - mn);
        m = mn;
      }
    }
  }
  for (int off = 1; off < tph; off <<= 1) {
    const float mo = __shfl_xor_sync(0xffffffffu, m, off), lo = __shfl_xor_sync(0xffffffffu, l, off);
    const float mn = fmaxf(m, mo);
    if (mn > -INFINITY) {
      l = l * exp2f(m - mn) + lo * exp2f(mo - mn);
      m = mn;
    }
  }
  if (h < a.hpg && sub == 0) lse2[bg * a.hpg + h] = m > -INFINITY ? m + __log2f(l) : -INFINITY;
}

// Eqs. 8-11 from the scores and lse2 of dec_cmp, by `sel_slices` CTAs of NSA_DEC_SCORE_THREADS
// threads per (b, g), CTA x taking selection blocks x * slice_blocks .. (the host sizes the
// slices so that the grid fills the device once). The slice's blocks in chunks of
// NSA_DEC_SCORE_THREADS: the chunk's compressed tokens' p summed over the group's heads in head
// order (Eq. 10) into pc, then each thread folds its block's taps (Eq. 9) into sc. The slice's
// 32 best keys (cta_top_keys) go to `lists` [B, Hkv, sel_slices, 32]; the last CTA of the (b, g)
// to finish (the cmp kernel's ticket, which it left at zero) merges them and writes the picks.
// One slice skips the hand-off. Shared: lse2 [64] floats, the top-n's work
// [NSA_SELECT_WORK(warps)] unsigned long longs, pc [NSA_DEC_SCORE_THREADS * step + count] and sc
// [slice_blocks] floats.
__device__ void dec_scores(const long long* __restrict__ positions,
                           const float* __restrict__ scores, const float* __restrict__ lse2,
                           unsigned long long* __restrict__ lists, int* __restrict__ tickets,
                           long long* __restrict__ ids, const DecodeArgs a) {
  extern __shared__ __align__(16) unsigned char smraw[];
  constexpr int CH = NSA_DEC_SCORE_THREADS;
  float* lse2s = reinterpret_cast<float*>(smraw);
  auto* work = reinterpret_cast<unsigned long long*>(lse2s + DECODE_MAX_HPG);
  float* pc = reinterpret_cast<float*>(work + NSA_SELECT_WORK(CH / 32));
  const Taps& tp = a.taps;
  float* sc = pc + CH * tp.step + tp.count;
  const int tid = threadIdx.x, x = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const long long bg = (long long)b * a.Hkv + g;
  const long long t = positions[b];
  const int nvis = num_visible_compressed(compressed_keys(a.nc, a.cl, a.cd), t);
  const int cur = min((int)(t / a.L), a.nb - 1);
  const ForcedBlocks fb(cur, a.n_local, min(a.n, cur + 1));
  const int lo = x * a.slice_blocks, hi = min(lo + a.slice_blocks, cur + 1);
  grid_dependency_wait();  // the compressed kernel's scores, lse2 and tickets
  grid_launch_dependents();
  for (int h = tid; h < a.hpg; h += CH) lse2s[h] = lse2[bg * a.hpg + h];
  const float* s = scores + bg * a.hpg * a.nc;
  for (int j0 = lo; fb.rem > 0 && j0 < hi; j0 += CH) {
    __syncthreads();  // lse2s written; the last chunk's pc read
    const long long base = (long long)j0 * tp.step + tp.first;
    // The elements the chunk's blocks read: all of pc but in a slice's last, short chunk.
    const int need = (min(CH, hi - j0) - 1) * tp.step + tp.count;
    for (int e = tid; e < need; e += CH) {
      const long long i = base + e;
      float acc = 0.f;
      if (i >= 0 && i < nvis) {
#pragma unroll 16
        for (int h = 0; h < a.hpg; ++h) acc += exp2f(__ldg(s + h * (long long)a.nc + i) - lse2s[h]);
      }
      pc[e] = acc;
    }
    __syncthreads();
    const int j = j0 + tid;
    if (j < hi) {
      float acc = 0.f;
      for (int k = 0; k < tp.count; ++k) acc += (float)tp.w[k] * pc[tid * tp.step + k];
      sc[j - lo] = acc;
    }
  }
  __syncthreads();
  unsigned long long list = cta_top_keys(sc, lo, hi, fb, work);
  const int lane = tid % 32, warp = tid / 32;
  if (a.sel_slices > 1) {
    unsigned long long* mine = lists + bg * a.sel_slices * 32;
    if (warp == 0) mine[x * 32 + lane] = list;
    if (!last_to_finish(tickets + bg, a.sel_slices)) return;
    // Warp w merges the lists of slices w, w + warps, ... (all its loads issued before the
    // first merge); then the warps that had one merge theirs.
    constexpr int W = CH / 32, PER = (NSA_DEC_MAX_SELECT_SLICES + W - 1) / W;
    unsigned long long got[PER];
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int y = warp + i * W;
      got[i] = y < a.sel_slices ? __ldcg(mine + y * 32 + lane) : 0ull;
    }
    list = got[0];
#pragma unroll
    for (int i = 1; i < PER; ++i) {
      if (warp + i * W < a.sel_slices) list = warp_merge_desc(list, got[i], lane);
    }
    list = cta_merge_lists(list, work, min(W, a.sel_slices));
  }
  if (warp == 0) write_top_picks(list, fb, a.n, ids + bg * a.n, lane);
}

template <typename T, int DK, int DV>
__device__ void dec_attend(const T* __restrict__ q, const T* __restrict__ raw_k,
                           const T* __restrict__ raw_v, const T* __restrict__ win_k,
                           const T* __restrict__ win_v, const long long* __restrict__ positions,
                           const long long* __restrict__ ids, float* __restrict__ part_ml,
                           float* __restrict__ part_o, const DecodeArgs a) {
  const int x = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const long long bg = (long long)b * a.Hkv + g;
  const long long t = positions[b];
  const int dk = DK > 0 ? DK : a.dk;
  const int P = dec_parts(a);
  const bool slc = x < a.parts_slc;
  const int y0 = (slc ? x : x - a.parts_slc) * a.tpc_att;
  const int ny = min(a.tpc_att, (slc ? a.n * a.tpb : a.chunks_win) - y0);
  const bool ring = !slc && a.cap_win > 0;
  const long long cap = ring ? a.cap_win : a.cap_raw;
  const T* kb = (ring ? win_k : raw_k) + bg * cap * dk;
  const T* vb = (ring ? win_v : raw_v) + bg * cap * a.dv;
  const long long* idrow = ids + bg * a.n;
  if (slc) grid_dependency_wait();  // the selection's ids
  grid_launch_dependents();
  dec_partial<T, DK, DV>(
      a, ny, a.tpc_att, q + bg * a.hpg * dk,
      [&](int y) {
        const int yy = y0 + y;
        long long first = 0;
        int keys = 0;
        if (slc) {
          const long long j = idrow[yy / a.tpb];
          const int sub = (yy % a.tpb) * NSA_DEC_KEYS;
          first = j * a.L + sub;
          if (j >= 0 && first <= t) keys = (int)min((long long)min(NSA_DEC_KEYS, a.L - sub), t - first + 1);
        } else {
          first = t + 1 - min((long long)a.w, t + 1) + (long long)yy * NSA_DEC_KEYS;
          if (first <= t) keys = (int)min((long long)NSA_DEC_KEYS, t - first + 1);
        }
        return DecTile<T>{kb, vb, first, ring ? (long long)a.w : 0LL, keys};
      },
      [](int, int, int, float, float, int) {},
      part_ml + (bg * P + a.parts_cmp + x) * a.hpg * 2,
      part_o + (bg * P + a.parts_cmp + x) * a.hpg * a.dv);
  if (!slc) grid_dependency_wait();  // this grid ends after the selection (see the top)
}

// Shared: weights [P] (exp2(m_x - max) / sum of the partial's branch, times the branch's
// gate), padded to a multiple of 4, then the partial sums [parts][dv].
// Merges (m, l, o) of partial x (o: the thread's four columns) into a branch's running state
// (m = -inf: empty; a partial without keys has m = -inf and is skipped).
__device__ __forceinline__ void merge_partial(float& m, float& l, float4& acc, float mx, float lx,
                                              const float4& o) {
  if (!(mx > -INFINITY)) return;
  const float nm = fmaxf(m, mx);
  const float keep = exp2f(m - nm), add = exp2f(mx - nm);  // exp2(-inf) = 0 for an empty state
  l = fmaf(l, keep, lx * add);
  acc.x = fmaf(acc.x, keep, o.x * add);
  acc.y = fmaf(acc.y, keep, o.y * add);
  acc.z = fmaf(acc.z, keep, o.z * add);
  acc.w = fmaf(acc.w, keep, o.w * add);
  m = nm;
}

// Thread (part, column group cg of 4 columns) of a CTA of parts * dv / 4 threads (the host's
// combine_threads): partials part, part + parts, ... of all three branches, every load issued
// before any waits (no pass over the (m, l) first), each merged online into its branch's running
// state in registers; then per branch the parts' states merged through shared memory (red
// [parts][3][dv], the states' m and l [parts][3], the weights [parts][3]: gate / L * exp2(m - M),
// 0 for a branch without keys), and each column the weighted sum over parts and branches.
template <typename T>
__device__ void dec_combine(const float* __restrict__ part_ml, const float* __restrict__ part_o,
                            const T* __restrict__ gates, T* __restrict__ out,
                            const DecodeArgs a) {
  extern __shared__ __align__(16) unsigned char smraw[];
  const int h = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const long long bg = (long long)b * a.Hkv + g;
  const int C = dec_parts(a), dv = a.dv, groups = dv / 4, parts = blockDim.x / groups;
  const int cg = tid % groups, part = tid / groups;
  const int lo1 = a.parts_cmp, lo2 = a.parts_cmp + a.parts_slc;
  float* red = reinterpret_cast<float*>(smraw);  // [parts][3][dv], 16-byte aligned rows
  float* sm_m = red + parts * 3 * dv;            // [parts][3]
  float* sm_l = sm_m + parts * 3;
  float* wts = sm_l + parts * 3;
  const long long row = (long long)b * a.Hkv * a.hpg + g * a.hpg + h;
  const float* ml = part_ml + (bg * C * a.hpg + h) * 2;                  // x at ml[x * 2 * hpg]
  const float* po = part_o + (bg * C * a.hpg + h) * (long long)dv + cg * 4;  // x at po[x * hpg * dv]
  grid_dependency_wait();  // every partial
  float m[3] = {-INFINITY, -INFINITY, -INFINITY}, l[3] = {0.f, 0.f, 0.f};
  float4 acc[3];
#pragma unroll
  for (int k = 0; k < 3; ++k) acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
  if (part < parts) {
#pragma unroll 4
    for (int x = part; x < C; x += parts) {
      const float2 st = __ldcg(reinterpret_cast<const float2*>(ml + x * 2LL * a.hpg));
      const float4 o = __ldcg(reinterpret_cast<const float4*>(po + (long long)x * a.hpg * dv));
      const int br = x < lo1 ? 0 : x < lo2 ? 1 : 2;
#pragma unroll
      for (int k = 0; k < 3; ++k) {
        if (k == br) merge_partial(m[k], l[k], acc[k], st.x, st.y, o);
      }
    }
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      *reinterpret_cast<float4*>(red + (part * 3 + k) * dv + cg * 4) = acc[k];
      if (cg == 0) {
        sm_m[part * 3 + k] = m[k];
        sm_l[part * 3 + k] = l[k];
      }
    }
  }
  __syncthreads();
  if (warp < 3) {  // warp k: branch k's merged max and sum over the parts, then its weights
    float mx = -INFINITY;
    for (int p = lane; p < parts; p += 32) mx = fmaxf(mx, sm_m[p * 3 + warp]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float sum = 0.f;
    if (mx > -INFINITY) {
      for (int p = lane; p < parts; p += 32) {
        const float mp = sm_m[p * 3 + warp];
        if (mp > -INFINITY) sum = fmaf(sm_l[p * 3 + warp], exp2f(mp - mx), sum);
      }
    }
    sum = warp_sum(sum);
    const float scale = sum > 0.f ? to_f(gates[row * 3 + warp]) / sum : 0.f;
    for (int p = lane; p < parts; p += 32) {
      const float mp = sm_m[p * 3 + warp];
      wts[p * 3 + warp] = (scale > 0.f || scale < 0.f) && mp > -INFINITY ? scale * exp2f(mp - mx) : 0.f;
    }
  }
  __syncthreads();
  for (int col = tid; col < dv; col += blockDim.x) {
    float o = 0.f;
    for (int p = 0; p < parts; ++p) {
#pragma unroll
      for (int k = 0; k < 3; ++k) o = fmaf(wts[p * 3 + k], red[(p * 3 + k) * dv + col], o);
    }
    out[row * dv + col] = from_f<T>(o);
  }
}

}  // namespace nsa

#define NSA_DEC_TILES(SUFFIX, T, DK, DV)                                                        \
  extern "C" __global__ void __launch_bounds__(NSA_THREADS) nsa_dec_cmp_##SUFFIX(               \
      const T* q, const T* ck, const T* cv, const long long* positions, float* part_ml,         \
      float* part_o, float* scores, float* lse2, int* tickets, nsa::DecodeArgs a) {             \
    nsa::dec_cmp<T, DK, DV>(q, ck, cv, positions, part_ml, part_o, scores, lse2, tickets, a);  \
  }                                                                                             \
  extern "C" __global__ void __launch_bounds__(NSA_THREADS) nsa_dec_attend_##SUFFIX(            \
      const T* q, const T* raw_k, const T* raw_v, const T* win_k, const T* win_v,               \
      const long long* positions, const long long* ids, float* part_ml, float* part_o,          \
      nsa::DecodeArgs a) {                                                                      \
    nsa::dec_attend<T, DK, DV>(q, raw_k, raw_v, win_k, win_v, positions, ids, part_ml, part_o, \
                               a);                                                              \
  }
// Any group up to 64 heads and any dv (CTA-wide tiles).
NSA_DEC_TILES(bf16_dk64, __nv_bfloat16, 64, 0)
NSA_DEC_TILES(bf16_dk128, __nv_bfloat16, 128, 0)
NSA_DEC_TILES(bf16_dk192, __nv_bfloat16, 192, 0)
NSA_DEC_TILES(f32, float, 0, 0)
// Groups up to 16 heads (warp-level tiles).
#define NSA_DEC_WARP(DK, DV) NSA_DEC_TILES(warp_dk##DK##_dv##DV, __nv_bfloat16, DK, DV)
NSA_DEC_WARP(64, 64)
NSA_DEC_WARP(64, 128)
NSA_DEC_WARP(64, 192)
NSA_DEC_WARP(128, 64)
NSA_DEC_WARP(128, 128)
NSA_DEC_WARP(128, 192)
NSA_DEC_WARP(192, 64)
NSA_DEC_WARP(192, 128)
NSA_DEC_WARP(192, 192)

extern "C" __global__ void __launch_bounds__(NSA_DEC_SCORE_THREADS)
    nsa_dec_scores(const long long* positions, const float* scores, const float* lse2,
                   unsigned long long* lists, int* tickets, long long* ids, nsa::DecodeArgs a) {
  nsa::dec_scores(positions, scores, lse2, lists, tickets, ids, a);
}

#define NSA_DEC_COMBINE(SUFFIX, T)                                                              \
  extern "C" __global__ void __launch_bounds__(NSA_DEC_COMBINE_THREADS) nsa_dec_combine_##SUFFIX(\
      const float* part_ml, const float* part_o, const T* gates, T* out, nsa::DecodeArgs a) {   \
    nsa::dec_combine<T>(part_ml, part_o, gates, out, a);                                        \
  }
NSA_DEC_COMBINE(bf16, __nv_bfloat16)
NSA_DEC_COMBINE(f32, float)

#define NSA_APPEND_MAX_WRITES 6
#define NSA_APPEND_THREADS 256

namespace nsa {

// One cache write of nsa_dec_append (decode.cu's header); dst and slots are device addresses.
struct AppendWrite {
  unsigned long long dst, slots;
  long long cap;
  int col, width, rotate, pad;
};

struct AppendArgs {
  int B, W, H, Hkv, half, writes, hidden, gate_col;
  unsigned long long b1, w2, b2;  // gate parameters (T); b1, b2 0: none
  AppendWrite w[NSA_APPEND_MAX_WRITES];
};

// Units of one write: a pair per rotated column pair, an element per copied column.
__device__ __forceinline__ long long append_units(const AppendArgs& a, int j) {
  return (long long)a.Hkv * (a.w[j].rotate ? a.half : a.w[j].width);
}

// The pair (i, i + half) of a row turned by RoPE (common.cuh's rope_turn, nsa_rope's bits).
template <typename T>
__device__ __forceinline__ void append_rotate(const T* __restrict__ src, T* __restrict__ dst,
                                              float c, float sn, int i, int half) {
  float y1, y2;
  rope_turn(to_f(src[i]), to_f(src[i + half]), c, sn, y1, y2);
  dst[i] = from_f<T>(y1);
  dst[i + half] = from_f<T>(y2);
}

template <typename T>
__device__ void dec_append(const T* __restrict__ x, const float* __restrict__ cos_t,
                           const float* __restrict__ sin_t, T* __restrict__ q,
                           T* __restrict__ gates, const AppendArgs a) {
  const int b = blockIdx.y;
  const T* row = x + (long long)b * a.W;
  const float* cr = cos_t + (long long)b * a.half;
  const float* sr = sin_t + (long long)b * a.half;
  // The gates first: one warp per output, its lanes over the hidden units, their sums added
  // by a fixed butterfly. (One thread per output walked all hidden units in turn, a chain of
  // dependent loads that made this kernel 11 us at the paper shape on an H100.)
  if (a.hidden > 0) {
    const int lane = threadIdx.x % 32;
    const T* b1 = reinterpret_cast<const T*>(a.b1);
    const T* b2 = reinterpret_cast<const T*>(a.b2);
    const int warps = gridDim.x * blockDim.x / 32;  // at most 64 CTAs of 256 threads
    for (int o = (blockIdx.x * blockDim.x + threadIdx.x) / 32; o < 3 * a.H; o += warps) {
      // warp-uniform: every lane takes part in the shuffles
      const T* w2 = reinterpret_cast<const T*>(a.w2) + (long long)o * a.hidden;
      float acc = 0.f;
      for (int k = lane; k < a.hidden; k += 32) {
        const float h = to_f(row[a.gate_col + k]) + (b1 != nullptr ? to_f(b1[k]) : 0.f);
        acc = fmaf(to_f(w2[k]), h / (1.f + expf(-h)), acc);
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
      if (lane == 0) {
        if (b2 != nullptr) acc += to_f(b2[o]);
        gates[(long long)b * 3 * a.H + o] = from_f<T>(1.f / (1.f + expf(-acc)));
      }
    }
  }
  const long long nq = (long long)a.H * a.half;
  long long total = nq;
  for (int j = 0; j < a.writes; ++j) total += append_units(a, j);
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long u = (long long)blockIdx.x * blockDim.x + threadIdx.x; u < total; u += stride) {
    if (u < nq) {
      const int r = (int)(u / a.half), i = (int)(u % a.half);
      append_rotate(row + (long long)r * 2 * a.half, q + ((long long)b * a.H + r) * 2 * a.half,
                    cr[i], sr[i], i, a.half);
      continue;
    }
    long long e = u - nq;
    int j = 0;
    while (e >= append_units(a, j)) e -= append_units(a, j++);  // u < total: j < a.writes
    const AppendWrite& w = a.w[j];
    const long long slot = reinterpret_cast<const long long*>(w.slots)[b];
    if (slot < 0 || slot >= w.cap) continue;
    const int per = w.rotate ? a.half : w.width;
    const int r = (int)(e / per), c = (int)(e % per);
    const T* src = row + w.col + (long long)r * w.width;
    T* dst = reinterpret_cast<T*>(w.dst) + (((long long)b * a.Hkv + r) * w.cap + slot) * w.width;
    if (w.rotate) {
      append_rotate(src, dst, cr[c], sr[c], c, a.half);
    } else {
      dst[c] = src[c];
    }
  }
}

}  // namespace nsa

#define NSA_DEC_APPEND(SUFFIX, T)                                                               \
  extern "C" __global__ void __launch_bounds__(NSA_APPEND_THREADS) nsa_dec_append_##SUFFIX(     \
      const T* x, const float* cos_t, const float* sin_t, T* q, T* gates, nsa::AppendArgs a) {  \
    nsa::dec_append<T>(x, cos_t, sin_t, q, gates, a);                                           \
  }
NSA_DEC_APPEND(bf16, __nv_bfloat16)
NSA_DEC_APPEND(f32, float)
