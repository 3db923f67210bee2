//! `nsa-attn`: the Native Sparse Attention layer (NSA, arXiv 2502.11089) on libtorch.
//!
//! # What the layer computes
//!
//! [`NsaAttention`] maps `x` `[B, S, dim]` to `[B, S, dim]`. Per token `t` and query head:
//!
//! 1. **Projections.** `q = RoPE(W_q x)` `[B, S, H, dk]`, shared by the branches. Each branch has
//!    its own key/value projection (`cmp.wk/wv`, `slc.wk/wv`, `win.wk/wv`, paper §3.3.3), or one
//!    shared pair `kv.wk/wv` with [`NsaParams::shared_kv`]. Keys `[B, S, Hkv, dk]` get RoPE,
//!    values `[B, S, Hkv, dv]` do not. `dk ≠ dv` is allowed. Query head `j` belongs to group
//!    `j / (H / Hkv)` (group-major, as SDPA's `enable_gqa`).
//! 2. **Compressed branch** (Eq. 7). Compressed token `i` summarises tokens `[i·d, i·d + l)`:
//!    `k̃_i = φ(k_{i·d} + p_0, …, k_{i·d+l−1} + p_{l−1})` with a learned intra-block position
//!    embedding `p` (`cmp.pos_v`; `cmp.pos_k` with the MLP variants only, see [`Phi`]) and
//!    φ ∈ {mean, linear, MLP, mean + MLP}.
//!    *RoPE choice:* φ is applied to keys that already carry RoPE at their own token positions,
//!    so a compressed key mixes the rotations of the tokens it covers; no separate position is
//!    assigned to compressed tokens. Both paths share this code, so they agree by construction.
//!    Query `t` attends `k̃_i` iff `i·d + l − 1 ≤ t` (nsa-select's
//!    [`SelectConfig::num_visible_compressed`], the one place this rule is written); before the
//!    first block is complete (`t < l − 1`) the branch outputs zeros. Its probabilities are
//!    `p_cmp` `[B, S, H, Nc]` (Eq. 8), computed once by [`reference::masked_probs`].
//! 3. **Selection** (`nsa-select`, no gradient): `p_cmp` → overlap-weighted block scores for
//!    blocks of `l'` tokens (Eq. 9) → sum over the heads of a group (Eq. 10) → top-`n` blocks
//!    per (query, group) (Eq. 11)
//!    with block 0 and the `n_local` local blocks forced → int64 `[B, S, Hkv, n]`, sorted, `−1`
//!    padded. All heads of a group read the same blocks.
//! 4. **Selected branch** (Eq. 12). Query `t` attends the raw `slc` keys of its selected
//!    blocks, only those `≤ t`.
//! 5. **Sliding window.** Query `t` attends `win` keys `t − w + 1 ..= t`.
//! 6. **Gates** (Eq. 5). `g = sigmoid(W_2 SiLU(W_1 x))` `[B, S, H, 3]` (order cmp, slc, win;
//!    `gate.w1`, `gate.w2`), `o = Σ_c g_c · o_c`, output `W_o o` (`wo`). [`GateOverride`]
//!    forces gates (e.g. `Only(Branch::Selected)`).
//!
//! All attention uses the scale `1/√dk`. With `n·l' ≥ S` and the gate forced to the selected
//! branch the layer equals dense causal attention (tested).
//!
//! # Layouts
//!
//! | tensor | layout |
//! | --- | --- |
//! | input / output | `[B, S, dim]` |
//! | queries | `[B, S, H, dk]` |
//! | keys, values of a branch | `[B, S, Hkv, dk]`, `[B, S, Hkv, dv]` |
//! | compressed keys, values | `[B, Nc, Hkv, dk]`, `[B, Nc, Hkv, dv]`, `Nc = (S − l)/d + 1` (0 if `S < l`) |
//! | branch outputs | `[B, S, H, dv]` |
//! | gates | `[B, S, H, 3]` |
//! | `p_cmp` | `[B, S, H, Nc]` float32 |
//! | selected blocks | int64 `[B, S, Hkv, n]` |
//! | ranges (reference path) | int64 `[B, S, Hkv, n, 2]` |
//!
//! # Two paths, one function
//!
//! [`AttnPath::Reference`] ([`mod@reference`]) writes every branch as explicit-mask softmax over a
//! full `[S, keys]` score matrix with plain libtorch ops: easy to check, differentiable end to end,
//! O(S²) memory. The selected branch reads `nsa-select`'s merged token ranges. Use it for tests
//! and short sequences (up to a few thousand tokens).
//!
//! [`AttnPath::Lean`] ([`lean`]) never allocates anything O(S²). It calls two custom autograd
//! functions from `nsa_sys::autograd` (C++ against libtorch, ATen ops only):
//! - *span attention* (compressed branch and window): queries in chunks of [`LeanOpts`] size;
//!   each chunk reads one contiguous key span (`[0, #visible)` of the compressed keys, or
//!   `[c0 − w + 1, c1)` of the window keys) with a per-row mask;
//! - *block attention* (selected branch): per chunk, a gather of each query's `n·l'` selected
//!   keys, masked to keys `≤ t`.
//!
//! Both save only their inputs for backward. A chunk always holds whole rows (every key its
//! queries read), so backward recomputes the chunk's probabilities with exactly the forward
//! arithmetic and forms the score gradient as `p·(dp − Σ p·dp)`, the formula autograd's softmax
//! backward uses; nothing that scales with keys-per-query survives the forward pass. Selection
//! on this path computes `p_cmp` chunk by chunk (`LeanOpts::select_chunk` queries, default 1024)
//! under `no_grad` and keeps only the block ids.
//!
//! Why a custom autograd function instead of SDPA on tiles: the selected branch reads a
//! different key set per query; with autograd, every chunk's gathered keys and probabilities
//! would be saved until backward (≈ `S·Hkv·n·l'·(dk+dv)` elements: > 150 GB at 64k in bf16), and
//! SDPA with `dk ≠ dv`, GQA and an arbitrary mask is accepted only by some backends. The custom
//! function has one behaviour on CPU and CUDA, which the tests check against the reference.
//!
//! ## Memory of the lean path (one layer, forward + backward)
//!
//! With `e` bytes per element (2 for bf16) and `G = Hkv`, autograd holds between forward and
//! backward about
//!
//! `e·B·S·(2·H·dk + 4·H·dv + 3·H + dim + gate_hidden + 8·G·(dk + dv)) + 8·B·S·G·n` bytes
//!
//! (queries before and after RoPE, the three branch outputs and their gated sum, gates, the
//! input, per-branch keys/values before and after RoPE and φ's block inputs, block ids): O(S) —
//! no term in `S²`, `w`, `n·l'` or `Nc`. Backward adds gradient buffers of the same order.
//! Temporaries of one chunk of `c` queries are about `c·(G·n·l'·(dk + dv)·e + 16·H·n·l')`
//! bytes for the selected branch (gathered keys, float32 scores), `16·c·H·Nc` for the
//! compressed branch and the selection scores, `16·c_w·H·(c_w + w)` for the window.
//!
//! At the paper shape (H = 64, Hkv = 4, dk = 192, dv = 128, n·l' = 1024), dim = 1024, bf16,
//! S = 64k, `c = 256` the formula gives ≈ 9 GB. This path is about memory and exactness, not
//! speed: measured peaks and times (`nsa-train bench attn`, against dense SDPA) are in the
//! repository's BENCHMARKS.md, not here, so they cannot go stale in the docs.
//!
//! [`AttnPath::Fused`] ([`mod@fused`]) runs the selected branch on fused CUDA kernels compiled
//! at run time by NVRTC (`nsa_sys::fused`; tensor-core bf16 forward, fp32 SIMT, dQ and a
//! deterministic inverse-index dK/dV backward) and the sliding window on libtorch's
//! flash-attention kernel with its window parameters (bf16, `dk == dv`); the compressed branch,
//! selection, and anything on the CPU or in other dtypes run as on the lean path.
//! [`fused::gpu_check`] runs its parity checks against the reference path.
//!
//! Block ids handed to any path are deduplicated (a repeated id counts once) and ids outside
//! `[0, ⌊t/l'⌋]` are ignored.
//!
//! # Decoding
//!
//! [`NsaAttention::prefill`] runs the forward on a batch of (right-padded) prompts and returns an
//! [`NsaCache`]; [`NsaAttention::decode_step`] then adds one token per sequence and reads only
//! what the three branches read: the visible compressed tokens, the `n·l'` keys of the selected
//! blocks and the last `w` keys ([`StepReads`] counts them). Per branch the cache holds the raw
//! keys/values selection reads, a ring of the last `w` for the window, the emitted compressed
//! tokens and the pending raw block φ compresses next; see [`mod@decode`] for its invariants.
//! Prefill plus decode equals the full-sequence forward at every position (tested on random
//! configurations; [`decode::decode_check`] on CUDA).
//!
//! # Audit
//!
//! [`NsaAttention::audit`] reports which kernel computes each branch on a path (and what SDPA
//! would choose for the dense baseline of the same shape), for the run log.
//!
//! # Errors, not panics
//!
//! Every fallible step returns [`AttnError`]: libtorch calls go through tch's `f_` methods, and
//! the layer's linear maps are created by [`f_linear`], tch's `nn::linear` (same variables, same
//! initialisation, bit for bit) without its unwrap. Use it for your own layers too.
//!
//! # Quick start
//!
//! Add `nsa-attn` and `tch` to your crate, build the layer in your own `VarStore` (its
//! variables join your model's, so your optimizer and checkpoints cover them), and call it like
//! any module. If you use CUDA, call `nsa_sys::cuda::load_backend()` before any other libtorch
//! call: `tch` alone does not load libtorch's CUDA backend, and a CUDA query made earlier
//! (even `tch::manual_seed`) makes ATen remember "no CUDA" for the whole process.
//!
//! ```no_run
//! use nsa_attn::{AttnPath, ForwardOpts, LeanOpts, NsaAttention, NsaConfig};
//! use tch::{nn, Device, Kind, Tensor};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let backend = nsa_sys::cuda::load_backend()?; // first, before other libtorch calls
//! let device = if backend.has_gpu() { Device::Cuda(0) } else { Device::Cpu };
//! let vs = nn::VarStore::new(device);
//! // The paper's layer shape for width 1024; every field can be changed, and
//! // `NsaAttention::new` validates them all (the error names the field).
//! let attn = NsaAttention::new(&(vs.root() / "attn"), NsaConfig::paper(1024))?;
//! let x = Tensor::randn([1, 4096, 1024], (Kind::Float, device)).set_requires_grad(true);
//! let opts = ForwardOpts { path: AttnPath::Lean(LeanOpts::default()), ..Default::default() };
//! let y = attn.forward(&x, &opts)?; // [1, 4096, 1024]
//! y.sum(Kind::Float).backward(); // gradients reach x and every variable of the layer
//! # Ok(())
//! # }
//! ```
//!
//! `examples/nsa_in_your_model.rs` trains a small model with an NSA layer end to end
//! (`cargo run --release -p nsa-attn --example nsa_in_your_model`). The doc examples are
//! `no_run`: doctest binaries are linked without libtorch's library path.
#![forbid(unsafe_code)]
#![deny(rustdoc::broken_intra_doc_links)]

mod audit;
mod config;
pub mod decode;
pub mod fused;
mod gates;
mod layer;
pub mod lean;
mod linear;
mod phi;
pub mod reference;
mod rope;
pub mod selection;

pub use audit::{AttnAudit, BranchKernel};
pub use config::{AttnError, CmpRope, ConfigProblem, NsaConfig, NsaParams, Phi};
pub use decode::{DecodePlan, LayerStep, NsaCache, StepReads};
pub use gates::GateOverride;
pub use layer::{
    AttnPath, Branch, BranchOutputs, ForwardOpts, LeanOpts, NsaAttention, Projections,
};
pub use linear::f_linear;
pub use nsa_select::{SelectConfig, SelectImpl};
pub use rope::Rope;
