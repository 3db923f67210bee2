// The pointwise kernels' table, shared by the glue files that launch them (pointwise.cpp: RoPE
// and the gated sum; loss.cpp: the cross-entropy rows). Mirror of
// nsa_sys::fused::pointwise::PointwiseTable (#[repr(C)]), filled by Rust. rope: index
// 2 * (input is fp32) + (output is fp32) over {bf16, fp32}; mix, mix_bwd, ce_rows: 0 = bf16,
// 1 = fp32.
#pragma once
#include <cstdint>

struct NsaPointwiseTable {
  void* launch;
  void* rope[4];
  void* mix[2];
  void* mix_bwd[2];
  void* ce_rows[2];
  int32_t sm_count;
};
