//! Model FLOPs per trained token, counted from the config, and the MFU the trainer reports
//! (model FLOPs utilisation, as nanoGPT and llm.c report it).
//!
//! Training costs three forward passes' worth of multiply-adds (forward, and backward for
//! inputs and weights), two FLOPs each, so every multiply-add a token's forward pass needs counts
//! 6 FLOPs. Per token:
//!
//! ```text
//! FLOPs/token = 6·N_mat + 6·L·C_φ/S + 6·L·H·(dk + dv)·K̄
//! ```
//!
//! - `N_mat`: the weights of every matrix a token passes through: per block the projections
//!   (`wq`, the K/V pairs — three with NSA's separate pairs, one with `shared_kv` or dense —
//!   `wo`, NSA's gate MLP) and the SwiGLU MLP (`3·D·F`), plus the tied head (`V·D`). The
//!   embedding lookup, norms, biases and position embeddings cost no matrix products.
//! - `C_φ`: NSA's compression φ, multiply-adds per sequence and block: for each of the
//!   `⌊(S − l)/d⌋ + 1` compressed tokens and each of the Hkv key heads, the MLP φ costs
//!   `(l·dk + dk)·phi_hidden` for the key and `(l·dv + dv)·phi_hidden` for the value, the linear
//!   φ `l·dk·dk + l·dv·dv`, the mean nothing.
//! - `K̄`: keys each query attends, averaged over the positions `t = 0..S` (causal). Dense:
//!   `t + 1`, so `K̄ = (S + 1)/2`. NSA, the three branches summed: the compressed tokens whose
//!   block has ended (`⌊(t + 1 − l)/d⌋ + 1` once `t + 1 ≥ l`); the selected blocks, all `t + 1`
//!   keys while there are at most n blocks, else `(n − 1)·l' + (t mod l') + 1` (n blocks, the
//!   current one partial); the window, `min(w, t + 1)`. Each attended key costs `dk` multiply-adds
//!   for its score and `dv` for its value, in each of the H query heads.
//!
//! Selection reuses the compressed branch's scores (Eq. 8–9) and adds no matrix product; work a
//! kernel repeats (recomputation in backward) is not model FLOPs, so MFU is comparable across
//! paths and with other stacks.
use nsa_model::{AttentionKind, ModelConfig, Phi};

/// Training FLOPs per token, by where they are spent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlopsPerToken {
    /// `6·N_mat`.
    pub matrices: f64,
    /// `6·L·C_φ/S` (0 for dense attention).
    pub compression: f64,
    /// `6·L·H·(dk + dv)·K̄`.
    pub attention: f64,
}

impl FlopsPerToken {
    pub fn total(&self) -> f64 {
        self.matrices + self.compression + self.attention
    }
}

/// Training FLOPs per token of `model` at sequence length `seq_len` (see the module docs).
pub fn flops_per_token(model: &ModelConfig, seq_len: i64) -> FlopsPerToken {
    let layers = model.n_layers as f64;
    let per_key = (model.n_heads * (model.head_dim_k + model.head_dim_v)) as f64;
    let compression = match model.attention {
        AttentionKind::Dense => 0.0,
        AttentionKind::Nsa if seq_len > 0 => {
            6.0 * layers * compression_macs_per_sequence(model, seq_len) as f64 / seq_len as f64
        }
        AttentionKind::Nsa => 0.0,
    };
    FlopsPerToken {
        matrices: 6.0 * matrix_weights(model) as f64,
        compression,
        attention: 6.0 * layers * per_key * mean_attended_keys(model, seq_len),
    }
}

/// `N_mat`: weights of the matrices one token's forward pass multiplies by.
pub fn matrix_weights(m: &ModelConfig) -> i64 {
    let (d, h, g) = (m.dim, m.n_heads, m.n_kv_heads);
    let (dk, dv) = (m.head_dim_k, m.head_dim_v);
    let kv_pair = d * g * (dk + dv);
    let attention = match m.attention {
        AttentionKind::Dense => d * h * dk + kv_pair + h * dv * d,
        AttentionKind::Nsa => {
            let pairs = if m.nsa.shared_kv { 1 } else { 3 };
            let gate = d * m.nsa.gate_hidden + m.nsa.gate_hidden * 3 * h;
            d * h * dk + pairs * kv_pair + h * dv * d + gate
        }
    };
    let mlp = 3 * d * m.mlp_hidden;
    m.n_layers * (attention + mlp) + m.vocab_size * d
}

/// `C_φ`: multiply-adds of the compression φ over one sequence of one block.
pub fn compression_macs_per_sequence(m: &ModelConfig, seq_len: i64) -> i64 {
    let (l, stride) = (m.nsa.select.block_len, m.nsa.select.stride);
    if seq_len < l || stride <= 0 {
        return 0;
    }
    let tokens = (seq_len - l) / stride + 1;
    let (dk, dv, hidden) = (m.head_dim_k, m.head_dim_v, m.nsa.phi_hidden);
    let per_token = match m.nsa.phi {
        Phi::Mean => 0,
        Phi::Linear => l * dk * dk + l * dv * dv,
        // The mean's additions are not multiply-accumulates.
        Phi::Mlp | Phi::MeanMlp => (l * dk + dk) * hidden + (l * dv + dv) * hidden,
    };
    tokens * m.n_kv_heads * per_token
}

/// `K̄`: keys one query attends, averaged over the positions of a sequence of `seq_len`.
pub fn mean_attended_keys(m: &ModelConfig, seq_len: i64) -> f64 {
    if seq_len <= 0 {
        return 0.0;
    }
    let total: i64 = (0..seq_len).map(|t| attended_keys(m, t)).sum();
    total as f64 / seq_len as f64
}

/// Keys the query at position `t` attends, all branches together.
fn attended_keys(m: &ModelConfig, t: i64) -> i64 {
    let visible = t + 1;
    match m.attention {
        AttentionKind::Dense => visible,
        AttentionKind::Nsa => {
            let s = m.nsa.select;
            let compressed = if visible >= s.block_len && s.stride > 0 {
                (visible - s.block_len) / s.stride + 1
            } else {
                0
            };
            let blocks = t / s.select_len + 1;
            let selected = if blocks <= s.top_n {
                visible
            } else {
                (s.top_n - 1) * s.select_len + t % s.select_len + 1
            };
            compressed + selected + visible.min(m.nsa.window)
        }
    }
}

/// The peak the MFU is measured against, and where that number came from.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Peak {
    /// Per device, TFLOP/s.
    pub tflops: f64,
    /// `run.peak_tflops`, or the spec sheet of the GPU named.
    pub source: String,
}

/// Dense (no sparsity) spec-sheet peaks in TFLOP/s, bf16 tensor cores and plain f32 (libtorch
/// leaves TF32 off for matmuls), by a substring of the CUDA device name; the first match wins,
/// so the PCIe variants come before their SXM twins.
const SPEC_PEAKS: &[(&str, f64, f64)] = &[
    ("H100 PCIe", 756.0, 51.0),
    ("H100 NVL", 835.0, 60.0),
    ("GH200", 989.0, 67.0),
    ("H200", 989.0, 67.0),
    ("H100", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
];

/// The peak for a device: `configured` (`run.peak_tflops`) when set, else the spec sheet of
/// the GPU named `gpu_name` at the run's precision; `None` (MFU omitted) for the CPU or a GPU
/// not in the table.
pub fn peak(configured: Option<f64>, gpu_name: Option<&str>, bf16: bool) -> Option<Peak> {
    if let Some(tflops) = configured {
        return Some(Peak {
            tflops,
            source: "run.peak_tflops".into(),
        });
    }
    let name = gpu_name?;
    let &(_, bf16_peak, f32_peak) = SPEC_PEAKS.iter().find(|(k, _, _)| name.contains(k))?;
    let (tflops, kind) = if bf16 {
        (bf16_peak, "bf16")
    } else {
        (f32_peak, "f32")
    };
    Some(Peak {
        tflops,
        source: format!("{name} {kind} dense spec"),
    })
}

/// MFU: the model FLOPs done per second over what `devices` devices at `peak_tflops` each can do.
pub fn mfu(flops_per_token: f64, tokens_per_s: f64, peak_tflops: f64, devices: usize) -> f64 {
    flops_per_token * tokens_per_s / (peak_tflops * 1e12 * devices.max(1) as f64)
}

#[cfg(test)]
mod tests;
