//! Forward passes outside the step loop's bookkeeping: logits under the run's precision, the
//! loss, held-out evaluation, `nsa-train eval`, and the attention-backend audit.
use std::path::Path;

use anyhow::{Context, Result};
use nsa_attn::ForwardOpts;
use nsa_model::{Model, ModelConfig, Recompute};
use nsa_sys::train::NvtxRange;
use tch::{Device, Kind, Tensor};

use super::forward_opts;
use crate::config::{Precision, TrainConfig};
use crate::data::{self, TokenSource, IGNORE};
use crate::signals::StopRequest;

/// Cross-entropy over the scored positions (`target != IGNORE`), in fp32.
pub(super) fn loss_of(logits: &Tensor, target: &Tensor) -> Result<Tensor> {
    let v = logits.size().last().copied().unwrap_or(1);
    Ok(logits
        .f_to_kind(Kind::Float)?
        .f_view([-1, v])?
        .f_cross_entropy_loss::<Tensor>(
            &target.f_view([-1])?,
            None,
            tch::Reduction::Mean,
            IGNORE,
            0.0,
        )?)
}

/// How a run computes logits: path options, device and precision.
pub(super) struct Forward {
    pub(super) opts: ForwardOpts,
    pub(super) device: Device,
    pub(super) bf16: bool,
    pub(super) nvtx: bool,
    /// `fast.fused_loss`: the training loss applies the head itself, chunked
    /// ([`Forward::loss`]).
    pub(super) fused_loss: bool,
    /// `fast.recompute`: the training loss's forward keeps only the blocks' inputs, and the
    /// backward recomputes each block ([`nsa_model::Recompute`]).
    pub(super) recompute: bool,
}

/// Rows per chunk of the fused head + loss: about 2^27 logits at a time (256 MB in bf16),
/// 2,668 rows over the 50,304-token vocabulary.
fn fused_loss_chunk(vocab: i64) -> i64 {
    ((1i64 << 27) / vocab.max(1)).max(64)
}

impl Forward {
    /// `run` (a model forward) in the run's precision (bf16 autocast or not), inside the
    /// "forward" NVTX range.
    fn in_precision(
        &self,
        run: impl FnOnce() -> Result<Tensor, nsa_model::ModelError>,
    ) -> Result<Tensor> {
        let _r = NvtxRange::new(self.nvtx, "forward");
        let out = if self.bf16 {
            nsa_sys::train::with_bf16_autocast(run)
        } else {
            run()
        };
        Ok(out?)
    }

    pub(super) fn logits(&self, model: &Model, input: &Tensor) -> Result<Tensor> {
        self.in_precision(|| model.forward(input, &self.opts))
    }

    /// The training loss of a batch: the mean cross-entropy over its scored positions, in
    /// float32. With `fast.fused_loss` the head and the loss run as one function over chunks
    /// of rows (`nsa_sys::loss`: no `[B·S, V]` logits); otherwise logits, then [`loss_of`].
    /// With `fast.recompute` also what the backward needs after the loss's own:
    /// [`Forward::backpropagate`] runs both.
    pub(super) fn loss(
        &self,
        model: &Model,
        input: &Tensor,
        target: &Tensor,
    ) -> Result<(Tensor, Option<Recompute>)> {
        let (hidden, recompute) = if self.recompute {
            let mut rc = None;
            let hidden = self.in_precision(|| {
                let (hidden, r) = model.forward_hidden_recompute(input, &self.opts)?;
                rc = Some(r);
                Ok(hidden)
            })?;
            (hidden, rc)
        } else if self.fused_loss {
            (
                self.in_precision(|| model.forward_hidden(input, &self.opts))?,
                None,
            )
        } else {
            return Ok((loss_of(&self.logits(model, input)?, target)?, None));
        };
        let w = model.head_weight();
        if !self.fused_loss {
            let logits = self.in_precision(|| model.head_logits(&hidden))?;
            return Ok((loss_of(&logits, target)?, recompute));
        }
        let d = hidden.size().last().copied().unwrap_or(1);
        let loss = nsa_sys::loss::linear_cross_entropy(
            &hidden.f_reshape([-1, d])?,
            w,
            &target.f_reshape([-1])?,
            IGNORE,
            fused_loss_chunk(w.size()[0]),
            self.bf16,
        )?;
        Ok((loss, recompute))
    }

    /// Backward of `loss` from [`Forward::loss`] (scaled as the caller likes), then, with
    /// activation recomputation, the blocks' and the embedding's.
    pub(super) fn backpropagate(
        &self,
        model: &Model,
        loss: &Tensor,
        recompute: Option<Recompute>,
    ) -> Result<()> {
        loss.f_backward()?;
        if let Some(rc) = recompute {
            rc.backpropagate(model)?;
        }
        Ok(())
    }

    /// Mean loss and answer accuracy over `n` held-out batches; `None` when a stop request
    /// arrived before the last batch (checked between batches).
    pub(super) fn evaluate(
        &self,
        model: &Model,
        src: &dyn TokenSource,
        cfg: &TrainConfig,
        n: u64,
        stop: Option<&StopRequest>,
    ) -> Result<Option<(f64, f64)>> {
        let _g = tch::no_grad_guard();
        let (mut loss, mut correct, mut scored) = (0.0, 0i64, 0i64);
        for i in 0..n {
            if stop.is_some_and(|s| s.signal().is_some()) {
                return Ok(None);
            }
            // Held-out: a rank no training process uses.
            let b = src
                .batch(i, u64::MAX - 1, cfg.data.batch_size, cfg.data.seq_len)?
                .to(self.device)?;
            let logits = self.logits(model, &b.input)?;
            loss += loss_of(&logits, &b.target)?.f_double_value(&[])?;
            let (c, s) = data::answer_accuracy(&logits, &b.target)?;
            correct += c;
            scored += s;
        }
        Ok(Some((
            loss / n.max(1) as f64,
            if scored > 0 {
                correct as f64 / scored as f64
            } else {
                0.0
            },
        )))
    }
}

/// `nsa-train eval`: loss and answer accuracy of the newest good checkpoint of a run folder.
pub fn eval_run(run_dir: &Path, batches: u64, has_gpu: bool) -> Result<(f64, f64)> {
    let run = super::load_run(run_dir, None, None, has_gpu)?;
    let cfg = &run.cfg;
    let eval_src = data::open(
        &cfg.data,
        run.model_cfg.vocab_size,
        cfg.run.seed.wrapping_add(cfg.data.eval_seed_offset),
        data::Split::Val,
    )?;
    println!("eval:    {}", eval_src.describe());
    // The recorded tokenizer must fit the model (a mismatch is an error here too).
    let tokens = crate::generate::text::for_run(run_dir, &cfg.data, run.model_cfg.vocab_size)?;
    println!("tokens:  {}", tokens.describe());
    let bf16 = run.device.is_cuda() && cfg.run.precision != Precision::F32;
    let fwd = Forward {
        opts: forward_opts(cfg),
        device: run.device,
        bf16,
        nvtx: false,
        fused_loss: false,
        recompute: false,
    };
    let (loss, acc) = fwd
        .evaluate(&run.model, eval_src.as_ref(), cfg, batches, None)?
        .context("evaluation produced no result")?;
    println!(
        "{}: step {}, eval loss {loss:.4}, answer accuracy {acc:.3} over {batches} batches",
        run.checkpoint.display(),
        run.step
    );
    Ok((loss, acc))
}

/// The attention-backend audit: which SDPA kernel the dense attention of this model's shape
/// would use on this device (NSA's lean path computes its branches with its own chunked ops).
pub(super) fn audit(m: &ModelConfig, device: Device, bf16: bool) -> Result<Vec<String>> {
    let kind = if bf16 { Kind::BFloat16 } else { Kind::Float };
    let _g = tch::no_grad_guard();
    let (h, hk) = (m.n_heads, m.n_kv_heads);
    let q = Tensor::f_randn([1, h, 128, m.head_dim_k], (kind, device))?;
    let k = Tensor::f_randn([1, hk, 128, m.head_dim_k], (kind, device))?;
    let v = Tensor::f_randn([1, hk, 128, m.head_dim_v], (kind, device))?;
    Ok(vec![format!(
        "{} attention; dense causal SDPA for H={h} Hkv={hk} dk={} dv={} {kind:?} picks {}",
        m.attention,
        m.head_dim_k,
        m.head_dim_v,
        nsa_sys::SdpaBackend::choice(&q, &k, &v, true)
    )])
}
