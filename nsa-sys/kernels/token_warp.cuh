// The key stream of the token-per-warp kernels (selected_fwd.cu's slc_fwd_warp, selected_bwd.cu's
// slc_dq_warp): one warp per (token t, group g, batch b) whose 16 tensor-core rows are the
// group's heads, reading only that token's selected keys.
//
// Sub-tile y = slot * P + piece (P = ceil(L / 16)) holds keys j L + 16 piece ..
// min(j L + L, t + 1) - 1 of the slot's block j; the ids are cleaned (nsa_clean_ids: valid ones
// first, then -1), lane i holding slot i's id (n <= 32). Sub-tiles pass through ST stages of
// K [16][DK + 8] and V [16][DV + 8] bf16 in the warp's shared memory, filled by cp.async: ST - 1
// copies in flight while one is computed, every copy group committed (empty ones too) so that
// cp_async_wait<ST - 1> means "sub-tile y has landed"; the warp synchronises with nothing but
// itself. Rows past a sub-tile's keys are zeros. `stream` runs that protocol around a kernel's
// per-sub-tile body. ST: NSA_FWD_WARP_STAGES for the forward,
// NSA_DQ_WARP_STAGES for dQ (fewer: its 255 registers and dO rows leave room for fewer warps).
#pragma once
#include "mma.cuh"

#define NSA_FWD_WARP_STAGES 4  // kFwdWarpStages in glue/fused.cpp
#define NSA_DQ_WARP_STAGES 3   // kDqWarpStages in glue/fused.cpp

namespace nsa {

template <int DK, int DV, int ST>
struct TokenWarpKeys {
  static constexpr int QS = DK + 8, VS = DV + 8, STAGE = 16 * (QS + VS);
  const __nv_bfloat16* k;  // key row (b, s, g) at k + ((b S + s) Hkv + g) DK
  const __nv_bfloat16* v;
  __nv_bfloat16* stages;   // ST * STAGE elements
  long long base;          // (b S) Hkv + g: the group's row offset of key 0
  int Hkv, L, t, P, id, lane;
  int tiles;               // sub-tiles of the token's valid blocks

  __device__ __forceinline__ TokenWarpKeys(const __nv_bfloat16* k_, const __nv_bfloat16* v_,
                                           __nv_bfloat16* stages_, const int* __restrict__ ids,
                                           int S, int Hkv_, int n, int L_, int t_, int g, int b,
                                           int lane_)
      : k(k_), v(v_), stages(stages_), base((long long)b * S * Hkv_ + g), Hkv(Hkv_), L(L_),
        t(t_), P((L_ + 15) / 16), lane(lane_) {
    id = lane < n ? ids[(((long long)b * S + t) * Hkv + g) * n + lane] : -1;
    tiles = __popc(__ballot_sync(0xffffffffu, id >= 0)) * P;
  }

  // Sub-tile y's first key and key count (<= 0: none); uniform over the warp.
  __device__ __forceinline__ int span(int y, long long& first) const {
    const int j = __shfl_sync(0xffffffffu, id, y / P);
    first = (long long)j * L + (y % P) * 16;
    const long long end = min((long long)j * L + L, (long long)t + 1);
    return (int)max(0LL, min(16LL, end - first));
  }

  // Sub-tile y's keys [16][DK + 8] and values [16][DV + 8] in its stage.
  __device__ __forceinline__ __nv_bfloat16* key_rows(int y) const {
    return stages + (y % ST) * STAGE;
  }
  __device__ __forceinline__ __nv_bfloat16* value_rows(int y) const {
    return key_rows(y) + 16 * QS;
  }

  // Starts sub-tile y's copies into its stage (not committed).
  __device__ __forceinline__ void load(int y) const {
    long long first;
    const int keys = span(y, first);
    if (keys <= 0) return;
    __nv_bfloat16* kd = key_rows(y);
    __nv_bfloat16* vd = value_rows(y);
    const __nv_bfloat16* kb = k + (base + first * Hkv) * DK;
    const __nv_bfloat16* vb = v + (base + first * Hkv) * DV;
    rows16<DK>(kd, QS, kb, (long long)Hkv * DK, keys);
    rows16<DV>(vd, VS, vb, (long long)Hkv * DV, keys);
  }

  // The whole stream: body(keys, values, count) for every sub-tile with keys, in order, with
  // the copies ahead of it in flight; each step ends with the __syncwarp that frees its stage,
  // and no copy outlives the stream.
  template <typename Body>
  __device__ __forceinline__ void stream(Body body) const {
    prologue();
    for (int y = 0; y < tiles; ++y) {
      advance(y);
      long long first;
      const int nk = span(y, first);
      if (nk > 0) body(key_rows(y), value_rows(y), nk);
      __syncwarp();  // this stage is free for the copy (stages - 1) sub-tiles on
    }
    cp_async_wait<0>();  // the trailing groups are empty; none may outlive the CTA
  }

 private:
  // Issues sub-tiles 0 .. ST - 2, one commit each.
  __device__ __forceinline__ void prologue() const {
#pragma unroll
    for (int y = 0; y < ST - 1; ++y) {
      if (y < tiles) load(y);
      cp_async_commit();
    }
  }

  // Before computing sub-tile y: issues y + ST - 1 (into the stage computed at
  // y - 1, released by that step's closing __syncwarp) and waits for y.
  __device__ __forceinline__ void advance(int y) const {
    if (y + ST - 1 < tiles) load(y + ST - 1);
    cp_async_commit();
    cp_async_wait<ST - 1>();  // this lane's copies of sub-tile y
    __syncwarp();                          // ... and every lane's
  }

  template <int W>
  __device__ __forceinline__ void rows16(__nv_bfloat16* dst, int stride,
                                         const __nv_bfloat16* src, long long src_stride,
                                         int keys) const {
    constexpr int PW = W / 8;  // 16-byte chunks per row
#pragma unroll
    for (int i = 0; i < 16 * PW / 32; ++i) {
      const int e = i * 32 + lane, r = e / PW, ch = e % PW;
      if (r < keys) {
        cp_async16(dst + r * stride + ch * 8, src + r * src_stride + ch * 8);
      } else {
        *reinterpret_cast<uint4*>(dst + r * stride + ch * 8) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  }
};

// S = Q K^T of the warp's 16 rows (Q's A fragments qf) against a stage's 16 key rows ks
// (stride DK + 8), unscaled: sc[nt] holds key columns nt * 8 .. nt * 8 + 7 (m16n8 layout).
template <int DK>
__device__ __forceinline__ void warp_scores(float (&sc)[2][4], const unsigned (&qf)[DK / 16][4],
                                            const __nv_bfloat16* ks, int lane) {
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
#pragma unroll
  for (int kt = 0; kt < DK / 16; ++kt) {
    unsigned bb[4];
    load_b_x2(bb, ks, DK + 8, 0, kt * 16, lane);
    mma_bf16(sc[0], qf[kt][0], qf[kt][1], qf[kt][2], qf[kt][3], bb[0], bb[1]);
    mma_bf16(sc[1], qf[kt][0], qf[kt][1], qf[kt][2], qf[kt][3], bb[2], bb[3]);
  }
}

// The A fragments of 16 rows of W bf16 (row r < rows from src + r * W, zeros after), staged
// through `tile` (16 rows of stride W + 8; free again when this returns).
template <int W>
__device__ __forceinline__ void warp_rows_to_a(unsigned (&a)[W / 16][4], __nv_bfloat16* tile,
                                               const __nv_bfloat16* __restrict__ src, int rows,
                                               int lane) {
  constexpr int PW = W / 8, RS = W + 8;
  for (int e = lane; e < 16 * PW; e += 32) {
    const int r = e / PW, ch = e % PW;
    __nv_bfloat16* dst = tile + r * RS + ch * 8;
    if (r < rows) {
      cp_async16(dst, src + (long long)r * W + ch * 8);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
  cp_async_wait_all();
  __syncwarp();
#pragma unroll
  for (int kt = 0; kt < W / 16; ++kt) load_a_x4(a[kt], tile, RS, 0, kt * 16, lane);
  __syncwarp();
}

}  // namespace nsa
