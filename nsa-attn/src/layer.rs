//! [`NsaAttention`]: the layer's assembly (parameters, projections, output projection) and the
//! dispatch of its three branches over [`AttnPath`]. RoPE is in [`crate::rope`], compression φ
//! in [`crate::phi`], the gates in [`crate::gates`].
use nsa_select::SelectImpl;
use nsa_sys::train::NvtxRange;
use tch::nn;
use tch::{Kind, TchError, Tensor};

use crate::config::{AttnError, CmpRope, NsaConfig};
use crate::gates::{self, GateOverride, Gates};
use crate::linear::f_linear;
use crate::phi::Compression;
use crate::rope::Rope;
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
    /// On CUDA, the fused kernels (`crate::fused`): the compressed branch and selection, the
    /// selected branch, the sliding window, RoPE and the gated sum, each where it takes the
    /// dtype and shapes; whatever they do not take runs as on [`AttnPath::Lean`] with these
    /// chunk sizes (so on the CPU this path is the lean path).
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
    /// The queries, keys and values the branches attended, as the path projected them.
    pub projections: Projections,
}

/// The queries, keys and values of every branch for one input (after RoPE and compression).
#[derive(Debug)]
pub struct Projections {
    /// Queries with RoPE, `[B, S, H, dk]`.
    pub q: Tensor,
    /// Compressed keys `[B, Nc, Hkv, dk]`, `Nc = (S − l)/d + 1` or 0: φ of the rotated raw keys,
    /// or with [`CmpRope::Compressed`] φ of the unrotated ones rotated at `i·d + l − 1`.
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

impl Projections {
    /// The same tensors, shared (no copy).
    fn shallow_clone(&self) -> Projections {
        Projections {
            q: self.q.shallow_clone(),
            cmp_k: self.cmp_k.shallow_clone(),
            cmp_v: self.cmp_v.shallow_clone(),
            slc_k: self.slc_k.shallow_clone(),
            slc_v: self.slc_v.shallow_clone(),
            win_k: self.win_k.shallow_clone(),
            win_v: self.win_v.shallow_clone(),
        }
    }
}

/// Queries and raw per-projection keys/values (see [`NsaAttention::project_raw`]).
#[derive(Debug)]
pub(crate) struct RawProjections {
    /// `[B, S, H, dk]`, with RoPE.
    pub(crate) q: Tensor,
    /// `(keys [B, S, Hkv, dk] with RoPE, values [B, S, Hkv, dv])` per K/V projection pair; with
    /// [`CmpRope::Compressed`] and separate pairs, the compressed pair's keys are unrotated
    /// (φ is all that reads them).
    pub(crate) kv: Vec<(Tensor, Tensor)>,
    /// With [`CmpRope::Compressed`] and `shared_kv`: the shared keys unrotated, for φ (the
    /// other branches read `kv[0]`'s rotated keys).
    pub(crate) phi_keys: Option<Tensor>,
}

/// `l.forward(x)` through tch's fallible `f_linear`, so a libtorch error is returned, not a
/// panic.
pub(crate) fn linear(l: &nn::Linear, x: &Tensor) -> Result<Tensor, TchError> {
    x.f_linear(&l.ws, l.bs.as_ref())
}

/// One K/V projection pair.
#[derive(Debug)]
struct KvProj {
    wk: nn::Linear,
    wv: nn::Linear,
}

impl KvProj {
    fn new(vs: &nn::Path<'_>, cfg: &NsaConfig) -> Result<Self, TchError> {
        let no_bias = nn::LinearConfig {
            bias: false,
            ..Default::default()
        };
        Ok(Self {
            wk: f_linear(vs / "wk", cfg.dim, cfg.kv_heads * cfg.head_dim_k, no_bias)?,
            wv: f_linear(vs / "wv", cfg.dim, cfg.kv_heads * cfg.head_dim_v, no_bias)?,
        })
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
    /// Position embeddings and φ of the compressed branch.
    cmp: Compression,
    gates: Gates,
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
            vec![KvProj::new(&(vs / "kv"), &cfg)?]
        } else {
            ["cmp", "slc", "win"]
                .iter()
                .map(|b| KvProj::new(&(vs / *b), &cfg))
                .collect::<Result<_, _>>()?
        };
        // Variables are created in this order (it fixes their random initialisation for a
        // given seed): branch K/V, wq, the compression's, the gates', wo.
        Ok(Self {
            wq: f_linear(vs / "wq", cfg.dim, cfg.heads * cfg.head_dim_k, no_bias)?,
            kv,
            cmp: Compression::new(&(vs / "cmp"), &cfg)?,
            gates: Gates::new(&(vs / "gate"), &cfg)?,
            wo: f_linear(vs / "wo", cfg.heads * cfg.head_dim_v, cfg.dim, no_bias)?,
            cfg,
        })
    }

    /// The layer's configuration.
    pub fn config(&self) -> &NsaConfig {
        &self.cfg
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
    /// position `s` (RoPE), with libtorch's operators (as [`AttnPath::Reference`] projects).
    pub fn project(&self, x: &Tensor) -> Result<Projections, AttnError> {
        self.project_for(x, AttnPath::Reference)
    }

    /// [`NsaAttention::project`] as `path` runs it: [`AttnPath::Fused`] rotates with the fused
    /// RoPE kernel on CUDA ([`Rope::with_kernel`]); the values are the same up to float
    /// rounding.
    pub fn project_for(&self, x: &Tensor, path: AttnPath) -> Result<Projections, AttnError> {
        let (_, s) = self.check_input(x)?;
        let c = &self.cfg;
        let rope = Rope::new(c.rope_base, c.head_dim_k, s, x.kind(), x.device())?
            .with_kernel(matches!(path, AttnPath::Fused(_)))?;
        let raw = self.project_raw(x, &rope, None)?;
        self.compress_projections(&raw, matches!(path, AttnPath::Fused(_)))
    }

    /// Queries `[B, S, H, dk]` and the raw keys `[B, S, Hkv, dk]` / values `[B, S, Hkv, dv]` of
    /// each K/V projection pair (`[cmp, slc, win]`, or the one pair with `shared_kv`; index
    /// with [`NsaAttention::kv_index`]), rotated by `rope` (which fixes the positions): what
    /// [`NsaAttention::project`] compresses and the decode path (`crate::decode`) caches.
    ///
    /// One matmul over the stacked weights `[W_q; W_k…; W_v…]` (queries and keys first, so the
    /// rotated heads are one contiguous column range), split into views: `x` is read once, cast once
    /// under autocast, and its gradient comes from one matmul instead of the sum of seven.
    /// The keys and values are strided views of the stacked output.
    ///
    /// `step`: a decode step's stacked weights ([`NsaAttention::stacked_weights`], kept by the
    /// cache so that a step does not copy them). A step also rotates the queries and every
    /// rotated key in one [`Rope::apply`] over their column range (one kernel launch on CUDA
    /// instead of one per projection); its queries and keys are then strided views of that.
    pub(crate) fn project_raw(
        &self,
        x: &Tensor,
        rope: &Rope,
        step: Option<&Tensor>,
    ) -> Result<RawProjections, AttnError> {
        let (b, s) = self.check_input(x)?;
        let c = &self.cfg;
        let (h, g, dk, dv) = (c.heads, c.kv_heads, c.head_dim_k, c.head_dim_v);
        let pairs = self.kv.len();
        let mut widths = vec![h * dk];
        widths.extend(std::iter::repeat_n(g * dk, pairs));
        widths.extend(std::iter::repeat_n(g * dv, pairs));
        let stacked = match step {
            Some(weights) => x.f_linear::<&Tensor>(weights, None)?,
            None => x.f_linear::<&Tensor>(&self.stacked_weights(false)?, None)?,
        };
        let parts = stacked.f_split_with_sizes(&widths, -1)?;
        let after_phi = c.nsa.cmp_rope == CmpRope::Compressed;
        let cmp_pair = self.kv_index(Branch::Compressed);
        let only_phi_reads = |i: usize| after_phi && i == cmp_pair && !c.nsa.shared_kv;
        let heads = h + pairs as i64 * g;
        // A step with every key rotated: queries and keys in one rotation, split by heads.
        let together = match step.is_some() && !(0..pairs).any(only_phi_reads) {
            true => Some(
                rope.apply(
                    &stacked
                        .f_narrow(-1, 0, heads * dk)?
                        .f_view([b, s, heads, dk])?,
                )?,
            ),
            false => None,
        };
        let q = match &together {
            Some(all) => all.f_narrow(2, 0, h)?,
            None => rope.apply(&parts[0].f_view([b, s, h, dk])?)?,
        };
        let kv = (0..pairs)
            .map(|i| -> Result<(Tensor, Tensor), AttnError> {
                let plain = parts[1 + i].f_view([b, s, g, dk])?;
                let k = match &together {
                    Some(all) => all.f_narrow(2, h + i as i64 * g, g)?,
                    None if only_phi_reads(i) => plain,
                    None => rope.apply(&plain)?,
                };
                Ok((k, parts[1 + pairs + i].f_view([b, s, g, dv])?))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let phi_keys = match after_phi && c.nsa.shared_kv {
            true => Some(parts[1].f_view([b, s, g, dk])?),
            false => None,
        };
        Ok(RawProjections { q, kv, phi_keys })
    }

    /// The projection weights stacked as [`NsaAttention::project_raw`] multiplies them,
    /// `[W_q; W_k…; W_v…]` `[H·dk + pairs·Hkv·(dk + dv), dim]` (a copy); with `gate_rows`,
    /// the gates' `W_1` `[gate_hidden, dim]` under them (a decode step's prologue kernel).
    pub(crate) fn stacked_weights(&self, gate_rows: bool) -> Result<Tensor, AttnError> {
        Ok(Tensor::f_cat(&self.stacked_parts(gate_rows), 0)?)
    }

    /// The addresses of the weights [`NsaAttention::stacked_weights`] copies: a decode cache
    /// keeps its copy while they are unchanged (a copy made for another layer, or before the
    /// weights were replaced by new tensors, is made again).
    pub(crate) fn stacked_weights_key(&self, gate_rows: bool) -> Vec<usize> {
        self.stacked_parts(gate_rows)
            .iter()
            .map(|t| t.data_ptr() as usize)
            .collect()
    }

    fn stacked_parts(&self, gate_rows: bool) -> Vec<&Tensor> {
        let mut weights = vec![&self.wq.ws];
        weights.extend(self.kv.iter().map(|p| &p.wk.ws));
        weights.extend(self.kv.iter().map(|p| &p.wv.ws));
        if gate_rows {
            weights.push(&self.gates.linears().0.ws);
        }
        weights
    }

    /// The gate MLP's `W_1` and `W_2`.
    pub(crate) fn gate_linears(&self) -> (&nn::Linear, &nn::Linear) {
        self.gates.linears()
    }

    /// The keys and values φ compresses: the compressed branch's raw projections, rotated
    /// ([`CmpRope::Raw`]) or not ([`CmpRope::Compressed`]).
    pub(crate) fn phi_input<'a>(&self, raw: &'a RawProjections) -> (&'a Tensor, &'a Tensor) {
        let (k, v) = &raw.kv[self.kv_index(Branch::Compressed)];
        (raw.phi_keys.as_ref().unwrap_or(k), v)
    }

    /// With [`CmpRope::Compressed`], compressed keys `[B, Nc, Hkv, dk]` (token `i` at index `i`)
    /// rotated at their positions `i·d + l − 1` (with the fused kernel on CUDA with `kernel`);
    /// with [`CmpRope::Raw`] `cmp_k` as it is.
    pub(crate) fn rotate_compressed(
        &self,
        cmp_k: Tensor,
        kernel: bool,
    ) -> Result<Tensor, AttnError> {
        let c = &self.cfg;
        let nc = cmp_k.size()[1];
        if c.nsa.cmp_rope == CmpRope::Raw || nc == 0 {
            return Ok(cmp_k);
        }
        let sel = c.select_config();
        let rope = Rope::strided(
            c.rope_base,
            c.head_dim_k,
            (sel.block_len - 1, sel.stride, nc),
            cmp_k.kind(),
            cmp_k.device(),
        )?
        .with_kernel(kernel)?;
        rope.apply(&cmp_k)
    }

    /// [`Projections`] from raw ones: φ over the compressed branch's keys and values (its
    /// input blocks from the fused kernel on CUDA with `kernel`, as [`AttnPath::Fused`] runs).
    pub(crate) fn compress_projections(
        &self,
        raw: &RawProjections,
        kernel: bool,
    ) -> Result<Projections, AttnError> {
        let branch = |br: Branch| &raw.kv[self.kv_index(br)];
        let (raw_cmp_k, raw_cmp_v) = self.phi_input(raw);
        let (cmp_k, cmp_v) = self.cmp.apply(raw_cmp_k, raw_cmp_v, kernel)?;
        let cmp_k = self.rotate_compressed(cmp_k, kernel)?;
        let (slc_k, slc_v) = branch(Branch::Selected);
        let (win_k, win_v) = branch(Branch::Window);
        Ok(Projections {
            q: raw.q.shallow_clone(),
            cmp_k,
            cmp_v,
            slc_k: slc_k.shallow_clone(),
            slc_v: slc_v.shallow_clone(),
            win_k: win_k.shallow_clone(),
            win_v: win_v.shallow_clone(),
        })
    }

    /// K/V projection pairs: 3 (`[cmp, slc, win]`), or 1 with `shared_kv`.
    pub(crate) fn kv_pairs(&self) -> i64 {
        self.kv.len() as i64
    }

    /// Which entry of [`RawProjections::kv`] holds `branch`'s keys and values.
    pub(crate) fn kv_index(&self, branch: Branch) -> usize {
        if self.cfg.nsa.shared_kv {
            0
        } else {
            branch.gate_index() as usize
        }
    }

    /// The compressed branch's φ and position embeddings.
    pub(crate) fn compression(&self) -> &Compression {
        &self.cmp
    }

    /// `W_o` of the gated sum `mixed` `[B, S, H, dv]` → `[B, S, dim]`.
    pub(crate) fn output_projection(&self, mixed: &Tensor) -> Result<Tensor, AttnError> {
        let sz = mixed.size();
        let c = &self.cfg;
        Ok(linear(
            &self.wo,
            &mixed.f_reshape([sz[0], sz[1], c.heads * c.head_dim_v])?,
        )?)
    }

    /// Gates `[B, S, H, 3]` in [`Branch::ALL`] order.
    pub fn gates(&self, x: &Tensor, over: GateOverride) -> Result<Tensor, AttnError> {
        let (b, s) = self.check_input(x)?;
        self.gates.apply(x, over, (b, s, self.cfg.heads))
    }

    /// The layer output `[B, S, dim]` for `x` `[B, S, dim]`.
    pub fn forward(&self, x: &Tensor, opts: &ForwardOpts) -> Result<Tensor, AttnError> {
        Ok(self.forward_branches(x, opts)?.output)
    }

    /// The layer output together with every branch's output, the gates, the selection and the
    /// projections.
    pub fn forward_branches(
        &self,
        x: &Tensor,
        opts: &ForwardOpts,
    ) -> Result<BranchOutputs, AttnError> {
        let p = self.project_for(x, opts.path)?;
        if let AttnPath::Fused(lo) = opts.path {
            // The window branch first (see `finish`), then one kernel pass gives the compressed
            // branch and the log-sum-exp selection needs.
            check_chunk("window_chunk", lo.window_chunk)?;
            let o_win = {
                let _r = NvtxRange::new(opts.nvtx, "nsa.win");
                fused::window(&p.q, &p.win_k, &p.win_v, &self.cfg, lo.window_chunk)?
            };
            let both = {
                let _r = NvtxRange::new(opts.nvtx, "nsa.cmp+select");
                fused::compressed_and_select(&p.q, &p.cmp_k, &p.cmp_v, &self.cfg)?
            };
            let (o_cmp, blocks) = match both {
                Some((o_cmp, blocks)) => (Some(o_cmp), blocks),
                None => {
                    let _r = NvtxRange::new(opts.nvtx, "nsa.select");
                    (None, self.select(&p, opts.path, opts.select)?)
                }
            };
            return self.finish(x, &p, blocks, opts, o_cmp, Some(o_win));
        }
        let blocks = {
            let _r = NvtxRange::new(opts.nvtx, "nsa.select");
            self.select(&p, opts.path, opts.select)?
        };
        self.finish(x, &p, blocks, opts, None, None)
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
        let p = self.project_for(x, opts.path)?;
        self.finish(
            x,
            &p,
            blocks.f_to_kind(Kind::Int64)?.f_to_device(x.device())?,
            opts,
            None,
            None,
        )
    }

    /// Block selection for the projections (no gradient): from the full `p_cmp` on the
    /// reference path, chunk by chunk on the lean path, in the selection kernel (from the
    /// compressed kernel's log-sum-exp) on the fused path where it applies.
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
            AttnPath::Lean(lo) => {
                check_chunk("select_chunk", lo.select_chunk)?;
                selection::blocks_chunked(&p.q, &p.cmp_k, cfg, lo.select_chunk, imp)
            }
            AttnPath::Fused(lo) => {
                check_chunk("select_chunk", lo.select_chunk)?;
                fused::select_blocks(&p.q, &p.cmp_k, &p.cmp_v, cfg, lo.select_chunk, imp)
            }
        }
    }

    /// The branches, gates and output for a selection `blocks`; `o_cmp` and `o_win` are the
    /// compressed and window branches' outputs when the fused path already computed them.
    ///
    /// The fused path runs the window branch before the other two. Autograd runs the branches'
    /// backward nodes latest-created first, so the window's runs last, when the other branches'
    /// output gradients and saved outputs are already freed. Its flash backward has the largest
    /// temporaries (fp32 dQ accumulator, per-query-head dK/dV before the group sum: 6.4 GB at
    /// the paper shape and 64k), split by KV heads in nsa-sys's glue. The order and the split
    /// were measured together (BENCHMARKS.md, round 7: 19.3 → 14.4 GB); the order alone moved
    /// the peak to the compressed branch's cuDNN backward and raised it.
    pub(crate) fn finish(
        &self,
        x: &Tensor,
        p: &Projections,
        blocks: Tensor,
        opts: &ForwardOpts,
        o_cmp: Option<Tensor>,
        o_win: Option<Tensor>,
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
                let o_win = match o_win {
                    Some(o) => o,
                    None => {
                        let _r = range("nsa.win");
                        fused::window(&p.q, &p.win_k, &p.win_v, cfg, lo.window_chunk)?
                    }
                };
                let o_cmp = match o_cmp {
                    Some(o) => o,
                    None => {
                        let _r = range("nsa.cmp");
                        fused::compressed(&p.q, &p.cmp_k, &p.cmp_v, cfg, lo.query_chunk)?
                    }
                };
                let o_slc = {
                    let _r = range("nsa.slc");
                    fused::selected(&p.q, &p.slc_k, &p.slc_v, &blocks, cfg, lo.query_chunk)?
                };
                (o_cmp, o_slc, o_win)
            }
        };
        let _r = range("nsa.gate");
        let gates = self.gates(x, opts.gates)?;
        let output = match opts.path {
            AttnPath::Fused(_) => {
                fused::gate_mix_project(&gates, &compressed, &selected, &window, &self.wo.ws)?
            }
            _ => self.output_projection(&gates::mix(&gates, &compressed, &selected, &window)?)?,
        };
        Ok(BranchOutputs {
            compressed,
            selected,
            window,
            gates,
            blocks,
            output,
            projections: p.shallow_clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Phi;
    use tch::Device;

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
