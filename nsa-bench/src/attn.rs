//! `bench attn`: one NSA attention layer (`--path lean` or `fused`) against dense
//! causal SDPA.
//!
//! Shape: the paper's attention (H = 64, Hkv = 4, dk = 192, dv = 128, l = 32, d = 16, l' = 64,
//! n = 16, w = 512, MLP φ) with model width `--dim`, batch `--batch`, for each `--seq` length.
//!
//! Cases per sequence length (median, min and max of `--repeats` timed runs, after one warm-up
//! run on CUDA, where the device is synchronised before each clock read):
//! - `nsa fwd`: the whole layer (projections, compression, selection, three branches, gates,
//!   output projection) on the chosen path, without autograd;
//! - `nsa fwd+bwd`: the same with autograd, then backward from a fixed random output gradient
//!   to the input and every parameter (handed to autograd as the output's gradient since round
//!   35; rounds up to 34 timed the backward of `Σ out·g`, whose product and sum added their own
//!   passes over the output, on both sides);
//! - `nsa select`: selection alone (chunked `p_cmp` → top-n blocks) from precomputed
//!   projections, for the "selection ≤ 5 % of the forward" target;
//! - `dense fwd`, `dense fwd+bwd`: `scaled_dot_product_attention(is_causal)` on q `[B, H, S, dk]`,
//!   k `[B, Hkv, S, dk]`, v `[B, Hkv, S, dv]` — attention only, no projections. GQA through
//!   `enable_gqa` when a backend accepts it, else with expanded K/V heads; if no backend takes
//!   dk ≠ dv, v is zero-padded to dk (the table says which variant ran and its backend).
//!
//! Peak memory (CUDA): each case runs in a child process (the host binary, hidden `--case`: a
//! fresh allocator per case, and an out-of-memory failure stays the case's own), which reports
//! the peak of libtorch's caching allocator during the case minus what was allocated before it
//! (the benchmarks' one memory probe, [`crate::peak_cuda_bytes`]; the CUDA context is not
//! counted). On CPU everything runs in-process and memory is not measured.
use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::Stdio;

use clap::ValueEnum;
use nsa_attn::{AttnPath, ForwardOpts, LeanOpts, NsaAttention, NsaConfig};
use nsa_sys::SdpaBackend;
use tch::{nn, Device, Kind, Tensor};

use crate::{BenchError, Invocation};

type Result<T, E = BenchError> = std::result::Result<T, E>;

/// `bench attn`'s flags.
#[derive(Debug, clap::Args)]
pub struct AttnBenchArgs {
    /// Device: `cpu`, `cuda` or `cuda:N` [default: cuda when a GPU is visible, else cpu].
    #[arg(long)]
    device: Option<String>,
    /// Sequence lengths, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [8192, 16384, 32768, 65536])]
    seq: Vec<i64>,
    /// Timed runs per case; the table shows median (min–max) [default: 5 after one warm-up run on
    /// CUDA; 1 without warm-up on CPU, where the table is a smoke check].
    #[arg(long)]
    repeats: Option<usize>,
    /// Element type of parameters and activations.
    #[arg(long, value_enum, default_value_t = BenchDtype::Bf16)]
    dtype: BenchDtype,
    /// Model width (input/output features of the layer).
    #[arg(long, default_value_t = 1024)]
    dim: i64,
    /// Batch size.
    #[arg(long, default_value_t = 1)]
    batch: i64,
    /// Queries per chunk of the lean path (compressed and selected branches, selection).
    #[arg(long, default_value_t = LeanOpts::default().query_chunk)]
    chunk: i64,
    /// Append the Markdown table to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seed of parameters and inputs.
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// The NSA layer's path: `lean` (chunked libtorch ops) or `fused` (the CUDA path: cuDNN for
    /// the compressed branch, NVRTC kernels for the selection and the selected branch, flash for
    /// the window).
    #[arg(long, value_enum, default_value_t = BenchPath::Lean)]
    path: BenchPath,
    /// Internal: run one case at `--seq` (a single length) and print its result as JSON.
    #[arg(long, hide = true, value_enum)]
    case: Option<Case>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BenchPath {
    Lean,
    Fused,
}

impl BenchPath {
    fn name(self) -> &'static str {
        match self {
            BenchPath::Lean => "lean",
            BenchPath::Fused => "fused",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BenchDtype {
    Bf16,
    F32,
}

impl BenchDtype {
    fn kind(self) -> Kind {
        match self {
            BenchDtype::Bf16 => Kind::BFloat16,
            BenchDtype::F32 => Kind::Float,
        }
    }
    fn name(self) -> &'static str {
        match self {
            BenchDtype::Bf16 => "bf16",
            BenchDtype::F32 => "f32",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Case {
    NsaFwd,
    NsaFwdBwd,
    NsaSelect,
    DenseFwd,
    DenseFwdBwd,
}

impl Case {
    const ALL: [Case; 5] = [
        Case::NsaFwd,
        Case::NsaFwdBwd,
        Case::NsaSelect,
        Case::DenseFwd,
        Case::DenseFwdBwd,
    ];

    fn label(self) -> &'static str {
        match self {
            Case::NsaFwd => "nsa fwd",
            Case::NsaFwdBwd => "nsa fwd+bwd",
            Case::NsaSelect => "nsa select",
            Case::DenseFwd => "dense fwd",
            Case::DenseFwdBwd => "dense fwd+bwd",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Case::NsaFwd => "nsa-fwd",
            Case::NsaFwdBwd => "nsa-fwd-bwd",
            Case::NsaSelect => "nsa-select",
            Case::DenseFwd => "dense-fwd",
            Case::DenseFwdBwd => "dense-fwd-bwd",
        }
    }
}

/// What one case reports (the child prints it as one JSON line).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct CaseResult {
    /// Wall times of the timed runs, ms.
    ms: crate::Timing,
    /// Kernels / SDPA backend and variant that ran.
    kernel: String,
    /// Peak of libtorch's CUDA allocator during the case minus before it, GB (CUDA only).
    #[serde(default)]
    peak_gb: Option<f64>,
}

/// One line of the table.
#[derive(Debug)]
struct Row {
    seq: i64,
    case: Case,
    result: Result<CaseResult, String>,
    peak_gb: Option<f64>,
}

/// Runs the benchmark and prints its table (appended to `--out` when given). On CUDA each case
/// runs in a child process started through `host`.
pub fn run(args: AttnBenchArgs, host: &Invocation) -> Result<()> {
    let device = crate::bench_device(args.device.as_deref())?;
    let flag = |message: String| Err(BenchError::Flag(message));
    if args.repeats == Some(0) {
        return flag("--repeats must be at least 1".into());
    }
    if args.seq.is_empty() || args.seq.iter().any(|&s| s <= 0) {
        return flag(format!("--seq needs positive lengths, got {:?}", args.seq));
    }
    if args.chunk <= 0 || args.dim <= 0 || args.batch <= 0 {
        return flag("--chunk, --dim and --batch must be positive".into());
    }
    if args.path == BenchPath::Fused && !matches!(device, Device::Cuda(_)) {
        // The layer would take its lean path there, and the table would say "fused".
        return flag(format!(
            "--path fused times the CUDA kernels; on {device:?} the layer runs the lean path \
             (--path lean)"
        ));
    }
    if let Some(case) = args.case {
        // Child mode: one case, one JSON line on stdout.
        let &[seq] = args.seq.as_slice() else {
            return flag("--case takes exactly one --seq".into());
        };
        let mut result = match device {
            Device::Cuda(index) => {
                let (mut r, peak) =
                    crate::peak_cuda_bytes(index, || run_case(case, seq, device, &args))?;
                r.peak_gb = Some(peak as f64 / 1e9);
                r
            }
            _ => run_case(case, seq, device, &args)?,
        };
        result.kernel = result.kernel.replace('|', "/");
        println!("{}", serde_json::to_string(&result)?);
        return Ok(());
    }

    let mut rows = Vec::new();
    for &seq in &args.seq {
        for case in Case::ALL {
            let row = match device {
                Device::Cuda(index) => run_child(case, seq, index, &args, host)?,
                _ => Row {
                    seq,
                    case,
                    result: run_case(case, seq, device, &args).map_err(|e| format!("{e:#}")),
                    peak_gb: None,
                },
            };
            eprintln!(
                "S={seq} {}: {}",
                case.label(),
                match &row.result {
                    Ok(r) => format!("{:.2} ms", r.ms.median),
                    Err(e) => format!("failed: {e}"),
                }
            );
            rows.push(row);
        }
    }
    let table = render(&rows, device, &args);
    print!("{table}");
    if let Some(path) = &args.out {
        crate::append(path, &table)?;
    }
    Ok(())
}

/// Runs one case in a child process (a fresh allocator and CUDA context per case, and an
/// out-of-memory failure stays the case's own), which reports its time and allocator peak.
fn run_child(
    case: Case,
    seq: i64,
    index: usize,
    args: &AttnBenchArgs,
    host: &Invocation,
) -> Result<Row> {
    let io = |what: &str| {
        let what = what.to_string();
        move |e| BenchError::io(what, e)
    };
    let mut child = host
        .child("attn")
        .args(["--case", case.flag(), "--device"])
        .arg(format!("cuda:{index}"))
        .args([
            "--seq",
            &seq.to_string(),
            "--repeats",
            &repeats(args, Device::Cuda(index)).to_string(),
        ])
        .args(["--dtype", args.dtype.name(), "--dim", &args.dim.to_string()])
        .args([
            "--batch",
            &args.batch.to_string(),
            "--chunk",
            &args.chunk.to_string(),
        ])
        .args(["--seed", &args.seed.to_string()])
        .args(["--path", args.path.name()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("starting the benchmark child process"))?;
    let status = child
        .wait()
        .map_err(io("waiting for the benchmark child process"))?;
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufReader::new(out).lines() {
            stdout.push_str(&line.map_err(io("reading the child's output"))?);
            stdout.push('\n');
        }
    }
    if let Some(err) = child.stderr.take() {
        for line in std::io::BufReader::new(err).lines() {
            stderr.push_str(&line.map_err(io("reading the child's errors"))?);
            stderr.push('\n');
        }
    }
    let result = if status.success() {
        let line = stdout.lines().last().unwrap_or_default();
        serde_json::from_str::<CaseResult>(line)
            .map_err(|e| format!("unreadable child output {line:?}: {e}"))
    } else {
        let reason = stderr
            .lines()
            .find(|l| l.contains("out of memory"))
            .map(|_| "out of memory".to_string())
            .or_else(|| {
                stderr
                    .lines()
                    .find(|l| l.starts_with("Error"))
                    .map(str::to_string)
            })
            .unwrap_or_else(|| format!("exit status {status}"));
        Err(reason)
    };
    let peak_gb = result.as_ref().ok().and_then(|r| r.peak_gb);
    Ok(Row {
        seq,
        case,
        result,
        peak_gb,
    })
}

/// Timed runs of a case on `device`: `--repeats`, or 5 on CUDA and 1 on CPU.
fn repeats(args: &AttnBenchArgs, device: Device) -> usize {
    args.repeats.unwrap_or(if device.is_cuda() { 5 } else { 1 })
}

/// Wall times in ms of the case's runs, after one warm-up run on CUDA (kernel loading,
/// allocator growth); CPU runs are not warmed up.
fn time_case(
    device: Device,
    repeats: usize,
    f: impl FnMut() -> Result<()>,
) -> Result<crate::Timing> {
    Ok(crate::time_runs(device, repeats, device.is_cuda(), f)?.0)
}

impl CaseResult {
    fn new(ms: crate::Timing, kernel: String) -> Self {
        CaseResult {
            ms,
            kernel,
            peak_gb: None,
        }
    }
}

/// The benchmarked layer: the paper's shape with the MLP φ 256 wide, the width BENCHMARKS.md's
/// attention numbers were measured with (the model presets use 64, `NsaParams::paper`).
fn bench_config(dim: i64) -> NsaConfig {
    let mut cfg = NsaConfig::paper(dim);
    cfg.nsa.phi_hidden = 256;
    cfg
}

fn run_case(case: Case, seq: i64, device: Device, args: &AttnBenchArgs) -> Result<CaseResult> {
    tch::manual_seed(args.seed);
    let kind = args.dtype.kind();
    let cfg = bench_config(args.dim);
    match case {
        Case::NsaFwd | Case::NsaFwdBwd | Case::NsaSelect => {
            let mut vs = nn::VarStore::new(device);
            let attn = NsaAttention::new(&(vs.root() / "attn"), cfg)?;
            vs.set_kind(kind);
            let lean = LeanOpts {
                query_chunk: args.chunk,
                ..LeanOpts::default()
            };
            let path = match args.path {
                BenchPath::Lean => AttnPath::Lean(lean),
                BenchPath::Fused => AttnPath::Fused(lean),
            };
            let opts = ForwardOpts {
                path,
                ..ForwardOpts::default()
            };
            let kernel = attn.audit(path, device, kind)?.to_string();
            let x = Tensor::f_randn([args.batch, seq, args.dim], (kind, device))?;
            let timing = match case {
                Case::NsaFwd => time_case(device, repeats(args, device), || {
                    let _out = tch::no_grad(|| attn.forward(&x, &opts))?;
                    Ok(())
                })?,
                Case::NsaFwdBwd => {
                    let x = x.f_set_requires_grad(true)?;
                    let g = Tensor::f_randn([args.batch, seq, args.dim], (kind, device))?;
                    time_case(device, repeats(args, device), || {
                        let out = attn.forward(&x, &opts)?;
                        nsa_sys::autograd::backward(&[&out], &[&g])?;
                        Ok(())
                    })?
                }
                _ => {
                    let p = tch::no_grad(|| attn.project(&x))?;
                    time_case(device, repeats(args, device), || {
                        let _blocks = attn.select(&p, path, nsa_select::SelectImpl::Vectorized)?;
                        Ok(())
                    })?
                }
            };
            Ok(CaseResult::new(timing, kernel))
        }
        Case::DenseFwd | Case::DenseFwdBwd => {
            let (b, h, g) = (args.batch, cfg.heads, cfg.kv_heads);
            let (dk, dv) = (cfg.head_dim_k, cfg.head_dim_v);
            let backward = case == Case::DenseFwdBwd;
            let q =
                Tensor::f_randn([b, h, seq, dk], (kind, device))?.f_set_requires_grad(backward)?;
            let k =
                Tensor::f_randn([b, g, seq, dk], (kind, device))?.f_set_requires_grad(backward)?;
            let v =
                Tensor::f_randn([b, g, seq, dv], (kind, device))?.f_set_requires_grad(backward)?;
            let dense = DenseVariant::choose(&q, &k, &v)?;
            let kernel = format!("SDPA {} ({})", dense.backend, dense.description);
            let grad = Tensor::f_randn([b, h, seq, dv], (kind, device))?;
            let timing = time_case(device, repeats(args, device), || {
                if backward {
                    let out = dense.run(&q, &k, &v)?;
                    nsa_sys::autograd::backward(&[&out], &[&grad])?;
                } else {
                    let _out = tch::no_grad(|| dense.run(&q, &k, &v))?;
                }
                Ok(())
            })?;
            Ok(CaseResult::new(timing, kernel))
        }
    }
}

/// How the dense baseline calls SDPA with GQA and dk ≠ dv.
#[derive(Debug)]
struct DenseVariant {
    /// Use `enable_gqa` (else expand K/V to H heads).
    gqa: bool,
    /// Zero-pad v to dk (no backend accepted dk ≠ dv).
    pad_v: bool,
    backend: SdpaBackend,
    description: &'static str,
}

impl DenseVariant {
    fn choose(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Self> {
        let _guard = tch::no_grad_guard();
        let h = q.size()[1];
        let rep = h / k.size()[1];
        let expand = |t: &Tensor| t.f_repeat_interleave_self_int(rep, 1, None);
        let pad = |t: &Tensor| t.f_constant_pad_nd([0, q.size()[3] - t.size()[3]]);
        let candidates = [
            (true, false, "enable_gqa, dk != dv"),
            (false, false, "K/V expanded to H heads, dk != dv"),
            (true, true, "enable_gqa, v zero-padded to dk"),
            (false, true, "K/V expanded to H heads, v zero-padded to dk"),
        ];
        for (gqa, pad_v, description) in candidates {
            let (kk, vv) = if gqa {
                (k.shallow_clone(), v.shallow_clone())
            } else {
                (expand(k)?, expand(v)?)
            };
            let vv = if pad_v { pad(&vv)? } else { vv };
            let backend = SdpaBackend::choice(q, &kk, &vv, true);
            if backend != SdpaBackend::Error {
                return Ok(Self {
                    gqa,
                    pad_v,
                    backend,
                    description,
                });
            }
        }
        Ok(Self {
            gqa: true,
            pad_v: false,
            backend: SdpaBackend::Error,
            description: "no backend",
        })
    }

    fn run(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let rep = q.size()[1] / k.size()[1];
        let (k, v) = if self.gqa {
            (k.shallow_clone(), v.shallow_clone())
        } else {
            (
                k.f_repeat_interleave_self_int(rep, 1, None)?,
                v.f_repeat_interleave_self_int(rep, 1, None)?,
            )
        };
        let dv = v.size()[3];
        let v = if self.pad_v {
            v.f_constant_pad_nd([0, q.size()[3] - dv])?
        } else {
            v
        };
        let out = Tensor::f_scaled_dot_product_attention(
            q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            true,
            None,
            self.gqa && rep > 1,
        )?;
        Ok(if self.pad_v {
            out.f_narrow(3, 0, dv)?
        } else {
            out
        })
    }
}

fn render(rows: &[Row], device: Device, args: &AttnBenchArgs) -> String {
    let cfg = bench_config(args.dim);
    let mut s = String::new();
    let seqs: Vec<String> = args.seq.iter().map(|x| x.to_string()).collect();
    s.push_str(&format!(
        "\n### NSA attention layer ({} path) vs dense causal SDPA\n\n\
         Command: `nsa-train bench attn --path {} --device {} --seq {} --repeats {} --dtype {} \
         --dim {} --batch {} --chunk {}`  \n\
         Device: {}; dtype {}; B = {}, dim = {}, H = {}, Hkv = {}, dk = {}, dv = {}, l = {}, \
         d = {}, l' = {}, n = {}, w = {}, φ = MLP; ms: median (min–max) of {} runs{}; the \
         ratio to dense from the medians.  \n\
         NSA rows time the whole layer (projections, compression, selection, branches, gates, \
         W_o); dense rows time SDPA alone. Peak memory: libtorch's CUDA allocator peak during \
         the case minus before it (own process per case; the CUDA context is not included).\n\n",
        args.path.name(),
        args.path.name(),
        match device {
            Device::Cuda(i) => format!("cuda:{i}"),
            _ => "cpu".into(),
        },
        seqs.join(","),
        repeats(args, device),
        args.dtype.name(),
        args.dim,
        args.batch,
        args.chunk,
        crate::device_description(device),
        args.dtype.name(),
        args.batch,
        args.dim,
        cfg.heads,
        cfg.kv_heads,
        cfg.head_dim_k,
        cfg.head_dim_v,
        cfg.nsa.select.block_len,
        cfg.nsa.select.stride,
        cfg.nsa.select.select_len,
        cfg.nsa.select.top_n,
        cfg.nsa.window,
        repeats(args, device),
        if device.is_cuda() {
            " after one warm-up"
        } else {
            ", no warm-up"
        },
    ));
    s.push_str("| S | case | ms | dense ms / this | peak GPU mem GB | kernels / SDPA backend |\n");
    s.push_str("| ---: | --- | ---: | ---: | ---: | --- |\n");
    for row in rows {
        let dense_of = |case: Case| {
            rows.iter()
                .find(|r| r.seq == row.seq && r.case == case)
                .and_then(|r| r.result.as_ref().ok())
                .map(|r| r.ms.median)
        };
        let (ms, ratio, kernel) = match &row.result {
            Ok(r) => {
                let baseline = match row.case {
                    Case::NsaFwd => dense_of(Case::DenseFwd),
                    Case::NsaFwdBwd => dense_of(Case::DenseFwdBwd),
                    _ => None,
                };
                let ratio = baseline
                    .map(|d| format!("{:.2}", d / r.ms.median))
                    .unwrap_or_else(|| "".into());
                (r.ms.cell(), ratio, r.kernel.clone())
            }
            Err(e) => ("failed".into(), String::new(), e.clone()),
        };
        let mem = row.peak_gb.map_or("n/a".to_string(), |g| format!("{g:.2}"));
        s.push_str(&format!(
            "| {} | {} | {ms} | {ratio} | {mem} | {kernel} |\n",
            row.seq,
            row.case.label()
        ));
    }
    s
}
