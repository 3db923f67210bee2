//! [`NsaAttention`]: parameters, projections, RoPE, compression φ, gates and the forward pass.
use nsa_select::SelectImpl;
use nsa_sys::train::NvtxRange;
use tch::nn;
use tch::{Kind, TchError, Tensor};

use crate::config::{AttnError, NsaConfig, NsaParams, Phi};
use crate::{fused, lean, reference, selection};

/// One of NSA's three attention branches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Branch {
    /// Attention over compressed block tokens.
    Compressed,
    /// Attention over the top-n selected blocks of raw tokens.
    Selected,
    /// Attention over the last `w` tokens.
    Window,
}

impl Branch {
    /// All branches in gate order: `[Compressed, Selected, Window]`.
    pub const ALL: [Branch; 3] = [Branch::Compressed, Branch::Selected, Branch::Window];

    /// The branch's index in the gate tensor's last axis.
    pub fn gate_index(self) -> i64 {
        match self {
            Branch::Compressed => 0,
            Branch::Selected => 1,
            Branch::Window => 2,
        }
    }
}

/// How the branch outputs are mixed.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum GateOverride {
    /// The learned gates `sigmoid(MLP(x))` (training and inference).
    #[default]
    Learned,
    /// Gate 1 on one branch and 0 on the others (tests, ablations).
    Only(Branch),
    /// Constant gates `[cmp, slc, win]` for every token and head.
    Fixed([f64; 3]),
}

/// Which implementation computes the three branches. Both compute the same function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttnPath {
    /// Explicit masks and softmax over full `[S, S]` score matrices: obviously correct, O(S²)
    /// memory. For tests and short sequences.
    #[default]
    Reference,
    /// Chunked attention through the custom autograd functions of `nsa_sys::autograd`: never
    /// allocates O(S²); for long sequences and training.
    Lean(LeanOpts),
    /// The fused CUDA kernels (`crate::fused`) for the selected branch (bf16 / fp32) and the
    /// sliding window (bf16, `dk == dv`); everything else, the compressed branch and selection
    /// included, runs as on [`AttnPath::Lean`] with these chunk sizes (so on the CPU this path
    /// is the lean path).
    Fused(LeanOpts),
}

/// Chunk sizes of the lean path (queries per chunk). They trade temporary memory for launch
/// count and never change results beyond float rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeanOpts {
    /// Queries per chunk for the compressed and the selected branch.
    pub query_chunk: i64,
    /// Queries per chunk for the sliding window (each chunk reads `window_chunk + w − 1` keys).
    pub window_chunk: i64,
    /// Queries per chunk for the block selection (no gradient, nothing saved): its temporary
    /// `p_cmp` chunk is `B · select_chunk · H · Nc` floats (1 GB at 64k, H = 64, chunk 1024),
    /// and fewer, larger chunks cut the selection's launch count.
    pub select_chunk: i64,
}

impl Default for LeanOpts {
    fn default() -> Self {
        Self {
            query_chunk: 256,
            window_chunk: 512,
            select_chunk: 1024,
        }
    }
}

/// Options of one forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ForwardOpts {
    /// Reference or lean implementation.
    pub path: AttnPath,
    /// Learned or forced gates.
    pub gates: GateOverride,
    /// Which nsa-select implementation chooses the blocks and builds the ranges (both give
    /// identical results; `Reference` is the slow host loop, for comparisons).
    pub select: SelectImpl,
    /// Wrap selection and each branch in an NVTX range (`nsa.select`, `nsa.cmp`, `nsa.slc`,
    /// `nsa.win`, `nsa.gate`) for Nsight timelines. Off costs one branch per range.
    pub nvtx: bool,
}

/// The per-branch results of a forward pass (for tests and inspection).
#[derive(Debug)]
pub struct BranchOutputs {
    /// Compressed branch, `[B, S, H, dv]`, before gating.
    pub compressed: Tensor,
    /// Selected branch, `[B, S, H, dv]`, before gating.
    pub selected: Tensor,
    /// Sliding-window branch, `[B, S, H, dv]`, before gating.
    pub window: Tensor,
    /// Gates as applied, `[B, S, H, 3]` in [`Branch::ALL`] order.
    pub gates: Tensor,
    /// Selected blocks, int64 `[B, S, Hkv, n]`, sorted, `−1` padded (no gradient).
    pub blocks: Tensor,
    /// The layer output `W_o(Σ_c g_c · o_c)`, `[B, S, dim]`.
    pub output: Tensor,
}

/// The queries, keys and values of every branch for one input (after RoPE and compression).
#[derive(Debug)]
pub struct Projections {
    /// Queries with RoPE, `[B, S, H, dk]`.
    pub q: Tensor,
    /// Compressed keys `[B, Nc, Hkv, dk]` (φ of RoPE'd raw keys), `Nc = (S − l)/d + 1` or 0.
    pub cmp_k: Tensor,
    /// Compressed values `[B, Nc, Hkv, dv]`.
    pub cmp_v: Tensor,
    /// Selected-branch keys with RoPE, `[B, S, Hkv, dk]`.
    pub slc_k: Tensor,
    /// Selected-branch values `[B, S, Hkv, dv]`.
    pub slc_v: Tensor,
    /// Window keys with RoPE, `[B, S, Hkv, dk]`.
    pub win_k: Tensor,
    /// Window values `[B, S, Hkv, dv]`.
    pub win_v: Tensor,
}

/// φ applied to one of keys or values.
#[derive(Debug)]
enum PhiMap {
    Mean,
    Linear(nn::Linear),
    Mlp(nn::Linear, nn::Linear),
}

impl PhiMap {
    /// `output_bias`: whether the last linear map has a bias. Keys get none: a bias shifts every
    /// compressed key by the same vector, which adds the same `q·b` to all scores of a row and
    /// cancels in the softmax (its gradient is identically zero).
    fn new(vs: &nn::Path<'_>, nsa: &NsaParams, width: i64, output_bias: bool) -> Self {
        let block_len = nsa.select.block_len;
        let last = nn::LinearConfig {
            bias: output_bias,
            ..Default::default()
        };
        match nsa.phi {
            Phi::Mean => PhiMap::Mean,
            Phi::Linear => PhiMap::Linear(nn::linear(vs, block_len * width, width, last)),
            Phi::Mlp => PhiMap::Mlp(
                nn::linear(
                    vs / "w1",
                    block_len * width,
                    nsa.phi_hidden,
                    Default::default(),
                ),
                nn::linear(vs / "w2", nsa.phi_hidden, width, last),
            ),
        }
    }

    /// `blocks` `[B, Nc, l, G, d]` → `[B, Nc, G, d]` (φ of Eq. 7).
    fn apply(&self, blocks: &Tensor) -> Result<Tensor, TchError> {
        let flat = || {
            let s = blocks.size();
            blocks
                .f_permute([0, 1, 3, 2, 4])?
                .f_reshape([s[0], s[1], s[3], s[2] * s[4]])
        };
        match self {
            PhiMap::Mean => blocks.f_mean_dim(2, false, None),
            PhiMap::Linear(w) => linear(w, &flat()?),
            PhiMap::Mlp(w1, w2) => linear(w2, &linear(w1, &flat()?)?.f_gelu("none")?),
        }
    }
}

/// `l.forward(x)` through tch's fallible `f_linear`, so a libtorch error is returned, not a
/// panic.
fn linear(l: &nn::Linear, x: &Tensor) -> Result<Tensor, TchError> {
    x.f_linear(&l.ws, l.bs.as_ref())
}

/// One K/V projection pair.
#[derive(Debug)]
struct KvProj {
    wk: nn::Linear,
    wv: nn::Linear,
}

impl KvProj {
    fn new(vs: &nn::Path<'_>, cfg: &NsaConfig) -> Self {
        let no_bias = nn::LinearConfig {
            bias: false,
            ..Default::default()
        };
        Self {
            wk: nn::linear(vs / "wk", cfg.dim, cfg.kv_heads * cfg.head_dim_k, no_bias),
            wv: nn::linear(vs / "wv", cfg.dim, cfg.kv_heads * cfg.head_dim_v, no_bias),
        }
    }
}

/// Native Sparse Attention layer: `[B, S, dim] → [B, S, dim]`.
///
/// Parameters (under the `nn::Path` given to [`NsaAttention::new`]): `wq.weight`,
/// `{cmp,slc,win}.{wk,wv}.weight` (or `kv.{wk,wv}.weight` with `shared_kv`), `cmp.pos_v`
/// and, with the MLP φ, `cmp.pos_k` (intra-block position embeddings `[l, Hkv, d]`), `cmp.phi_k.*`, `cmp.phi_v.*`
/// (φ's weights for the linear and MLP variants), `gate.w1.*`, `gate.w2.*`, `wo.weight`.
#[derive(Debug)]
pub struct NsaAttention {
    cfg: NsaConfig,
    wq: nn::Linear,
    /// `[cmp, slc, win]`, or one shared pair.
    kv: Vec<KvProj>,
    /// Key-side position embedding; only with the MLP φ (see [`Phi`]).
    pos_k: Option<Tensor>,
    pos_v: Tensor,
    phi_k: PhiMap,
    phi_v: PhiMap,
    gate_w1: nn::Linear,
    gate_w2: nn::Linear,
    wo: nn::Linear,
}

impl NsaAttention {
    /// Creates the layer's parameters under `vs` (e.g. `vs.root() / "attn"`).
    pub fn new(vs: &nn::Path<'_>, cfg: NsaConfig) -> Result<Self, AttnError> {
        cfg.validate()?;
        let no_bias = nn::LinearConfig {
            bias: false,
            ..Default::default()
        };
        let kv = if cfg.nsa.shared_kv {
            vec![KvProj::new(&(vs / "kv"), &cfg)]
        } else {
            ["cmp", "slc", "win"]
                .iter()
                .map(|b| KvProj::new(&(vs / *b), &cfg))
                .collect()
        };
        let cmp = vs / "cmp";
        let pos_init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let (l, g) = (cfg.nsa.select.block_len, cfg.kv_heads);
        Ok(Self {
            wq: nn::linear(vs / "wq", cfg.dim, cfg.heads * cfg.head_dim_k, no_bias),
            kv,
            // With mean or linear φ a key-side embedding would only shift all compressed keys
            // alike, which cancels in the softmax: it is created for the MLP φ only.
            pos_k: (cfg.nsa.phi == Phi::Mlp)
                .then(|| cmp.f_var("pos_k", &[l, g, cfg.head_dim_k], pos_init))
                .transpose()?,
            pos_v: cmp.f_var("pos_v", &[l, g, cfg.head_dim_v], pos_init)?,
            phi_k: PhiMap::new(&(&cmp / "phi_k"), &cfg.nsa, cfg.head_dim_k, false),
            phi_v: PhiMap::new(&(&cmp / "phi_v"), &cfg.nsa, cfg.head_dim_v, true),
            gate_w1: nn::linear(
                vs / "gate" / "w1",
                cfg.dim,
                cfg.nsa.gate_hidden,
                Default::default(),
            ),
            gate_w2: nn::linear(
                vs / "gate" / "w2",
                cfg.nsa.gate_hidden,
                3 * cfg.heads,
                Default::default(),
            ),
            wo: nn::linear(vs / "wo", cfg.heads * cfg.head_dim_v, cfg.dim, no_bias),
            cfg,
        })
    }

    /// The layer's configuration.
    pub fn config(&self) -> &NsaConfig {
        &self.cfg
    }

    fn kv_proj(&self, branch: Branch) -> &KvProj {
        if self.cfg.nsa.shared_kv {
            &self.kv[0]
        } else {
            &self.kv[branch.gate_index() as usize]
        }
    }

    fn check_input(&self, x: &Tensor) -> Result<(i64, i64), AttnError> {
        match x.size().as_slice() {
            &[b, s, d] if d == self.cfg.dim && s > 0 => Ok((b, s)),
            got => Err(AttnError::Shape {
                what: "x",
                expected: format!("[B, S > 0, dim = {}]", self.cfg.dim),
                got: got.to_vec(),
            }),
        }
    }

    /// Queries, keys and values of all branches for `x` `[B, S, dim]`, token `s` at absolute
    /// position `s` (RoPE).
    pub fn project(&self, x: &Tensor) -> Result<Projections, AttnError> {
        let (b, s) = self.check_input(x)?;
        let c = &self.cfg;
        let (h, g, dk, dv) = (c.heads, c.kv_heads, c.head_dim_k, c.head_dim_v);
        let rope = Rope::new(c.rope_base, dk, s, x.kind(), x.device())?;
        let q = rope.apply(&linear(&self.wq, x)?.f_view([b, s, h, dk])?)?;
        let keys = |br: Branch| -> Result<(Tensor, Tensor), AttnError> {
            let p = self.kv_proj(br);
            let k = rope.apply(&linear(&p.wk, x)?.f_view([b, s, g, dk])?)?;
            Ok((k, linear(&p.wv, x)?.f_view([b, s, g, dv])?))
        };
        let (raw_cmp_k, raw_cmp_v) = keys(Branch::Compressed)?;
        let (slc_k, slc_v) = keys(Branch::Selected)?;
        let (win_k, win_v) = keys(Branch::Window)?;
        let cmp_k = self.compress(&raw_cmp_k, self.pos_k.as_ref(), &self.phi_k)?;
        let cmp_v = self.compress(&raw_cmp_v, Some(&self.pos_v), &self.phi_v)?;
        Ok(Projections {
            q,
            cmp_k,
            cmp_v,
            slc_k,
            slc_v,
            win_k,
            win_v,
        })
    }

    /// φ over the blocks `[i·d, i·d + l)` of `raw` `[B, S, G, d]` → `[B, Nc, G, d]`.
    fn compress(
        &self,
        raw: &Tensor,
        pos: Option<&Tensor>,
        phi: &PhiMap,
    ) -> Result<Tensor, AttnError> {
        let sz = raw.size();
        let (b, s, g, d) = (sz[0], sz[1], sz[2], sz[3]);
        let sel = &self.cfg.nsa.select;
        let (l, stride) = (sel.block_len, sel.stride);
        let blocks = if s < l {
            // No complete block yet: an empty [B, 0, l, G, d] that still flows through φ, so
            // every parameter gets a (zero) gradient rather than none.
            raw.f_narrow(1, 0, 0)?
                .f_unsqueeze(2)?
                .f_expand([b, 0, l, g, d], false)?
        } else {
            // unfold: [B, Nc, G, d, l] -> [B, Nc, l, G, d]
            raw.f_unfold(1, l, stride)?.f_permute([0, 1, 4, 2, 3])?
        };
        let blocks = match pos {
            Some(pos) => blocks.f_add(&pos.f_to_kind(raw.kind())?)?,
            None => blocks,
        };
        Ok(phi.apply(&blocks)?)
    }

    /// Gates `[B, S, H, 3]` in [`Branch::ALL`] order.
    pub fn gates(&self, x: &Tensor, over: GateOverride) -> Result<Tensor, AttnError> {
        let (b, s) = self.check_input(x)?;
        let h = self.cfg.heads;
        let constant = |vals: [f64; 3]| {
            Tensor::f_from_slice(&vals)?
                .f_to_kind(x.kind())?
                .f_to_device(x.device())?
                .f_expand([b, s, h, 3], false)
        };
        Ok(match over {
            GateOverride::Learned => {
                let hidden = linear(&self.gate_w1, x)?.f_silu()?;
                // heads-major: the gate of (head, branch) is output head * 3 + branch.
                linear(&self.gate_w2, &hidden)?
                    .f_sigmoid()?
                    .f_view([b, s, h, 3])?
            }
            GateOverride::Only(br) => {
                let mut vals = [0.0; 3];
                vals[br.gate_index() as usize] = 1.0;
                constant(vals)?
            }
            GateOverride::Fixed(vals) => constant(vals)?,
        })
    }

    /// The layer output `[B, S, dim]` for `x` `[B, S, dim]`.
    pub fn forward(&self, x: &Tensor, opts: &ForwardOpts) -> Result<Tensor, AttnError> {
        Ok(self.forward_branches(x, opts)?.output)
    }

    /// The layer output together with every branch's output, the gates and the selection.
    pub fn forward_branches(
        &self,
        x: &Tensor,
        opts: &ForwardOpts,
    ) -> Result<BranchOutputs, AttnError> {
        let p = self.project(x)?;
        let blocks = {
            let _r = NvtxRange::new(opts.nvtx, "nsa.select");
            self.select(&p, opts.path, opts.select)?
        };
        self.finish(x, &p, blocks, opts)
    }

    /// Like [`NsaAttention::forward_branches`] with a given selection `blocks`
    /// (int64 `[B, S, Hkv, n]`, sorted, `−1` padded, as `nsa-select` returns) instead of
    /// selecting from the compressed scores: for comparing paths with identical discrete
    /// choices, and for callers that select themselves.
    pub fn forward_branches_with_blocks(
        &self,
        x: &Tensor,
        blocks: &Tensor,
        opts: &ForwardOpts,
    ) -> Result<BranchOutputs, AttnError> {
        let (b, s) = self.check_input(x)?;
        let want = [b, s, self.cfg.kv_heads, self.cfg.nsa.select.top_n];
        if blocks.size() != want {
            return Err(AttnError::Shape {
                what: "blocks",
                expected: format!("{want:?}"),
                got: blocks.size(),
            });
        }
        let p = self.project(x)?;
        self.finish(
            x,
            &p,
            blocks.f_to_kind(Kind::Int64)?.f_to_device(x.device())?,
            opts,
        )
    }

    /// Block selection for the projections (no gradient): from the full `p_cmp` on the
    /// reference path, chunk by chunk on the lean path.
    pub fn select(
        &self,
        p: &Projections,
        path: AttnPath,
        imp: SelectImpl,
    ) -> Result<Tensor, AttnError> {
        let cfg = &self.cfg;
        let _no_grad = tch::no_grad_guard();
        match path {
            AttnPath::Reference => {
                let (_, p_cmp) = reference::compressed(&p.q, &p.cmp_k, &p.cmp_v, cfg)?;
                selection::blocks_from_probs(&p_cmp, 0, p.q.size()[1], cfg, imp)
            }
            AttnPath::Lean(lo) | AttnPath::Fused(lo) => {
                check_chunk("select_chunk", lo.select_chunk)?;
                selection::blocks_chunked(&p.q, &p.cmp_k, cfg, lo.select_chunk, imp)
            }
        }
    }

    fn finish(
        &self,
        x: &Tensor,
        p: &Projections,
        blocks: Tensor,
        opts: &ForwardOpts,
    ) -> Result<BranchOutputs, AttnError> {
        let cfg = &self.cfg;
        let range = |name| NvtxRange::new(opts.nvtx, name);
        let (compressed, selected, window) = match opts.path {
            AttnPath::Reference => {
                let _r = range("nsa.cmp");
                let (o_cmp, _) = reference::compressed(&p.q, &p.cmp_k, &p.cmp_v, cfg)?;
                drop(_r);
                let _r = range("nsa.slc");
                let ranges = selection::ranges(&blocks, 0, cfg, opts.select)?;
                let o_slc = reference::selected(&p.q, &p.slc_k, &p.slc_v, &ranges)?;
                drop(_r);
                let _r = range("nsa.win");
                let o_win = reference::window(&p.q, &p.win_k, &p.win_v, cfg.nsa.window)?;
                (o_cmp, o_slc, o_win)
            }
            AttnPath::Lean(lo) => {
                check_chunk("query_chunk", lo.query_chunk)?;
                check_chunk("window_chunk", lo.window_chunk)?;
                let o_cmp = {
                    let _r = range("nsa.cmp");
                    lean::compressed(&p.q, &p.cmp_k, &p.cmp_v, cfg, lo.query_chunk)?
                };
                let o_slc = {
                    let _r = range("nsa.slc");
                    lean::selected(&p.q, &p.slc_k, &p.slc_v, &blocks, cfg, lo.query_chunk)?
                };
                let _r = range("nsa.win");
                let o_win = lean::window(&p.q, &p.win_k, &p.win_v, cfg, lo.window_chunk)?;
                (o_cmp, o_slc, o_win)
            }
            AttnPath::Fused(lo) => {
                check_chunk("query_chunk", lo.query_chunk)?;
                check_chunk("window_chunk", lo.window_chunk)?;
                let o_cmp = {
                    let _r = range("nsa.cmp");
                    lean::compressed(&p.q, &p.cmp_k, &p.cmp_v, cfg, lo.query_chunk)?
                };
                let o_slc = {
                    let _r = range("nsa.slc");
                    fused::selected(&p.q, &p.slc_k, &p.slc_v, &blocks, cfg, lo.query_chunk)?
                };
                let _r = range("nsa.win");
                let o_win = fused::window(&p.q, &p.win_k, &p.win_v, cfg, lo.window_chunk)?;
                (o_cmp, o_slc, o_win)
            }
        };
        let _r = range("nsa.gate");
        let gates = self.gates(x, opts.gates)?;
        let g = |br: Branch| gates.f_narrow(3, br.gate_index(), 1);
        // o = Σ_c g_c · o_c (Eq. 5)
        let mixed = compressed
            .f_mul(&g(Branch::Compressed)?)?
            .f_add(&selected.f_mul(&g(Branch::Selected)?)?)?
            .f_add(&window.f_mul(&g(Branch::Window)?)?)?;
        let sz = x.size();
        let output = linear(
            &self.wo,
            &mixed.f_reshape([sz[0], sz[1], cfg.heads * cfg.head_dim_v])?,
        )?;
        Ok(BranchOutputs {
            compressed,
            selected,
            window,
            gates,
            blocks,
            output,
        })
    }
}

fn check_chunk(option: &'static str, value: i64) -> Result<(), AttnError> {
    if value > 0 {
        Ok(())
    } else {
        Err(AttnError::Option {
            option,
            reason: format!("must be positive, got {value}"),
        })
    }
}

/// Rotary position embedding, rotate-half form, for positions `0..S` over head dim `dk`: pair
/// `(i, i + dk/2)` of a head at position `s` is rotated by `s · base^(−2i/dk)`. Computed in
/// float64 and stored in the activations' kind. Shared with `nsa-model`'s dense baseline, so
/// NSA and dense models place positions identically.
#[derive(Debug)]
pub struct Rope {
    /// `[S, 1, dk/2]`
    cos: Tensor,
    /// `[S, 1, dk/2]`
    sin: Tensor,
}

impl Rope {
    /// Tables for `s` positions.
    pub fn new(
        base: f64,
        dk: i64,
        s: i64,
        kind: Kind,
        device: tch::Device,
    ) -> Result<Self, TchError> {
        let half = dk / 2;
        let inv_freq = Tensor::f_arange(half, (Kind::Double, device))?
            .f_mul_scalar(-2.0 * base.ln() / dk as f64)?
            .f_exp()?;
        let angles = Tensor::f_arange(s, (Kind::Double, device))?
            .f_outer(&inv_freq)?
            .f_unsqueeze(1)?;
        Ok(Self {
            cos: angles.f_cos()?.f_to_kind(kind)?,
            sin: angles.f_sin()?.f_to_kind(kind)?,
        })
    }

    /// `x` `[B, S, heads, dk]` → the same shape, rotated by position.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        let half = x.size().get(3).copied().unwrap_or(0) / 2;
        let x1 = x.f_narrow(3, 0, half)?;
        let x2 = x.f_narrow(3, half, half)?;
        Tensor::f_cat(
            &[
                x1.f_mul(&self.cos)?.f_sub(&x2.f_mul(&self.sin)?)?,
                x2.f_mul(&self.cos)?.f_add(&x1.f_mul(&self.sin)?)?,
            ],
            3,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn rope_is_identity_at_zero_preserves_norms_and_sees_only_offsets() {
        let (s, dk) = (9, 8);
        let rope = Rope::new(10_000.0, dk, s, Kind::Double, Device::Cpu).unwrap();
        let q =
            Tensor::randn([1, 1, 1, dk], (Kind::Double, Device::Cpu)).expand([1, s, 1, dk], false);
        let k =
            Tensor::randn([1, 1, 1, dk], (Kind::Double, Device::Cpu)).expand([1, s, 1, dk], false);
        let (rq, rk) = (rope.apply(&q).unwrap(), rope.apply(&k).unwrap());
        let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
        assert!(
            diff(&rq.narrow(1, 0, 1), &q.narrow(1, 0, 1)) < 1e-12,
            "position 0 is unrotated"
        );
        assert!(
            diff(
                &rq.square().sum_dim_intlist(-1, false, None),
                &q.square().sum_dim_intlist(-1, false, None)
            ) < 1e-10
        );
        // <R_m q, R_n k> depends on m − n only.
        let dot = |m: i64, n: i64| {
            (rq.get(0).get(m) * rk.get(0).get(n))
                .sum(Kind::Double)
                .double_value(&[])
        };
        assert!((dot(5, 2) - dot(7, 4)).abs() < 1e-10);
        assert!((dot(3, 3) - dot(0, 0)).abs() < 1e-10);
        assert!(
            (dot(5, 2) - dot(4, 2)).abs() > 1e-6,
            "different offsets differ"
        );
    }

    #[test]
    fn forced_gates_are_one_hot_and_learned_gates_are_probabilities() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = NsaConfig {
            heads: 4,
            kv_heads: 2,
            head_dim_k: 4,
            head_dim_v: 2,
            ..NsaConfig::paper(6)
        };
        assert_eq!(cfg.nsa.phi, Phi::Mlp);
        let attn = NsaAttention::new(&vs.root(), cfg).unwrap();
        let x = Tensor::randn([2, 3, 6], (Kind::Float, Device::Cpu));
        let g = attn.gates(&x, GateOverride::Only(Branch::Window)).unwrap();
        assert_eq!(g.size(), [2, 3, 4, 3]);
        let want = Tensor::from_slice(&[0.0f32, 0.0, 1.0]);
        assert!(g.eq_tensor(&want).all().int64_value(&[]) == 1);
        let g = attn.gates(&x, GateOverride::Learned).unwrap();
        assert!(g.gt(0.0).logical_and(&g.lt(1.0)).all().int64_value(&[]) == 1);
        assert!(
            attn.forward(&x.narrow(2, 0, 5), &ForwardOpts::default())
                .is_err(),
            "wrong dim"
        );
        let bad = ForwardOpts {
            path: AttnPath::Lean(LeanOpts {
                query_chunk: 0,
                window_chunk: 4,
                select_chunk: 4,
            }),
            ..Default::default()
        };
        assert!(matches!(
            attn.forward(&x, &bad),
            Err(AttnError::Option {
                option: "query_chunk",
                ..
            })
        ));
    }
}
