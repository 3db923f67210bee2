//! `bench branches`: the selected, sliding-window and compressed branches alone, fused kernels
//! against the lean path, forward and forward + backward, with achieved TFLOP/s and GB/s. The
//! selected branch is timed with the forward and dQ the library picks (`SelectedForward::Auto`,
//! `SelectedDq::Auto`), with each tensor-core forward forced (union tiles, key-outer, token
//! warps; dQ as picked for it) and with the query-outer dQ forced; the window with the kernels
//! the library picks (the wgmma forward and backward on Hopper), with flash's backward forced
//! (`with_window_kernels(None, Some(false), ..)`) and with flash's both ways; the compressed
//! branch on both backends (cuDNN over folded queries, the default, and the NVRTC kernels).
//!
//! Shapes: the paper's attention (H = 64, Hkv = 4, G = 16, dk = 192, dv = 128, l' = 64, n = 16,
//! w = 512) and the `125m` preset's (G = 3). Inputs: q, k, v random in bf16; the block ids are
//! those the NSA layer itself selects (nsa-select on the layer's own compressed attention, random
//! weights), so the forced first, current and local blocks are shared the way they are in
//! training.
//!
//! Work counted: "pairs" are (query, key, head) triples actually attended (duplicates and ids
//! beyond ⌊t/l'⌋ dropped, keys > t masked); forward FLOPs = pairs · 2 (dk + dv), backward FLOPs
//! = pairs · (6 dk + 4 dv) (the design notes' kernel budget sheet). Bytes: the K/V rows a
//! (token, group) reads — each once for all G heads (group-centric loads) — plus q and the
//! output; those gathers are what bounds the selected branch. The compressed branch reads the
//! first Nc rows of the random k and v as its compressed keys and values (pairs: the compressed
//! tokens each query sees, Eq. 7).
//! Each cell: median of `--repeats` runs after one warm-up, with min and max; the device is
//! synchronised around every run. Forward + backward hands autograd a random gradient for the
//! output (since round 35; rounds up to 34 timed the backward of `Σ out · grad`, whose product
//! and sum added their own passes over the output).
use std::path::PathBuf;

use nsa_attn::{fused, lean, AttnPath, ForwardOpts, LeanOpts, NsaAttention, NsaConfig};
use tch::{nn, Device, Kind, Tensor};

use crate::{time_runs, BenchError, Timing};

type Result<T, E = BenchError> = std::result::Result<T, E>;

/// `bench branches`'s flags.
#[derive(Debug, clap::Args)]
pub struct BranchBenchArgs {
    /// Sequence lengths, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [8192, 16384, 32768, 65536, 131072])]
    seq: Vec<i64>,
    /// Shapes: `paper` (G = 16) and/or `125m` (G = 3), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = ["paper".to_string(), "125m".to_string()])]
    shape: Vec<String>,
    /// Branches: `selected`, `window` and/or `compressed`, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = ["selected".to_string(), "window".to_string(), "compressed".to_string()])]
    branch: Vec<String>,
    /// Sequences per call (the training shapes: `125m` at 8k trains 4 a step).
    #[arg(long, default_value_t = 1)]
    batch: i64,
    /// Timed runs per cell after one warm-up run.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Append the Markdown table to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The NSA configuration of a benchmark shape: `paper` (G = 16) or `125m` (G = 3).
pub fn shape_config(name: &str) -> Result<NsaConfig> {
    Ok(match name {
        "paper" => NsaConfig::paper(1024),
        "125m" => nsa_model::ModelConfig::preset("125m")?.nsa_config(),
        other => {
            return Err(BenchError::Flag(format!(
                "--shape must be paper or 125m (got {other:?})"
            )))
        }
    })
}

/// (query, key) pairs per group the selected branch attends: distinct valid ids, keys ≤ t.
fn selected_pairs(blocks: &Tensor, block_len: i64) -> Result<f64> {
    let s = blocks.size()[1];
    let (sorted, _) = blocks.f_sort(-1, false)?;
    let n = sorted.size()[3];
    let first = sorted
        .f_narrow(3, 0, 1)?
        .f_ones_like()?
        .f_to_kind(Kind::Bool)?;
    let distinct = Tensor::f_cat(
        &[
            first,
            sorted
                .f_narrow(3, 1, n - 1)?
                .f_ne_tensor(&sorted.f_narrow(3, 0, n - 1)?)?,
        ],
        3,
    )?;
    let t = Tensor::f_arange(s, (Kind::Int64, blocks.device()))?.f_view([1, s, 1, 1])?;
    let keys = t
        .f_add_scalar(1)?
        .f_sub(&sorted.f_mul_scalar(block_len)?)?
        .f_clamp(0, block_len)?;
    let valid = sorted.f_ge(0)?.f_logical_and(&distinct)?;
    Ok(keys
        .f_mul(&valid)?
        .f_sum(Kind::Double)?
        .f_double_value(&[])?)
}

struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grad: Tensor,
}

fn inputs(cfg: &NsaConfig, b: i64, s: i64, dev: Device) -> Result<Inputs> {
    let opt = (Kind::BFloat16, dev);
    let q = Tensor::f_randn([b, s, cfg.heads, cfg.head_dim_k], opt)?;
    let k = Tensor::f_randn([b, s, cfg.kv_heads, cfg.head_dim_k], opt)?;
    let v = Tensor::f_randn([b, s, cfg.kv_heads, cfg.head_dim_v], opt)?;
    let grad = Tensor::f_randn([b, s, cfg.heads, cfg.head_dim_v], opt)?;
    Ok(Inputs { q, k, v, grad })
}

/// Forward, and forward + backward from `out` with gradient `grad` to q, k and v (handed to
/// autograd as the output's gradient: no loss of the benchmark's own, whose product and sum
/// over `[B, S, H, dv]` and their backward would count as the branch's time).
fn fwd_and_bwd(
    x: &Inputs,
    repeats: usize,
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<(Timing, Timing)> {
    let dev = x.q.device();
    let (fwd, ()) = time_runs(dev, repeats, true, || {
        let _g = tch::no_grad_guard();
        f(&x.q, &x.k, &x.v).map(drop)
    })?;
    let (both, ()) = time_runs(dev, repeats, true, || {
        let (q, k, v) = (
            x.q.f_detach()?.f_set_requires_grad(true)?,
            x.k.f_detach()?.f_set_requires_grad(true)?,
            x.v.f_detach()?.f_set_requires_grad(true)?,
        );
        let out = f(&q, &k, &v)?;
        nsa_sys::autograd::backward(&[&out], &[&x.grad])?;
        Ok(())
    })?;
    Ok((fwd, both))
}

/// Runs the benchmark on `cuda:0` and prints its table (appended to `--out` when given); an
/// error without a GPU (after the flags are checked, so a bad flag is named on any machine).
pub fn run(a: BranchBenchArgs) -> Result<()> {
    if !a.seq.iter().all(|&s| s >= 2) {
        return Err(BenchError::Flag("--seq: lengths must be at least 2".into()));
    }
    if a.batch < 1 {
        return Err(BenchError::Flag("--batch must be at least 1".into()));
    }
    if let Some(b) = a
        .branch
        .iter()
        .find(|b| !["selected", "window", "compressed"].contains(&b.as_str()))
    {
        return Err(BenchError::Flag(format!(
            "--branch must be selected, window or compressed (got {b:?})"
        )));
    }
    let shapes = a
        .shape
        .iter()
        .map(|name| Ok((name, shape_config(name)?)))
        .collect::<Result<Vec<_>>>()?;
    let backend = nsa_sys::cuda::load_backend()?;
    if !backend.has_gpu() {
        return Err(BenchError::Unavailable(
            "bench branches times the fused CUDA kernels: it needs a GPU".into(),
        ));
    }
    let b = a.batch;
    let dev = Device::Cuda(0);
    let mut table = format!(
        "Device: {}. Batch {}. Cells: ms, median (min–max) of {} runs. TFLOP/s and GB/s from the median.\n\n| shape | S | branch | path | fwd ms | fwd+bwd ms | fwd TFLOP/s | bwd TFLOP/s | fwd GB/s |\n| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |\n",
        crate::device_description(dev),
        b,
        a.repeats
    );
    for (shape, cfg) in shapes {
        let (dk, dv) = (cfg.head_dim_k as f64, cfg.head_dim_v as f64);
        let h = (cfg.heads / cfg.kv_heads) as f64;
        for &s in &a.seq {
            tch::manual_seed(0);
            // The layer's own selection for this length.
            let blocks = {
                let _g = tch::no_grad_guard();
                let vs = nn::VarStore::new(dev);
                let layer = NsaAttention::new(&(vs.root() / "attn"), cfg)?;
                let x = Tensor::f_randn([b, s, cfg.dim], (Kind::Float, dev))?;
                let opts = ForwardOpts {
                    path: AttnPath::Lean(LeanOpts::default()),
                    ..Default::default()
                };
                layer.forward_branches(&x, &opts)?.blocks
            };
            let x = inputs(&cfg, b, s, dev)?;
            let slc_pairs = selected_pairs(&blocks, cfg.nsa.select.select_len)? * h;
            let win_pairs: f64 = (0..s)
                .map(|t| (t + 1).min(cfg.nsa.window) as f64)
                .sum::<f64>()
                * (b * cfg.heads) as f64;
            let chunk = LeanOpts::default().query_chunk;
            let wchunk = LeanOpts::default().window_chunk;
            // The compressed branch reads the first Nc rows of k and v as its compressed keys.
            let sel = cfg.select_config();
            let nc = sel.num_compressed(s).max(1);
            let cmp_pairs: f64 = (0..s)
                .map(|t| sel.num_visible_compressed(t) as f64)
                .sum::<f64>()
                * (b * cfg.heads) as f64;
            let scale = 1.0 / (cfg.head_dim_k as f64).sqrt();
            let l_sel = cfg.nsa.select.select_len;
            type Branch<'a> = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + 'a>;
            let blocks = &blocks;
            use nsa_sys::fused::{SelectedDq, SelectedForward};
            let selected_with = |fwd: SelectedForward, dq: SelectedDq| -> Branch<'_> {
                Box::new(move |q, k, v| {
                    Ok(nsa_sys::fused::selected_attention_with(
                        q, k, v, blocks, l_sel, scale, fwd, dq,
                    )
                    .map_err(nsa_attn::AttnError::Fused)?)
                })
            };
            let rows: [(&str, &str, f64, Branch<'_>); 13] = [
                (
                    "selected",
                    "fused (auto fwd)",
                    slc_pairs,
                    Box::new(|q, k, v| Ok(fused::selected(q, k, v, blocks, &cfg, chunk)?)),
                ),
                (
                    "selected",
                    "fused, union-tile fwd",
                    slc_pairs,
                    selected_with(SelectedForward::UnionTiles, SelectedDq::Auto),
                ),
                (
                    "selected",
                    "fused, key-outer fwd",
                    slc_pairs,
                    selected_with(SelectedForward::KeyOuter, SelectedDq::Auto),
                ),
                (
                    "selected",
                    "fused, token-warp fwd",
                    slc_pairs,
                    selected_with(SelectedForward::TokenWarps, SelectedDq::Auto),
                ),
                (
                    "selected",
                    "fused, query-outer dQ",
                    slc_pairs,
                    selected_with(SelectedForward::Auto, SelectedDq::QueryOuter),
                ),
                (
                    "selected",
                    "lean",
                    slc_pairs,
                    Box::new(|q, k, v| Ok(lean::selected(q, k, v, blocks, &cfg, chunk)?)),
                ),
                (
                    "window",
                    "fused",
                    win_pairs,
                    Box::new(|q, k, v| Ok(fused::window(q, k, v, &cfg, wchunk)?)),
                ),
                (
                    "window",
                    "fused, flash bwd",
                    win_pairs,
                    Box::new(|q, k, v| {
                        let window = || fused::window(q, k, v, &cfg, wchunk);
                        Ok(nsa_sys::fused::with_window_kernels(
                            None,
                            Some(false),
                            window,
                        )?)
                    }),
                ),
                (
                    "window",
                    "fused, flash",
                    win_pairs,
                    Box::new(|q, k, v| {
                        let window = || fused::window(q, k, v, &cfg, wchunk);
                        Ok(nsa_sys::fused::with_window_kernels(
                            Some(false),
                            Some(false),
                            window,
                        )?)
                    }),
                ),
                (
                    "window",
                    "lean",
                    win_pairs,
                    Box::new(|q, k, v| Ok(lean::window(q, k, v, &cfg, wchunk)?)),
                ),
                (
                    "compressed",
                    "fused",
                    cmp_pairs,
                    Box::new(|q, k, v| {
                        let (ck, cv) = (k.f_narrow(1, 0, nc)?, v.f_narrow(1, 0, nc)?);
                        Ok(fused::compressed(q, &ck, &cv, &cfg, chunk)?)
                    }),
                ),
                (
                    "compressed",
                    "fused, NVRTC kernels",
                    cmp_pairs,
                    Box::new(|q, k, v| {
                        let (ck, cv) = (k.f_narrow(1, 0, nc)?, v.f_narrow(1, 0, nc)?);
                        let (l, d) = (sel.block_len, sel.stride);
                        let backend = nsa_sys::fused::CompressedBackend::Kernels;
                        let f = |t: &Tensor| t.f_to_kind(tch::Kind::BFloat16);
                        Ok(nsa_sys::fused::compressed_attention(
                            &f(q)?,
                            &f(&ck)?,
                            &f(&cv)?,
                            l,
                            d,
                            scale,
                            backend,
                        )
                        .map_err(nsa_attn::AttnError::Fused)?
                        .0)
                    }),
                ),
                (
                    "compressed",
                    "lean",
                    cmp_pairs,
                    Box::new(|q, k, v| {
                        let (ck, cv) = (k.f_narrow(1, 0, nc)?, v.f_narrow(1, 0, nc)?);
                        Ok(lean::compressed(q, &ck, &cv, &cfg, chunk)?)
                    }),
                ),
            ];
            for (branch, path, pairs, f) in rows {
                if !a.branch.iter().any(|b| b == branch) {
                    continue;
                }
                let (fwd, both) = match fwd_and_bwd(&x, a.repeats, f) {
                    Ok(t) => t,
                    Err(e) => {
                        table.push_str(&format!(
                            "| {shape} | {s} | {branch} | {path} | failed: {} | | | | |\n",
                            format!("{e:#}").lines().next().unwrap_or("")
                        ));
                        continue;
                    }
                };
                let bwd_ms = (both.median - fwd.median).max(1e-9);
                // K/V rows read once per (token, group), q read and the output written once.
                let bytes =
                    2.0 * (pairs / h * (dk + dv) + (b * s) as f64 * cfg.heads as f64 * (dk + dv));
                table.push_str(&format!(
                    "| {shape} | {s} | {branch} | {path} | {} | {} | {:.1} | {:.1} | {:.0} |\n",
                    fwd.cell(),
                    both.cell(),
                    pairs * 2.0 * (dk + dv) / (fwd.median * 1e-3) / 1e12,
                    pairs * (6.0 * dk + 4.0 * dv) / (bwd_ms * 1e-3) / 1e12,
                    bytes / (fwd.median * 1e-3) / 1e9,
                ));
                println!("{}", table.lines().last().unwrap_or(""));
            }
        }
    }
    println!("\n{table}");
    if let Some(path) = &a.out {
        crate::append(path, &table)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a naive count: per (batch, t, group), the distinct ids ≥ 0, each contributing the
    /// keys of its block at or before t. Random ids include duplicates, -1 padding and blocks
    /// after t.
    #[test]
    fn selected_pairs_counts_what_a_loop_counts() {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::from(d.subsec_nanos()));
        tch::manual_seed(seed);
        for (b, s, g, n, block_len) in [(1, 37, 2, 4, 8), (2, 64, 3, 5, 4), (1, 5, 1, 1, 16)] {
            let max_id = s / block_len + 2;
            let blocks = Tensor::randint_low(-1, max_id, [b, s, g, n], (Kind::Int64, Device::Cpu));
            let ids = Vec::<i64>::try_from(blocks.flatten(0, -1)).unwrap();
            let mut naive = 0i64;
            for bi in 0..b {
                for t in 0..s {
                    for gi in 0..g {
                        let at = (((bi * s + t) * g + gi) * n) as usize;
                        let mut row: Vec<i64> = ids[at..at + n as usize].to_vec();
                        row.sort_unstable();
                        row.dedup();
                        for id in row.into_iter().filter(|&id| id >= 0) {
                            naive += (t + 1 - id * block_len).clamp(0, block_len);
                        }
                    }
                }
            }
            let counted = selected_pairs(&blocks, block_len).unwrap();
            assert_eq!(
                counted,
                naive as f64,
                "seed {seed}, shape {:?}",
                (b, s, g, n)
            );
        }
    }
}
