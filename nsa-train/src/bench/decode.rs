//! `nsa-train bench decode`: the decode speed NSA promises.
//!
//! **Layer table.** One decode step of an NSA layer (`--shape paper`: H = 64, Hkv = 4,
//! dk = 192, dv = 128, l = 32, d = 16, l' = 64, n = 16, w = 512, MLP φ, width 1024; or `125m`)
//! against dense attention over the same cache: libtorch's `scaled_dot_product_attention` with
//! one query per sequence over the NSA cache's raw keys and values, GQA through `enable_gqa`,
//! twice: as a decoder runs it (`nsa_model::dense::decode_attention`: cuDNN off, since cuDNN
//! builds a graph for every new cache length) and with libtorch's own pick (cuDNN where it
//! picks cuDNN, its graph built once here because the timed steps repeat one length: the
//! kernel's speed without the build a real decoder pays); `dense / NSA` takes the faster. The NSA step is the
//! whole layer (projections, compression of a completed block, selection, three branches,
//! gates, output projection, cache writes); the dense cell is the attention alone, so the
//! ratio understates NSA's advantage. On CUDA the layer step is also timed as one CUDA graph
//! (`NsaAttention::enqueue_step` with a fixed-layout plan, captured by
//! `nsa_sys::cuda::CudaGraph`): the layer's GPU time without the host's launches, what a
//! decoder replaying graphs pays, captured without the emission of a compressed token (the
//! `d − 1` of every `d` steps a decoder replays that way) and with it. The attention columns
//! time the decode kernels for a new token at position `S − 1`, so that a row labelled `S`
//! has `S` cached tokens (the layer's steps run after the cache's `S` tokens). For each `--seq` (cached tokens per sequence) and
//! `--batch`: median (min–max) of `--repeats` steps after one warm-up, the device synchronised
//! around each; the keys one step reads per K/V group (`StepReads`: visible compressed tokens,
//! selected keys and window together) against dense's `S`; the cache's size. The cache holds
//! random keys and values (`NsaCache::filled_random`): a step's cost does not depend on them.
//!
//! **Generation table.** Whole-model greedy generation with `--preset` (default `125m`, random
//! weights), NSA and dense: prefill of a `--prompt`-token prompt (batch 1; the fused path on
//! CUDA, lean on the CPU), then `--new-tokens` decode steps, each with the host's greedy pick
//! (one device→host copy of the logits per token, as `nsa-train generate` does): prefill time
//! and decode tokens/s, eager and replayed from CUDA graphs (`KvCache::use_graphs`), as the
//! median (min–max) of `--generation-runs` generations (eager and graph runs alternating).
//!
//! bf16 on CUDA, float32 on the CPU.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use nsa_attn::{AttnPath, ForwardOpts, LeanOpts, NsaAttention, NsaCache, NsaConfig};
use nsa_model::{AttentionKind, Model, ModelConfig};
use tch::{nn, Device, Kind, Tensor};

use crate::generate::{host_row, Sampler, Sampling};
use nsa_bench::{bench_device, branches::shape_config, time_runs, Timing};

#[derive(Debug, clap::Args)]
pub struct DecodeBenchArgs {
    /// Device: `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long)]
    device: Option<String>,
    /// Cached tokens per sequence, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [8192, 16384, 32768, 65536, 131072])]
    seq: Vec<i64>,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8])]
    batch: Vec<i64>,
    /// Timed decode steps per cell after one warm-up step.
    #[arg(long, default_value_t = 20)]
    repeats: usize,
    /// Layer shapes: `paper` (G = 16) and/or `125m`, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = ["paper".to_string()])]
    shape: Vec<String>,
    /// Model preset of the generation table (`none` skips it).
    #[arg(long, default_value = "125m")]
    preset: String,
    /// Prompt length of the generation table.
    #[arg(long, default_value_t = 32768)]
    prompt: i64,
    /// Tokens generated (timed) per model in the generation table.
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// Generations per model and mode in the generation table, each a prefill and
    /// `--new-tokens` timed steps: the table gives the median (min–max) of their ms per token.
    #[arg(long, default_value_t = 3)]
    generation_runs: usize,
    /// Append the Markdown tables to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// What one invocation measures (parsed arguments; tests build it directly).
struct Plan {
    device: Device,
    kind: Kind,
    shapes: Vec<(String, NsaConfig)>,
    seqs: Vec<i64>,
    batches: Vec<i64>,
    repeats: usize,
    models: Vec<(String, ModelConfig)>,
    prompt: i64,
    new_tokens: usize,
    generation_runs: usize,
}

pub fn run(a: DecodeBenchArgs) -> Result<()> {
    nsa_sys::cuda::load_backend()?;
    let device = bench_device(a.device.as_deref())?;
    ensure!(
        a.seq.iter().all(|&s| s >= 1) && a.batch.iter().all(|&b| b >= 1),
        "--seq and --batch values must be at least 1"
    );
    ensure!(a.repeats >= 1, "--repeats must be at least 1");
    ensure!(a.prompt >= 1, "--prompt must be at least 1");
    ensure!(
        a.generation_runs >= 1,
        "--generation-runs must be at least 1"
    );
    let shapes = a
        .shape
        .iter()
        .map(|s| Ok((s.clone(), shape_config(s)?)))
        .collect::<Result<Vec<_>>>()?;
    let models = if a.preset == "none" {
        Vec::new()
    } else {
        let cfg = ModelConfig::preset(&a.preset)?;
        vec![(a.preset.clone(), cfg)]
    };
    let plan = Plan {
        device,
        kind: if device.is_cuda() {
            Kind::BFloat16
        } else {
            Kind::Float
        },
        shapes,
        seqs: a.seq,
        batches: a.batch,
        repeats: a.repeats,
        models,
        prompt: a.prompt,
        new_tokens: a.new_tokens,
        generation_runs: a.generation_runs,
    };
    let tables = format!("{}\n{}", layer_table(&plan)?, generation_table(&plan)?);
    println!("\n{tables}");
    if let Some(path) = &a.out {
        nsa_bench::append(path, &tables)?;
    }
    Ok(())
}

/// The layer table: NSA decode step vs dense SDPA over the same cache.
fn layer_table(p: &Plan) -> Result<String> {
    let mut table = format!(
        "Decode step, {}, {:?}. Cells: ms, median (min–max) of {} runs. Layer step: the whole NSA layer (projections, cache writes, compression, attention, gates, output projection), eager and synchronised after each step (latency), and as one CUDA graph per step over {STEPS_PER_RUN} replays back to back (CUDA only), without the emission of a compressed token (what a decoder replays at d − 1 of every d positions) and with it. Layer steps add the token after the cache's S (plus one per step timed before). Attention: NSA's decode kernels (three branches, selection, gated mix; CUDA only) for a new token at position S − 1 and dense SDPA of one query over the first S cached keys, each given its queries, per step over {STEPS_PER_RUN} steps issued back to back (eager: launched from the host each step; graph: the four kernels replayed as one CUDA graph). Dense SDPA as a decoder runs it (cuDNN off: cuDNN builds a graph for every new cache length) and with libtorch's pick (if cuDNN, its graph reused here because every timed step has the same length). dense / NSA: the faster dense over the NSA graph. Keys read per K/V group and step.\n\n| shape | cached tokens | batch | NSA layer step ms | NSA layer step graph ms | with emission ms | NSA attention eager ms | NSA attention graph ms | dense SDPA ms | dense SDPA, libtorch's pick ms | dense / NSA | keys read NSA | keys read dense | cache GB |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        nsa_bench::device_description(p.device),
        p.kind,
        p.repeats
    );
    for (name, cfg) in &p.shapes {
        let mut vs = nn::VarStore::new(p.device);
        let layer = NsaAttention::new(&(vs.root() / "attn"), *cfg)?;
        vs.set_kind(p.kind);
        for &s in &p.seqs {
            for &b in &p.batches {
                let row = layer_row(p, &layer, cfg, s, b)
                    .with_context(|| format!("{name}, {s} cached tokens, batch {b}"));
                let line = match row {
                    Ok(cells) => format!("| {name} | {s} | {b} | {cells} |\n"),
                    Err(e) => format!(
                        "| {name} | {s} | {b} | failed: {} | | | | | | | | | | |\n",
                        format!("{e:#}").lines().next().unwrap_or("")
                    ),
                };
                print!("{line}");
                table.push_str(&line);
            }
        }
    }
    Ok(table)
}

/// Steps issued back to back per timed run of the attention columns.
pub(super) const STEPS_PER_RUN: usize = 20;

/// Per-step time of `f` run [`STEPS_PER_RUN`] times back to back, synchronised around each run,
/// over `repeats` runs after a warm-up one.
pub(super) fn per_step(
    device: Device,
    repeats: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Timing> {
    let (t, _) = time_runs(device, repeats, true, || {
        for _ in 0..STEPS_PER_RUN {
            f().map_err(|e| nsa_bench::BenchError::Flag(format!("{e:#}")))?;
        }
        Ok(())
    })?;
    let k = STEPS_PER_RUN as f64;
    Ok(Timing {
        median: t.median / k,
        min: t.min / k,
        max: t.max / k,
    })
}

/// Random inputs of the decode kernels' step for `b` sequences all at `position`: queries
/// `[B, Hkv, h, dk]`, gates `[B, H, 3]` (`kind`) and the positions (int64 `[B]`).
pub(super) fn kernel_inputs(
    cfg: &NsaConfig,
    b: i64,
    position: i64,
    kind: Kind,
    device: Device,
) -> Result<(Tensor, Tensor, Tensor)> {
    let h = cfg.heads_per_group();
    let q = Tensor::f_randn([b, cfg.kv_heads, h, cfg.head_dim_k], (kind, device))?;
    let gates = Tensor::f_rand([b, cfg.heads, 3], (kind, device))?;
    let positions = Tensor::f_full([b], position, (Kind::Int64, device))?;
    Ok((q, gates, positions))
}

fn layer_row(p: &Plan, layer: &NsaAttention, cfg: &NsaConfig, s: i64, b: i64) -> Result<String> {
    let _no_grad = tch::no_grad_guard();
    let lengths = vec![s; b as usize];
    let mut cache =
        NsaCache::filled_random(cfg, &lengths, s + p.repeats as i64 + 2, p.kind, p.device)?;
    let x = Tensor::f_randn([b, 1, cfg.dim], (p.kind, p.device))?;
    let opts = ForwardOpts {
        path: if p.device.is_cuda() {
            AttnPath::Fused(LeanOpts::default())
        } else {
            AttnPath::Reference
        },
        ..Default::default()
    };
    let (nsa, reads) = time_runs(p.device, p.repeats, true, || {
        Ok(layer.decode_step(&x, &mut cache, &opts)?.reads)
    })?;
    let keys_read = reads
        .total()?
        .f_to_kind(Kind::Double)?
        .f_mean(Kind::Double)?
        .f_double_value(&[])?;
    // The attention columns time the kernels for a new token at position S − 1 (the cache's
    // first S tokens, as `bench decode-launch` does), so a row labelled S is S cached tokens
    // even though the layer's timed steps above have appended a few more.
    let position = s - 1;
    // The whole layer step as a CUDA graph (what a decoder with `KvCache::use_graphs`
    // replays): a fixed-layout plan at the cache's lengths, the step enqueued once eagerly,
    // then captured without and with the emission of compressed tokens and replayed; a
    // replay rewrites the same token, so replays repeat.
    let layer_graphs = match p.device {
        Device::Cuda(ordinal) => {
            let last = cache.lengths().iter().copied().max().unwrap_or(0);
            let mut plan =
                nsa_attn::DecodePlan::fixed(cfg, cache.lengths(), p.kind, p.device, None, last)?;
            layer.enqueue_step(&x, &mut cache, &plan, &opts)?;
            let mut timed = Vec::new();
            for emission in [false, true] {
                plan.set_emission(emission)?;
                let (graph, _out) = nsa_sys::cuda::CudaGraph::capture(ordinal, || {
                    layer.enqueue_step(&x, &mut cache, &plan, &opts)
                })?;
                timed.push(per_step(p.device, p.repeats, || Ok(graph.replay()?))?);
            }
            Some(timed)
        }
        _ => None,
    };
    let (kernels, graph) = if p.device.is_cuda() {
        let (q, gates, positions) = kernel_inputs(cfg, b, position, p.kind, p.device)?;
        let step = nsa_attn::decode::kernel_step(
            &cache,
            &q,
            &positions,
            position,
            &gates,
            nsa_sys::fused::DecodeLaunch::default(),
        )?;
        let eager = per_step(p.device, p.repeats, || Ok(step.launch()?))?;
        let captured = step.capture()?;
        let graph = per_step(p.device, p.repeats, || Ok(captured.replay()?))?;
        (Some(eager), Some(graph))
    } else {
        (None, None)
    };
    let q = Tensor::f_randn([b, cfg.heads, 1, cfg.head_dim_k], (p.kind, p.device))?;
    let (k, v) = cache.selected_kv();
    let (k, v) = (k.f_narrow(2, 0, s)?, v.f_narrow(2, 0, s)?);
    let dense = per_step(p.device, p.repeats, || {
        let _out = nsa_model::dense::decode_attention(&q, &k, &v, None)?;
        Ok(())
    })?;
    let gqa = cfg.heads != cfg.kv_heads;
    let dense_pick = per_step(p.device, p.repeats, || {
        let _out = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<&Tensor>,
            0.0,
            false,
            None,
            gqa,
        )?;
        Ok(())
    })?;
    // The attention columns to the microsecond: a step takes tens of them.
    let cell = |t: &Option<Timing>| t.as_ref().map_or("–".to_string(), |t| t.cell_to(3));
    let ratio = graph.as_ref().map_or("–".to_string(), |g| {
        format!("{:.1}", dense.median.min(dense_pick.median) / g.median)
    });
    let layer_graph = |i: usize| {
        layer_graphs
            .as_ref()
            .map_or("–".to_string(), |t| t[i].cell_to(3))
    };
    Ok(format!(
        "{} | {} | {} | {} | {} | {} | {} | {ratio} | {keys_read:.0} | {s} | {:.2}",
        nsa.cell(),
        layer_graph(0),
        layer_graph(1),
        cell(&kernels),
        cell(&graph),
        dense.cell_to(3),
        dense_pick.cell_to(3),
        cache.bytes() as f64 / 1e9
    ))
}

/// The generation table: prefill time and decode tokens/s of a model, NSA and dense.
fn generation_table(p: &Plan) -> Result<String> {
    if p.models.is_empty() {
        return Ok(String::new());
    }
    let mut table = format!(
        "Generation, {}, {:?}, batch 1, random weights, greedy: prefill of the prompt, then {} decode steps, eager (libtorch's operators launched one by one) and replayed from CUDA graphs (`KvCache::use_graphs`; the first step after the prefill captures); median (min–max) of {} generations each, tokens/s of the median. The split columns divide a token (means over the runs): the host's work in `decode_step` until it returns (eager: the step's launches, on the CPU its whole computation; from graphs: the plan's refill, the replay's launch, the cache's bookkeeping), the wait for the logits with their copy to the host, and the greedy pick.\n\n| model | attention | prompt | prefill ms | eager ms/token | eager tokens/s | eager token: host ms / wait ms / pick ms | graph ms/token | graph tokens/s | graph token: host ms / wait ms / pick ms |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        nsa_bench::device_description(p.device),
        p.kind,
        p.new_tokens,
        p.generation_runs
    );
    for (name, cfg) in &p.models {
        for attention in [AttentionKind::Nsa, AttentionKind::Dense] {
            let line = match generation_row(p, &cfg.with_attention(attention)) {
                Ok(cells) => format!("| {name} | {attention} | {} | {cells} |\n", p.prompt),
                Err(e) => format!(
                    "| {name} | {attention} | {} | failed: {} | | | | | | |\n",
                    p.prompt,
                    format!("{e:#}").lines().next().unwrap_or("")
                ),
            };
            print!("{line}");
            table.push_str(&line);
        }
    }
    Ok(table)
}

fn generation_row(p: &Plan, cfg: &ModelConfig) -> Result<String> {
    let _no_grad = tch::no_grad_guard();
    let mut vs = nn::VarStore::new(p.device);
    let model = Model::new(&vs.root(), cfg)?;
    vs.set_kind(p.kind);
    let opts = ForwardOpts {
        path: if p.device.is_cuda() {
            AttnPath::Fused(LeanOpts::default())
        } else {
            AttnPath::Lean(LeanOpts::default())
        },
        ..Default::default()
    };
    let tokens = Tensor::f_randint(cfg.vocab_size, [1, p.prompt], (Kind::Int64, p.device))?;
    // Eager and graph generations alternate, so that a drift of the device's clocks during the
    // runs reaches both columns alike.
    let (mut prefill, mut eager, mut graph) = (Vec::new(), Vec::new(), Vec::new());
    let mut unavailable = None;
    let (mut eager_parts, mut parts) = (TokenParts::default(), TokenParts::default());
    for _ in 0..p.generation_runs {
        let run = generation_run(p, &model, &tokens, &opts, false)?;
        prefill.push(run.prefill_ms);
        eager.push(run.per_token);
        eager_parts.add(&run.parts, p.generation_runs);
        let run = generation_run(p, &model, &tokens, &opts, true)?;
        graph.push(run.per_token);
        parts.add(&run.parts, p.generation_runs);
        unavailable = run.unavailable;
    }
    let timing = |v: Vec<f64>| Timing::of(v).context("no generation ran");
    let (prefill, eager, graph) = (timing(prefill)?, timing(eager)?, timing(graph)?);
    let graph_cells = match unavailable {
        Some(_) => "– | – | –".to_string(),
        None => format!(
            "{} | {:.1} | {}",
            graph.cell(),
            1e3 / graph.median,
            parts.cell()
        ),
    };
    Ok(format!(
        "{:.0} | {} | {:.1} | {} | {graph_cells}",
        prefill.median,
        eager.cell(),
        1e3 / eager.median,
        eager_parts.cell()
    ))
}

/// Where a generated token's time goes, ms per token: the host's work in `decode_step`, the
/// wait for the logits (and their copy to the host), the pick.
#[derive(Debug, Default, Clone, Copy)]
struct TokenParts {
    host_ms: f64,
    wait_ms: f64,
    pick_ms: f64,
}

impl TokenParts {
    /// Adds `other / runs` (a mean over `runs` generations).
    fn add(&mut self, other: &TokenParts, runs: usize) {
        let n = runs.max(1) as f64;
        self.host_ms += other.host_ms / n;
        self.wait_ms += other.wait_ms / n;
        self.pick_ms += other.pick_ms / n;
    }

    /// `host / wait / pick`, ms; the pick to the microsecond (it is that small).
    fn cell(&self) -> String {
        format!(
            "{:.2} / {:.2} / {:.3}",
            self.host_ms, self.wait_ms, self.pick_ms
        )
    }
}

/// One generation of [`generation_run`].
struct GenerationRun {
    prefill_ms: f64,
    per_token: f64,
    parts: TokenParts,
    /// Why graphs were not used when they were asked for.
    unavailable: Option<String>,
}

/// Prefill then greedy decode steps (one untimed, then `p.new_tokens` timed): the prefill's
/// ms, the steps' ms per token and its parts.
fn generation_run(
    p: &Plan,
    model: &Model,
    tokens: &Tensor,
    opts: &ForwardOpts,
    graphs: bool,
) -> Result<GenerationRun> {
    let sync = || {
        if let Device::Cuda(i) = p.device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    sync();
    let start = Instant::now();
    let pre = model.prefill(
        tokens,
        &[p.prompt],
        p.prompt + p.new_tokens as i64 + 1,
        opts,
    )?;
    let mut greedy = Sampler::new(Sampling::GREEDY, 0)?;
    let mut next = greedy.pick(&host_row(&pre.logits.f_select(1, p.prompt - 1)?)?)?;
    let prefill_ms = start.elapsed().as_secs_f64() * 1e3;
    let mut cache = pre.cache;
    cache.use_graphs(graphs);
    // One untimed step (first-call costs; with graphs, the step that captures), then the timed
    // ones.
    let mut parts = TokenParts::default();
    let mut step = |id: i64, parts: &mut TokenParts| -> Result<i64> {
        let t0 = Instant::now();
        let logits = model.decode_step(&mut cache, &[id], opts)?.logits;
        let t1 = Instant::now();
        let row = host_row(&logits)?;
        let t2 = Instant::now();
        let id = greedy.pick(&row)?;
        parts.host_ms += (t1 - t0).as_secs_f64() * 1e3;
        parts.wait_ms += (t2 - t1).as_secs_f64() * 1e3;
        parts.pick_ms += t2.elapsed().as_secs_f64() * 1e3;
        Ok(id)
    };
    next = step(next, &mut TokenParts::default())?;
    let start = Instant::now();
    for _ in 0..p.new_tokens {
        next = step(next, &mut parts)?;
    }
    sync();
    let n = p.new_tokens.max(1) as f64;
    let per_token = start.elapsed().as_secs_f64() * 1e3 / n;
    Ok(GenerationRun {
        prefill_ms,
        per_token,
        parts: TokenParts {
            host_ms: parts.host_ms / n,
            wait_ms: parts.wait_ms / n,
            pick_ms: parts.pick_ms / n,
        },
        unavailable: cache.graph_unavailable().map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both tables on the CPU at small sizes: every cell is filled (no `failed`), and the keys
    /// a step reads follow NSA's count (at most #compressed + n·l' + w per group; the branches
    /// read some keys twice, so a short cache can count more reads than it holds keys).
    #[test]
    fn both_tables_run_on_the_cpu_at_small_sizes() {
        let tiny = ModelConfig::preset("tiny").unwrap();
        let plan = Plan {
            device: Device::Cpu,
            kind: Kind::Float,
            shapes: vec![("tiny".into(), tiny.nsa_config())],
            seqs: vec![7, 100],
            batches: vec![1, 2],
            repeats: 1,
            models: vec![("tiny".into(), tiny)],
            prompt: 40,
            new_tokens: 2,
            generation_runs: 2,
        };
        let layers = layer_table(&plan).unwrap();
        let rows: Vec<&str> = layers.lines().filter(|l| l.starts_with("| tiny")).collect();
        assert_eq!(rows.len(), 4, "{layers}");
        let sel = tiny.nsa.select;
        for row in &rows {
            assert!(!row.contains("failed"), "{row}");
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let (s, read): (f64, f64) = (cells[2].parse().unwrap(), cells[12].parse().unwrap());
            // The timed step (after the warm-up one) is at position S + 1.
            let t = s as i64 + 1;
            let bound =
                sel.num_visible_compressed(t) + sel.top_n * sel.select_len + tiny.nsa.window;
            assert!(read >= 1.0 && read <= bound as f64, "{row}");
        }
        let generation = generation_table(&plan).unwrap();
        let rows: Vec<&str> = generation
            .lines()
            .filter(|l| l.starts_with("| tiny"))
            .collect();
        assert_eq!(rows.len(), 2, "{generation}");
        assert!(rows.iter().all(|r| !r.contains("failed")), "{generation}");
        assert!(rows[0].contains("| nsa |") && rows[1].contains("| dense |"));
        // The eager column is the median (min–max) of the generations; the eager split has
        // three numbers, and on the CPU the graph columns are dashes.
        for row in &rows {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let split: Vec<f64> = cells[7].split(" / ").map(|x| x.parse().unwrap()).collect();
            assert!(split.len() == 3 && split.iter().all(|&x| x >= 0.0), "{row}");
            assert_eq!(&cells[8..11], ["–", "–", "–"], "{row}");
            let eager = row.split('|').map(str::trim).nth(5).unwrap();
            let (median, range) = eager.split_once(" (").unwrap();
            let (min, max) = range.trim_end_matches(')').split_once('–').unwrap();
            let [median, min, max] = [median, min, max].map(|x| x.parse::<f64>().unwrap());
            assert!(min <= median && median <= max && min > 0.0, "{row}");
        }
    }
}
