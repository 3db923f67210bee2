// The selected / compressed kernel table that Rust loads (a mirror of nsa_sys::fused::SlcTable),
// the parameter structs of compressed.cu, and what every launch of those kernels needs: the
// kernels' fixed sizes, their shared-memory carve-ups and the checked launch. Shared by the
// glue files that launch them (fused.cpp).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#include "launch.h"

// Mirror of nsa_sys::fused::SlcTable (#[repr(C)]): the driver's cuLaunchKernel and the
// CUfunction handles of one device. Index of the nine-entry tensor-core families (fwd_mma,
// dq_mma, dkdv_mma, dkdv_dq_mma, cmp_*_mma, fwd_kv, fwd_warp, dq_warp): 3 * dk_index +
// dv_index over {64, 128, 192}; of fwd_simt, dq, dkdv, dkdv_reduce: 0 = fp32, 1 = bf16; of
// cmp_select: as commented.
struct NsaSlcTable {
  void* launch;
  void* fwd_mma[9];
  void* fwd_simt[2];
  void* dq[2];
  void* dkdv[2];
  void* dkdv_reduce[2];
  void* dq_mma[9];
  void* dkdv_mma[9];
  void* cmp_fwd_mma[9];
  void* cmp_dq_mma[9];
  void* cmp_dkdv_mma[9];
  void* cmp_select[9];  // bf16 dk 64, 128, 192, fp32 dk 64, 128, 192, bf16 8 warps dk 64, 128, 192
  void* fwd_kv[9];
  void* fwd_combine;
  void* row_dot[2];
  void* cmp_fold[2];    // one word, four words per thread
  void* cmp_unfold[2];  // one word, four words per thread
  void* clean_ids[2];   // int32, int64 block ids
  void* fwd_warp[9];
  void* dq_warp[9];
  void* dkdv_dq_mma[9];
  void* dq_reduce;
  int32_t max_smem;
};

// Mirrors of compressed.cu's kernel parameter structs.
constexpr int kMaxTaps = 32;  // NSA_MAX_TAPS
struct NsaTaps {
  int32_t first, step, count;
  int32_t w[kMaxTaps];
};
struct NsaSelectArgs {
  int32_t L, n, n_local, Nb, bq, ring;
  NsaTaps taps;
};

namespace nsa_slc {

using at::Tensor;

inline constexpr int kThreads = 128;  // NSA_THREADS in the kernels
inline constexpr int64_t kKc = 16;    // NSA_KC
inline constexpr int64_t kM = 64;     // NSA_M, rows per CTA of the tensor-core forward
inline constexpr int64_t kBk = 64;    // NSA_BK, keys per tile of the tensor-core forward
inline constexpr int64_t kFwdWarpStages = 4;  // NSA_FWD_WARP_STAGES
inline constexpr int64_t kDqWarpStages = 3;   // NSA_DQ_WARP_STAGES

inline void launch(const NsaSlcTable* tab, void* fn, const char* what, int64_t gx, int64_t gy,
            int64_t gz, int64_t smem, void* stream, void** args, int64_t threads = kThreads) {
  TORCH_CHECK(smem <= tab->max_smem, what, ": needs ", smem,
              " bytes of shared memory per block, the device allows ", tab->max_smem,
              " (head sizes or n too large for this kernel)");
  nsa_glue::launch_kernel(tab->launch, fn, what, gx, gy, gz, threads, smem, stream, args);
}

inline int dim_index(int64_t d) { return d == 64 ? 0 : d == 128 ? 1 : d == 192 ? 2 : -1; }

inline int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

// Ints of the union tile (mma.cuh, union_ints) for bq tokens of n ids, candidate list of P.
inline int64_t union_ints(int64_t bq, int64_t n, int64_t P) {
  return bq * n + 2 * P + bq * (P / 32) + 2 * (bq * 2 + kBk + kBk) + 1;
}

// Shared memory of the tensor-core kernels (must match their carve-ups): tiles of 64 rows or
// keys of width dk or dv, each row padded by 8 elements.
inline int64_t tile_bytes(int64_t width) { return kM * (width + 8) * 2; }
// The forward double-buffers K and V (two tiles each) so the next tile loads during this one.
// The token-per-warp kernels (token_warp.cuh): stages of K [16][dk + 8] and V [16][dv + 8]
// bf16, plus dO [16][dv + 8] for dq.
inline int64_t warp_smem(int64_t dk, int64_t dv, bool dq) {
  int64_t stages = dq ? kDqWarpStages : kFwdWarpStages;
  return 2 * 16 * (stages * (dk + 8 + dv + 8) + (dq ? dv + 8 : 0));
}
inline int64_t fwd_mma_smem(int64_t dk, int64_t dv, int64_t hpg, int64_t n, int64_t P) {
  return 3 * tile_bytes(dk) + 2 * tile_bytes(dv) + 4 * union_ints(kM / hpg, n, P);
}
inline int64_t dq_mma_smem(int64_t dk, int64_t dv, int64_t hpg, int64_t n, int64_t P) {
  return 2 * tile_bytes(dk) + 2 * tile_bytes(dv) + 4 * 2 * kM + 4 * union_ints(kM / hpg, n, P);
}
inline int64_t dkdv_mma_smem(int64_t dk, int64_t dv) {
  return 2 * tile_bytes(dk) + 2 * tile_bytes(dv) + 4 * 3 * kM;
}
// dkdv_mma with dQ (attend.cuh, DQ): plus slot [64] (int) and dS [64][72] (bf16).
inline int64_t dkdv_dq_mma_smem(int64_t dk, int64_t dv) {
  return dkdv_mma_smem(dk, dv) + 4 * kM + tile_bytes(kBk);
}

// Index of the tensor-core instantiation for (dk, dv), or -1 (no instantiation, or the group
// does not fit the 64-row tiles).
inline int mma_index(const Tensor& q, int64_t dk, int64_t dv, int64_t hpg) {
  int di = dim_index(dk), vi = dim_index(dv);
  if (q.scalar_type() != at::kBFloat16 || di < 0 || vi < 0 || hpg > kM) return -1;
  return 3 * di + vi;
}

inline Tensor aligned(const Tensor& x) {
  auto c = x.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

inline int type_index(const Tensor& x) { return x.scalar_type() == at::kBFloat16 ? 1 : 0; }

}  // namespace nsa_slc
