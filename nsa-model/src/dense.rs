//! The dense-attention baseline: projections, RoPE and causal attention through libtorch's
//! `scaled_dot_product_attention` (SDPA), with an explicit-mask twin for tests.
//!
//! Layouts: attention inputs are `q` `[B, H, S, dk]`, `k` `[B, Hkv, S, dk]`,
//! `v` `[B, Hkv, S, dv]`; the output is `[B, H, S, dv]`. Query head `j` reads KV head
//! `j / (H / Hkv)` (group-major, as SDPA's `enable_gqa` and `nsa-attn`).
use tch::nn;
use tch::{Kind, TchError, Tensor};

use crate::config::{ModelConfig, ModelError};
use crate::model::{linear, normal_linear};

/// Rotary position embedding: the one `nsa-attn` uses, so NSA and dense models place positions
/// identically (tested: with full-coverage selection the NSA model equals the dense one).
pub use nsa_attn::Rope;

/// Causal attention through SDPA (`is_causal = true`, scale `1/√dk`, no dropout), with
/// `enable_gqa` when `Hkv < H`. Shapes in the module docs.
///
/// If a backend rejects the grouped call, the KV heads are expanded with `repeat_interleave`
/// and SDPA is called again without `enable_gqa` (same result, more memory). On CPU
/// (libtorch 2.11) the grouped call with `dk ≠ dv` is accepted as is (tested); on the H100 the
/// project's runtime probe shows cuDNN taking GQA and `dk ≠ dv` directly.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor, ModelError> {
    let gqa = q.size()[1] != k.size()[1];
    match sdpa_causal(q, k, v, gqa) {
        Ok(o) => Ok(o),
        Err(_) if gqa => causal_attention_expanded(q, k, v),
        Err(e) => Err(e),
    }
}

/// [`causal_attention`]'s fallback: KV heads expanded to `H` with `repeat_interleave` (head
/// `j` gets KV head `j / (H/Hkv)`), then SDPA without `enable_gqa`.
pub fn causal_attention_expanded(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor, ModelError> {
    let (k, v) = expand_kv(q, k, v)?;
    sdpa_causal(q, &k, &v, false)
}

fn sdpa_causal(q: &Tensor, k: &Tensor, v: &Tensor, gqa: bool) -> Result<Tensor, ModelError> {
    Ok(Tensor::f_scaled_dot_product_attention(
        q,
        k,
        v,
        None::<Tensor>,
        0.0,
        true,
        None,
        gqa,
    )?)
}

/// `k`, `v` with their heads repeated to `q`'s head count (group-major).
fn expand_kv(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor), ModelError> {
    let (h, hkv) = (q.size()[1], k.size()[1]);
    if hkv == 0 || h % hkv != 0 {
        return Err(ModelError::Shape(format!(
            "attention heads: H = {h} is not a multiple of Hkv = {hkv}"
        )));
    }
    let rep = h / hkv;
    Ok((
        k.f_repeat_interleave_self_int(rep, 1, None)?,
        v.f_repeat_interleave_self_int(rep, 1, None)?,
    ))
}

/// The obviously-correct twin of [`causal_attention`]: KV heads expanded, full `[S, S]` score
/// matrix in float32, explicit causal mask, softmax, weighted sum; result in `q`'s kind.
/// O(S²) memory: tests and short sequences only.
pub fn causal_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<Tensor, ModelError> {
    let (s, dk) = (q.size()[2], q.size()[3]);
    let (k, v) = expand_kv(q, k, v)?;
    let (k, v) = (k.f_to_kind(Kind::Float)?, v.f_to_kind(Kind::Float)?);
    let scores = q
        .f_to_kind(Kind::Float)?
        .f_matmul(&k.f_transpose(2, 3)?)?
        .f_div_scalar((dk as f64).sqrt())?;
    let future = Tensor::f_ones([s, s], (Kind::Bool, q.device()))?.f_triu(1)?;
    let probs = scores
        .f_masked_fill(&future, f64::NEG_INFINITY)?
        .f_softmax(-1, Kind::Float)?;
    Ok(probs.f_matmul(&v)?.f_to_kind(q.kind())?)
}

/// Dense causal self-attention of a block: `wq`, `wk`, `wv`, `wo` (no biases), RoPE on q and k,
/// GQA, SDPA. Input and output `[B, S, D]`.
#[derive(Debug)]
pub(crate) struct DenseAttention {
    wq: nn::Linear,
    wk: nn::Linear,
    wv: nn::Linear,
    wo: nn::Linear,
    heads: i64,
    kv_heads: i64,
    dk: i64,
    dv: i64,
}

impl DenseAttention {
    /// Matrices `normal(0, std)`, `wo` `normal(0, out_std)`.
    pub(crate) fn new(
        vs: &nn::Path<'_>,
        cfg: &ModelConfig,
        std: f64,
        out_std: f64,
    ) -> Result<Self, TchError> {
        let lin = |name: &str, i: i64, o: i64, stdev: f64| normal_linear(&(vs / name), i, o, stdev);
        let (d, h, g, dk, dv) = (
            cfg.dim,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.head_dim_k,
            cfg.head_dim_v,
        );
        Ok(Self {
            wq: lin("wq", d, h * dk, std)?,
            wk: lin("wk", d, g * dk, std)?,
            wv: lin("wv", d, g * dv, std)?,
            wo: lin("wo", h * dv, d, out_std)?,
            heads: h,
            kv_heads: g,
            dk,
            dv,
        })
    }

    /// `x` `[B, S, D]` → `[B, S, D]`; `rope` has at least `S` positions.
    pub(crate) fn forward(&self, x: &Tensor, rope: &Rope) -> Result<Tensor, ModelError> {
        let (q, k, v) = self.project(x, rope)?;
        let o = causal_attention(&q, &k, &v)?;
        self.output(&o)
    }

    /// `q` `[B, H, S, dk]`, `k` `[B, Hkv, S, dk]` (both rotated by `rope`, which fixes the
    /// positions) and `v` `[B, Hkv, S, dv]` of `x` `[B, S, D]`.
    pub(crate) fn project(
        &self,
        x: &Tensor,
        rope: &Rope,
    ) -> Result<(Tensor, Tensor, Tensor), ModelError> {
        let (b, s) = (x.size()[0], x.size()[1]);
        // One matmul over the stacked `[W_q; W_k]`, rotated into tensors of their own, and one
        // for the values: SDPA saves the values' view for its backward, and a view of one
        // matmul over all three would keep the unrotated queries and keys alive with it (0.8 GB
        // of peak memory for `125m` at 8k × 4 on the H200).
        let (h, g) = (self.heads, self.kv_heads);
        let qk = x
            .f_linear::<&Tensor>(&Tensor::f_cat(&[&self.wq.ws, &self.wk.ws], 0)?, None)?
            .f_split_with_sizes([h * self.dk, g * self.dk], -1)?;
        let q = rope.apply(&qk[0].f_view([b, s, h, self.dk])?)?;
        let k = rope.apply(&qk[1].f_view([b, s, g, self.dk])?)?;
        let v = linear(&self.wv, x)?.f_view([b, s, g, self.dv])?;
        Ok((
            q.f_transpose(1, 2)?,
            k.f_transpose(1, 2)?,
            v.f_transpose(1, 2)?,
        ))
    }

    /// `W_o` of the attention output `o` `[B, H, S, dv]` → `[B, S, D]`.
    pub(crate) fn output(&self, o: &Tensor) -> Result<Tensor, ModelError> {
        let (b, s) = (o.size()[0], o.size()[2]);
        let o = o
            .f_transpose(1, 2)?
            .f_reshape([b, s, self.heads * self.dv])?;
        Ok(linear(&self.wo, &o)?)
    }
}

/// Attention of one new query per sequence over its cached keys, through SDPA (not causal: the
/// cache holds only the past and the token itself) without its cuDNN backend
/// (`nsa_sys::fused::sdpa_without_cudnn`): cuDNN builds a graph for every new shape, and a
/// decoder's cache has a new length at every step, so where libtorch picks cuDNN (as it does
/// for our training shapes on the H200) each step and layer would pay a graph build. `q` `[B, H, 1, dk]`, `k` `[B, Hkv, L, dk]`,
/// `v` `[B, Hkv, L, dv]`; `visible` bool `[B, 1, 1, L]` when the sequences hold different
/// numbers of keys (true = read), `None` when all `L` are valid. Returns `[B, H, 1, dv]`.
/// GQA as [`causal_attention`] (grouped call, expanded heads if a backend refuses it). The
/// baseline NSA's decode step is measured against.
pub fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    visible: Option<&Tensor>,
) -> Result<Tensor, ModelError> {
    let sdpa = |k: &Tensor, v: &Tensor, gqa: bool| -> Result<Tensor, ModelError> {
        Ok(nsa_sys::fused::sdpa_without_cudnn(q, k, v, visible, gqa)?)
    };
    let gqa = q.size()[1] != k.size()[1];
    match sdpa(k, v, gqa) {
        Ok(o) => Ok(o),
        Err(_) if gqa => {
            let (k, v) = expand_kv(q, k, v)?;
            sdpa(&k, &v, false)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn qkv(h: i64, hkv: i64, s: i64, dk: i64, dv: i64) -> (Tensor, Tensor, Tensor) {
        let o = (Kind::Float, Device::Cpu);
        (
            Tensor::randn([2, h, s, dk], o),
            Tensor::randn([2, hkv, s, dk], o),
            Tensor::randn([2, hkv, s, dv], o),
        )
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn sdpa_matches_the_explicit_mask_twin() {
        // MHA, GQA, and GQA with dk != dv.
        for (h, hkv, s, dk, dv) in [(4, 4, 37, 16, 16), (6, 2, 50, 8, 8), (4, 2, 29, 16, 8)] {
            let (q, k, v) = qkv(h, hkv, s, dk, dv);
            let fast = causal_attention(&q, &k, &v).unwrap();
            let expanded = causal_attention_expanded(&q, &k, &v).unwrap();
            let slow = causal_attention_reference(&q, &k, &v).unwrap();
            assert_eq!(fast.size(), [2, h, s, dv]);
            let err = max_diff(&fast, &slow);
            assert!(err < 1e-5, "H={h} Hkv={hkv} dk={dk} dv={dv}: {err}");
            let err = max_diff(&expanded, &slow);
            assert!(
                err < 1e-5,
                "expanded, H={h} Hkv={hkv} dk={dk} dv={dv}: {err}"
            );
        }
    }

    #[test]
    fn mismatched_head_counts_are_an_error() {
        let (q, k, v) = qkv(4, 3, 5, 8, 8);
        let err = causal_attention_reference(&q, &k, &v).unwrap_err();
        assert!(err.to_string().contains("H = 4"), "{err}");
        assert!(causal_attention_expanded(&q, &k, &v).is_err());
    }

    #[test]
    fn grouped_sdpa_is_accepted_on_cpu_without_expansion() {
        let (q, k, v) = qkv(4, 2, 9, 16, 8);
        let _ = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            true,
            None,
            true,
        )
        .expect("CPU SDPA takes enable_gqa with dk != dv");
    }

    #[test]
    fn query_head_j_reads_kv_head_j_over_group_size() {
        // Zero all but KV head 1: only query heads 2 and 3 (group 1 of H=4, Hkv=2) see it.
        let (q, k, _) = qkv(4, 2, 6, 8, 8);
        let v = Tensor::zeros([2, 2, 6, 8], (Kind::Float, Device::Cpu));
        let _ = v.narrow(1, 1, 1).fill_(1.0);
        let o = causal_attention(&q, &k, &v).unwrap();
        let per_head = o
            .abs()
            .sum_dim_intlist([0i64, 2, 3].as_slice(), false, Kind::Float);
        let got: Vec<f64> = Vec::<f64>::try_from(per_head).unwrap();
        assert_eq!(got[0], 0.0);
        assert_eq!(got[1], 0.0);
        assert!(got[2] > 0.0 && got[3] > 0.0, "{got:?}");
    }

    #[test]
    fn rope_preserves_norms_and_is_identity_at_position_zero() {
        let x = Tensor::randn([1, 5, 3, 8], (Kind::Float, Device::Cpu));
        let r = Rope::new(10_000.0, 8, 5, Kind::Float, Device::Cpu).unwrap();
        let y = r.apply(&x).unwrap();
        assert!(max_diff(&y.narrow(1, 0, 1), &x.narrow(1, 0, 1)) < 1e-7);
        let n = |t: &Tensor| t.square().sum_dim_intlist(-1, false, Kind::Float);
        assert!(max_diff(&n(&x), &n(&y)) < 1e-4);
        // Rotation changes positions > 0.
        assert!(max_diff(&y.narrow(1, 1, 4), &x.narrow(1, 1, 4)) > 1e-3);
    }

    #[test]
    fn rope_scores_depend_on_relative_position_only() {
        // q at position a, k at position b: the score depends on a − b only.
        let r = Rope::new(10_000.0, 8, 10, Kind::Float, Device::Cpu).unwrap();
        let q =
            Tensor::randn([1, 1, 1, 8], (Kind::Float, Device::Cpu)).expand([1, 10, 1, 8], false);
        let k =
            Tensor::randn([1, 1, 1, 8], (Kind::Float, Device::Cpu)).expand([1, 10, 1, 8], false);
        let (rq, rk) = (r.apply(&q).unwrap(), r.apply(&k).unwrap());
        let score = |a: i64, b: i64| {
            (rq.get(0).get(a) * rk.get(0).get(b))
                .sum(Kind::Float)
                .double_value(&[])
        };
        assert!((score(5, 2) - score(8, 5)).abs() < 1e-4);
        assert!((score(3, 3) - score(9, 9)).abs() < 1e-4);
    }
}
