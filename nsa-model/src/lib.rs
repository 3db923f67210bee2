//! `nsa-model`: a LLaMA-style decoder whose attention is Native Sparse Attention
//! ([`nsa_attn::NsaAttention`]) or, as the baseline, dense causal attention of the same shape.
//!
//! # Architecture
//!
//! ```text
//! tokens [B, S] int64
//!   -> embed (E, [V, D])                                   h [B, S, D]
//!   -> L × block:  h = h + attn(attn_norm(h))               attention: NSA or dense
//!                  h = h + mlp(mlp_norm(h))                 SwiGLU
//!   -> final_norm
//!   -> logits = h · Eᵀ (tied head)                          [B, S, V]
//! ```
//!
//! - **RMSNorm**: `x / sqrt(mean(x²) + ε) · w`; the statistics are computed in float32 and the
//!   result is cast back to the activations' kind before the weight multiplies it.
//! - **SwiGLU MLP**: `w_down(SiLU(w_gate x) ⊙ w_up x)`, hidden width F, no biases.
//! - **NSA attention** ([`AttentionKind::Nsa`]): `nsa_attn::NsaAttention` with the config from
//!   [`ModelConfig::nsa_config`] (H, Hkv, dk, dv and RoPE base from the model, lengths from
//!   [`NsaParams`]). Its path (reference / lean) and gate override come from the
//!   [`nsa_attn::ForwardOpts`] passed to [`Model::forward`].
//! - **Dense attention** ([`AttentionKind::Dense`]): `wq` `[H·dk, D]`, `wk` `[Hkv·dk, D]`, `wv`
//!   `[Hkv·dv, D]`, `wo` `[D, H·dv]` — the same q/k/v sizes as NSA's query and one branch's K/V —
//!   RoPE on queries and keys in NSA's convention ([`dense::Rope`]: rotate-half, θ = `rope_base`),
//!   GQA with query head `j` reading KV head `j / (H/Hkv)`, and
//!   `scaled_dot_product_attention(q, k, v, None, 0.0, is_causal = true, scale = None,
//!   enable_gqa = Hkv < H)` on `[B, heads, S, d]` tensors ([`dense::causal_attention`]; if a
//!   backend rejects the grouped call the KV heads are expanded with `repeat_interleave` and
//!   SDPA is called without `enable_gqa`. CPU accepts GQA with dk ≠ dv directly, and so does
//!   cuDNN on the H100 per the project's runtime probe). [`dense::causal_attention_reference`]
//!   is its explicit-mask twin; tests compare them. The forward options are ignored.
//!
//! With `top_n · select_len ≥ S` and the gates forced to the selected branch, an NSA model
//! whose `slc.wk/wv` hold a dense model's `wk/wv` (all other weights equal) computes the same
//! logits as the dense model (tested) — the two share RoPE, GQA grouping and scaling `1/√dk`.
//!
//! # Layouts
//!
//! | tensor | layout |
//! | --- | --- |
//! | tokens | int64 `[B, S]`, ids in `0..V`, on the model's device |
//! | hidden states | `[B, S, D]`, in the var store's float kind |
//! | dense q / k / v (inside SDPA) | `[B, H, S, dk]` / `[B, Hkv, S, dk]` / `[B, Hkv, S, dv]` |
//! | logits | `[B, S, V]`, in the var store's float kind |
//!
//! Position `t`'s logits depend on tokens `0..=t` only (both attention kinds; tested).
//!
//! # Variables
//!
//! Names as they appear in a `VarStore` (and in a safetensors file written from it), for the
//! model built under `vs.root()`:
//!
//! | name | shape | init |
//! | --- | --- | --- |
//! | `embed.weight` | `[V, D]` | normal(0, σ) |
//! | `blocks.{i}.attn_norm.weight`, `blocks.{i}.mlp_norm.weight` | `[D]` | 1 |
//! | `blocks.{i}.attn.wq.weight` | `[H·dk, D]` | normal(0, σ) |
//! | `blocks.{i}.attn.wo.weight` | `[D, H·dv]` | normal(0, σ/√(2L)) |
//! | dense: `blocks.{i}.attn.wk.weight`, `….wv.weight` | `[Hkv·dk, D]`, `[Hkv·dv, D]` | normal(0, σ) |
//! | NSA: `blocks.{i}.attn.{cmp,slc,win}.{wk,wv}.weight` (or `kv.*` with `shared_kv`) | as dense | normal(0, σ) |
//! | NSA: `blocks.{i}.attn.cmp.phi_{k,v}.*`, `….gate.w{1,2}.*` | φ and gate MLPs | matrices normal(0, σ), biases 0 (φ = `mean_mlp`: `phi_{k,v}.w2.weight` 0, so φ starts as the mean) |
//! | NSA: `blocks.{i}.attn.cmp.pos_v`, `….cmp.pos_k` (MLP φ variants) | `[l, Hkv, d]` | nsa-attn's: normal(0, 0.02) |
//! | `blocks.{i}.mlp.w_gate.weight`, `….w_up.weight` | `[F, D]` | normal(0, σ) |
//! | `blocks.{i}.mlp.w_down.weight` | `[D, F]` | normal(0, σ/√(2L)) |
//! | `final_norm.weight` | `[D]` | 1 |
//!
//! σ is [`ModelConfig::init_std`] and L is `n_layers`: every matrix and the embedding are
//! drawn from normal(0, σ), the two projections that write into the residual stream
//! (attention `wo`, MLP `w_down`) from normal(0, σ/√(2L)), norms start at 1, biases (NSA's φ
//! and gate MLPs only) at 0. nsa-attn's own variables are re-initialised this way after the
//! layer is built; its intra-block position embeddings keep nsa-attn's init. There is no
//! output matrix: the head is `embed.weight` (tied).
//!
//! [`decay_groups`] splits the variables for AdamW: weight decay on the 2-D `*.weight`
//! matrices of linear layers only; the embedding (and so the tied head), norms, biases and
//! position embeddings get none.
//!
//! # Presets
//!
//! [`ModelConfig::preset`]; all use ε = 1e-5, RoPE θ = 10000, σ = 0.02, NSA attention (set
//! [`ModelConfig::attention`] to `Dense` for the baseline; the count changes as listed).
//!
//! | preset | D | L | H / Hkv | dk = dv | F | V | NSA l, d, l', n, local, w | φ (hidden), gate hidden | parameters, NSA | parameters, dense |
//! | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
//! | `tiny` | 64 | 2 | 4 / 2 | 16 | 176 | 256 | 8, 4, 16, 4, 2, 32 | MLP (32), 16 | 147,352 | 108,864 |
//! | `small` | 384 | 6 | 6 / 2 | 64 | 1024 | 50304 | 32, 16, 64, 16, 2, 512 | MLP (64), 64 | 31,765,740 | 28,758,912 |
//! | `125m` | 768 | 12 | 12 / 4 | 64 | 2048 | 50304 | 32, 16, 64, 16, 2, 512 | MLP (64), 64 | 127,648,944 | 114,150,144 |
//! | `125m-g16` | 768 | 12 | 16 / 1 | 64 | 2048 | 50304 | 32, 16, 64, 16, 2, 512 | MLP (64), 64 | 121,612,608 | 115,329,792 |
//!
//! Of these, the embedding holds 16,384 (`tiny`), 19,316,736 (`small`) and 38,633,472
//! (`125m` and `125m-g16`). `125m-g16` has the paper's group of 16 query heads per KV head
//! (its H = 64 / Hkv = 4), where the selected branch's kernels share each key load among 16
//! heads. `tiny`'s NSA lengths are scaled down so that at S ≥ 96 every branch is active and
//! top-n really chooses (6 selection blocks for n = 4); it trains on 2 CPU cores. NSA's
//! extra parameters over dense are the two additional K/V pairs, φ, the position embeddings
//! and the gate MLP. [`ModelConfig::num_params`] gives these counts in closed form; a test
//! builds every preset with both attention kinds and compares.
//!
//! # Decoding
//!
//! [`Model::prefill`] runs the model on a batch of right-padded prompts (with their lengths) and
//! returns the logits and a [`KvCache`]; [`Model::decode_step`] then takes one token id per
//! sequence (checked on the host) and returns the logits `[B, V]` of the next one. The cache holds
//! an `nsa_attn::NsaCache` per NSA block (per-branch state: raw keys, window ring, compressed
//! tokens, pending block) and the keys and values of every position per dense block ([`DenseCache`];
//! a step is [`dense::decode_attention`], SDPA of one query). One `nsa_attn::DecodePlan` per step
//! serves every block. Prefill plus decode gives the logits of [`Model::forward`] at every
//! position (tested: fp32 against [`Model::forward_with_blocks`] with the decode's selections,
//! float64 against the plain forward).
//!
//! ```no_run
//! # use nsa_attn::ForwardOpts;
//! # use nsa_model::{Model, ModelConfig};
//! # use tch::{nn, Device, Kind, Tensor};
//! # let cfg = ModelConfig::preset("tiny")?;
//! # let vs = nn::VarStore::new(Device::Cpu);
//! # let model = Model::new(&vs.root(), &cfg)?;
//! let opts = ForwardOpts::default();
//! let prompts = Tensor::from_slice(&[5i64, 6, 7, 8, 9, 10, 0, 0]).view([2, 4]);
//! // Sequence 0 has 4 prompt tokens, sequence 1 has 2 (right-padded); room for 16 each.
//! let mut pre = model.prefill(&prompts, &[4, 2], 16, &opts)?;
//! let step = model.decode_step(&mut pre.cache, &[11, 12], &opts)?;
//! assert_eq!(step.logits.size(), [2, cfg.vocab_size]);
//! assert_eq!(pre.cache.lengths(), [5, 3]);
//! # Ok::<(), nsa_model::ModelError>(())
//! ```
//!
//! # Config files
//!
//! [`ModelConfig`] is serde (`Serialize` + `Deserialize`) with unknown keys rejected by name;
//! enums are lower case (`attention = "nsa" | "dense"`, `nsa.phi = "mean" | "linear" | "mlp" | "mean_mlp"`).
//! [`ModelConfig::validate`] reports every invalid field at once, e.g.
//! `invalid model config: n_kv_heads: must divide n_heads = 4, got 3; nsa.top_n: …`.
//! `Display` prints a one-line summary with the parameter count.
//!
//! # Quick start
//!
//! Add `nsa-model`, `nsa-attn` (for [`nsa_attn::ForwardOpts`]) and `tch` to your crate. On a
//! GPU, call `nsa_sys::cuda::load_backend()` before any other libtorch call (a CUDA query made
//! earlier makes ATen remember "no CUDA" for the whole process). `examples/tiny_decoder.rs`
//! trains the `tiny` preset and its dense baseline for a few steps
//! (`cargo run --release -p nsa-model --example tiny_decoder`).
//!
//! (`no_run`: doctest binaries are linked without libtorch's library path; the same steps
//! run in `tests/model.rs`.)
//!
//! ```no_run
//! use nsa_attn::ForwardOpts;
//! use nsa_model::{Model, ModelConfig};
//! use tch::{nn, Device, Kind, Tensor};
//!
//! let cfg = ModelConfig::preset("tiny")?;
//! println!("{cfg}"); // nsa decoder: 2 layers, dim 64, …, 147,352 parameters (0.1M)
//! let vs = nn::VarStore::new(Device::Cpu);
//! let model = Model::new(&vs.root(), &cfg)?;
//! let tokens = Tensor::randint(cfg.vocab_size, [2, 128], (Kind::Int64, Device::Cpu));
//! let logits = model.forward(&tokens, &ForwardOpts::default())?;
//! assert_eq!(logits.size(), [2, 128, cfg.vocab_size]);
//! let (decay, no_decay) = nsa_model::decay_groups(&vs);
//! assert_eq!(decay.len() + no_decay.len(), vs.trainable_variables().len());
//! # Ok::<(), nsa_model::ModelError>(())
//! ```
#![forbid(unsafe_code)]
#![deny(rustdoc::broken_intra_doc_links)]

mod config;
pub mod dense;
mod model;

pub use config::{AttentionKind, FieldError, ModelConfig, ModelError, PRESETS};
pub use model::{
    decay_groups, decode_graph_check, DecodeStep, DenseCache, KvCache, LayerInspection, Model,
    NamedVars, Prefilled, Recompute,
};
pub use nsa_attn::{CmpRope, NsaParams, Phi};
