// The pointwise kernels' table, shared by the glue files that launch them (pointwise.cpp: RoPE
// and the gated sum; loss.cpp: the cross-entropy rows). Mirror of
// nsa_sys::fused::pointwise::PointwiseTable (#[repr(C)]), filled by Rust; its size is compared
// with the Rust struct's before each load (nsa_pointwise_table_size). Indices over {bf16, fp32}:
// rope: 2 * (input is fp32) + (output is fp32); norm, norm_bwd: 4 * (x is fp32) + 2 * (added a
// is fp32) + (output is fp32); mix, mix_bwd, ce_rows, swiglu, swiglu_bwd, blocks, blocks_bwd:
// 0 = bf16, 1 = fp32. model_ops.cpp launches the RMSNorm pair and the SwiGLU pair.
#pragma once
#include <cstdint>

struct NsaPointwiseTable {
  void* launch;
  void* rope[4];
  void* mix[2];
  void* mix_bwd[2];
  void* ce_rows[2];
  void* norm[8];
  void* norm_bwd[8];
  void* swiglu[2];
  void* swiglu_bwd[2];
  void* blocks[2];
  void* blocks_bwd[2];
  int32_t sm_count;
};
