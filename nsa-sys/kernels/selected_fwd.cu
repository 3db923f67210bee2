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
// Two kernels:
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
// nsa_slc_fwd_simt_{f32,bf16} (any dk, dv): one CTA of 128 threads per (token, group, batch)
//   (the paper's kernel shape), keys of each selected block in chunks of KC = 16 loaded once
//   for all hpg heads; plain fp32 FMAs. The exact fp32 path (and the bf16 fallback for head
//   sizes without an mma instantiation). Shared memory: q, o [hpg][dk | dv], K/V chunk
//   [KC][dk | dv], p [hpg][KC], running max / sum / rescale [hpg], ids [n] (floats, ints).
#include "attend.cuh"

#define NSA_KC 16

namespace nsa {

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
