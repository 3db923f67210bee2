// Helpers shared by the NSA kernels (included by name through NVRTC's header list).
//
// Element access for the two input types (bf16 and fp32; every kernel accumulates in fp32),
// RoPE's turn of a pair, the block-id rules every path agrees on, and small warp reductions.
#pragma once
#include <cuda_bf16.h>

namespace nsa {

// No <math.h> under NVRTC: +infinity from its bit pattern.
#define INFINITY __int_as_float(0x7f800000)

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// RoPE's rotate-half turn of the pair (x1, x2) = (x[i], x[i + dk/2]) of a head by the angle
// whose cosine and sine are c and s (-s: the inverse turn): the arithmetic of nsa_rope and of
// the decode step's prologue, so both give the same bits.
__device__ __forceinline__ void rope_turn(float x1, float x2, float c, float s, float& y1,
                                          float& y2) {
  y1 = x1 * c - x2 * s;
  y2 = x2 * c + x1 * s;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Block ids arrive already cleaned by the host glue: int32 [B, S, Hkv, n], each row's distinct
// valid ids (0 <= j <= t / L, j * L < S) first in descending order, -1 after them. Kernels
// still treat any id outside [0, t / L] as a skipped slot, so a stray value can never read
// outside K / V.
__device__ __forceinline__ bool id_ok(int j, long long t, int L) {
  return j >= 0 && (long long)j * L <= t;
}

// Loads keys c0 .. c0 + nk - 1 of group g of batch b into fp32 shared memory, ks [nk][dk] and
// vs [nk][dv], with the block's `threads` threads striding over the elements (k [B, S, Hkv, dk],
// v [B, S, Hkv, dv]). The SIMT forward and both backward kernels read K/V chunks this way; the
// caller synchronises before use.
template <typename T>
__device__ __forceinline__ void load_kv_chunk(float* __restrict__ ks, float* __restrict__ vs,
                                              const T* __restrict__ k, const T* __restrict__ v,
                                              int b, int S, int Hkv, int g, int c0, int nk,
                                              int dk, int dv, int tid, int threads) {
  for (int e = tid; e < nk * dk; e += threads) {
    const int kk = e / dk, d = e % dk;
    ks[e] = to_f(k[(((long long)b * S + c0 + kk) * Hkv + g) * dk + d]);
  }
  for (int e = tid; e < nk * dv; e += threads) {
    const int kk = e / dv, d = e % dv;
    vs[e] = to_f(v[(((long long)b * S + c0 + kk) * Hkv + g) * dv + d]);
  }
}

}  // namespace nsa
