//! Activation recomputation (gradient checkpointing at block boundaries):
//! [`Model::forward_hidden_recompute`] runs the blocks without autograd, keeping only each
//! block's input, and [`Recompute::backpropagate`] runs each block's forward again, with autograd,
//! from the last block to the first, right before its backward. The activations a block saves
//! for its backward then live for that block's backward only: the memory between forward and
//! backward is the blocks' inputs (the residual stream and the previous block's MLP output,
//! per block), one forward more of compute.
//!
//! An NSA block's block selection is not recomputed: the first forward keeps its block ids
//! (int32, `[B, S, Hkv, n]` per block: 8 MB a block for `125m` at 8k × 4) and the second takes
//! them, which skips the selection kernel (or the lean path's chunked selection) and the
//! scores it recomputes; the selection has no gradient, and the same ids give the same forward.
//!
//! The gradients are those of the plain backward, bit for bit where the kernels are
//! deterministic: each block's forward is recomputed from the same inputs with the same
//! operators, its backward receives the gradient the plain backward would hand it, and a
//! parameter used twice (the tied embedding) sums the same two terms.
use nsa_attn::ForwardOpts;
use tch::Tensor;

use super::{use_kernels, Model, Selection};
use crate::config::ModelError;
use crate::dense::Rope;

/// What [`Recompute::backpropagate`] needs: the inputs of every block, the leaves the final norm
/// ran on, and how the forward ran.
#[derive(Debug)]
pub struct Recompute {
    tokens: Tensor,
    /// Block `i`'s input: the residual stream and the previous block's MLP output (none for
    /// the first block), without autograd history.
    inputs: Vec<(Tensor, Option<Tensor>)>,
    /// Block `i`'s selection (NSA blocks), which the recomputed forward reuses.
    selections: Vec<Option<Tensor>>,
    /// The final norm's inputs (the last block's outputs) as leaves that require grad.
    last: (Tensor, Option<Tensor>),
    rope: Option<Rope>,
    opts: ForwardOpts,
    /// The forward ran under bf16 autocast, so the recomputation does too.
    autocast: bool,
}

impl Model {
    /// [`Model::forward_hidden`] for a backward with activation recomputation: the blocks run
    /// without autograd, keeping their inputs; the final norm runs with autograd on the last
    /// block's outputs as leaves. Backpropagate the loss computed from the returned hidden
    /// states (`[B, S, D]`), then call [`Recompute::backpropagate`] to carry the gradients through
    /// the blocks and the embedding into every parameter's `.grad`.
    pub fn forward_hidden_recompute(
        &self,
        tokens: &Tensor,
        opts: &ForwardOpts,
    ) -> Result<(Tensor, Recompute), ModelError> {
        let (h0, rope) = {
            let _no_grad = tch::no_grad_guard();
            self.embed_and_rope(tokens, opts)?
        };
        let mut inputs = Vec::with_capacity(self.blocks.len());
        let mut selections = Vec::with_capacity(self.blocks.len());
        let (mut h, mut pending) = (h0, None);
        {
            let _no_grad = tch::no_grad_guard();
            for block in &self.blocks {
                let mut kept = None;
                let (after_attn, mlp_out) = block.forward(
                    &h,
                    pending.as_ref(),
                    opts,
                    rope.as_ref(),
                    Selection::Keep(&mut kept),
                )?;
                inputs.push((h, pending));
                selections.push(kept);
                h = after_attn;
                pending = Some(mlp_out);
            }
        }
        let h = h.f_detach()?.f_requires_grad_(true)?;
        let pending = pending
            .map(|p| p.f_detach()?.f_requires_grad_(true))
            .transpose()?;
        let kernel = use_kernels(opts, &h);
        let hidden = self.final_norm.forward_add(&h, pending.as_ref(), kernel)?.1;
        Ok((
            hidden,
            Recompute {
                tokens: tokens.shallow_clone(),
                inputs,
                selections,
                last: (h, pending),
                rope,
                opts: *opts,
                autocast: nsa_sys::train::bf16_autocast_enabled(),
            },
        ))
    }
}

/// A leaf's gradient after a backward that should have reached it.
fn grad_of(leaf: &Tensor, what: &str) -> Result<Tensor, ModelError> {
    let g = leaf.f_grad()?;
    if !g.defined() {
        return Err(ModelError::Shape(format!(
            "activation recomputation: the loss's backward did not reach {what}"
        )));
    }
    Ok(g)
}

impl Recompute {
    /// The blocks' backward, last block first, each after its forward is recomputed (in the
    /// forward's precision), then the embedding's; call it after the backward of a loss of
    /// [`Model::forward_hidden_recompute`]'s hidden states, with the model that made them.
    pub fn backpropagate(self, model: &Model) -> Result<(), ModelError> {
        if self.inputs.len() != model.blocks.len() || self.selections.len() != model.blocks.len() {
            return Err(ModelError::Shape(format!(
                "activation recomputation: {} block inputs for a model of {} blocks",
                self.inputs.len(),
                model.blocks.len()
            )));
        }
        let (h, pending) = &self.last;
        let mut g_h = grad_of(h, "the last block's residual stream")?;
        let mut g_pending = pending
            .as_ref()
            .map(|p| grad_of(p, "the last block's MLP output"))
            .transpose()?;
        // Each block's input is dropped once its backward is done.
        let mut inputs = self.inputs;
        let mut selections = self.selections;
        for block in model.blocks.iter().rev() {
            let missing =
                || ModelError::Shape("activation recomputation: a block input is missing".into());
            let (h_in, pending_in) = inputs.pop().ok_or_else(missing)?;
            let kept = selections.pop().ok_or_else(missing)?;
            let h = h_in.f_detach()?.f_requires_grad_(true)?;
            let pending = pending_in
                .as_ref()
                .map(|p| p.f_detach()?.f_requires_grad_(true))
                .transpose()?;
            let opts = &self.opts;
            let run = || {
                let selection = match &kept {
                    Some(ids) => Selection::Reuse(ids),
                    None => Selection::Select,
                };
                block.forward(&h, pending.as_ref(), opts, self.rope.as_ref(), selection)
            };
            let (out_h, out_pending) = if self.autocast {
                nsa_sys::train::with_bf16_autocast(run)?
            } else {
                run()?
            };
            let g_pending_out = g_pending.as_ref().ok_or_else(|| {
                ModelError::Shape("activation recomputation: no gradient for a block output".into())
            })?;
            nsa_sys::autograd::backward(&[&out_h, &out_pending], &[&g_h, g_pending_out])?;
            g_h = grad_of(&h, "a block's residual stream")?;
            g_pending = pending
                .as_ref()
                .map(|p| grad_of(p, "a block's MLP input"))
                .transpose()?;
        }
        // The embedding (not an autocast operator): its gradient into the tied weight.
        let h0 = Tensor::f_embedding(&model.embed, &self.tokens, -1, false, false)?;
        nsa_sys::autograd::backward(&[&h0], &[&g_h])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AttentionKind, ModelConfig};
    use nsa_attn::{AttnPath, LeanOpts};
    use tch::{nn, Device, Kind};

    /// The `tiny` preset with `layers` blocks of `attention`, random tokens `[2, 37]` and
    /// weights for `sum(hidden · weights)`.
    fn tiny(
        attention: AttentionKind,
        layers: i64,
    ) -> (ModelConfig, nn::VarStore, Model, Tensor, Tensor) {
        let mut cfg = ModelConfig::preset("tiny")
            .unwrap()
            .with_attention(attention);
        cfg.n_layers = layers;
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Model::new(&vs.root(), &cfg).unwrap();
        let tokens = Tensor::randint(cfg.vocab_size, [2, 37], (Kind::Int64, Device::Cpu));
        let weights = Tensor::randn([2, 37, cfg.dim], (Kind::Float, Device::Cpu));
        (cfg, vs, model, tokens, weights)
    }

    /// Every parameter's gradient of `sum(hidden · weights)`, by name, plain or recomputed,
    /// the gradients zeroed first.
    fn gradients(
        vs: &nn::VarStore,
        model: &Model,
        tokens: &Tensor,
        weights: &Tensor,
        opts: &ForwardOpts,
        recompute: bool,
    ) -> Vec<(String, Tensor)> {
        for mut t in vs.trainable_variables() {
            t.zero_grad();
        }
        if recompute {
            let (hidden, rc) = model.forward_hidden_recompute(tokens, opts).unwrap();
            hidden.f_mul(weights).unwrap().sum(Kind::Float).backward();
            rc.backpropagate(model).unwrap();
        } else {
            let hidden = model.forward_hidden(tokens, opts).unwrap();
            hidden.f_mul(weights).unwrap().sum(Kind::Float).backward();
        }
        let mut grads: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(name, t)| (name, t.grad().copy()))
            .collect();
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        grads
    }

    /// Recomputed activations give the plain backward's gradients bit for bit on the CPU (NSA
    /// on the reference and lean paths, dense), every parameter reached, the tied embedding's
    /// two uses included.
    #[test]
    fn recomputed_gradients_equal_the_plain_ones() {
        let lean = ForwardOpts {
            path: AttnPath::Lean(LeanOpts {
                query_chunk: 5,
                window_chunk: 7,
                select_chunk: 3,
            }),
            ..Default::default()
        };
        let reference = ForwardOpts {
            path: AttnPath::Reference,
            ..Default::default()
        };
        for (attention, opts) in [
            (AttentionKind::Nsa, reference),
            (AttentionKind::Nsa, lean),
            (AttentionKind::Dense, reference),
        ] {
            let (_, vs, model, tokens, weights) = tiny(attention, 3);
            let plain = gradients(&vs, &model, &tokens, &weights, &opts, false);
            let recomputed = gradients(&vs, &model, &tokens, &weights, &opts, true);
            assert_eq!(plain.len(), recomputed.len());
            for ((name, a), (_, b)) in plain.iter().zip(&recomputed) {
                assert!(
                    a.defined() && b.defined(),
                    "{attention:?} {name}: no gradient"
                );
                assert!(
                    a.equal(b),
                    "{attention:?} {opts:?} {name}: gradients differ"
                );
            }
        }
    }

    /// The recomputation keeps each NSA block's selection (int32 `[B, S, Hkv, n]`) and its
    /// second forward takes it: a kept selection changed by hand (every token to block 0 alone)
    /// changes the gradients, so the second forward does not select again. Dense blocks keep
    /// none.
    #[test]
    fn the_second_forward_reuses_the_kept_selection() {
        for attention in [AttentionKind::Nsa, AttentionKind::Dense] {
            let (cfg, vs, model, tokens, weights) = tiny(attention, 2);
            let opts = ForwardOpts::default();
            let plain = gradients(&vs, &model, &tokens, &weights, &opts, false);
            for mut t in vs.trainable_variables() {
                t.zero_grad();
            }
            let (hidden, mut rc) = model.forward_hidden_recompute(&tokens, &opts).unwrap();
            if attention == AttentionKind::Dense {
                assert!(rc.selections.iter().all(Option::is_none));
                continue;
            }
            let n = cfg.nsa.select.top_n;
            for kept in &mut rc.selections {
                let ids = kept.as_ref().expect("an NSA block keeps its selection");
                assert_eq!(ids.size(), [2, 37, cfg.n_kv_heads, n]);
                assert_eq!(ids.kind(), Kind::Int);
                let only_first = ids.full_like(-1);
                let _ = only_first.narrow(3, 0, 1).fill_(0);
                *kept = Some(only_first);
            }
            hidden.f_mul(&weights).unwrap().sum(Kind::Float).backward();
            rc.backpropagate(&model).unwrap();
            let changed = vs
                .variables()
                .into_iter()
                .filter(|(name, t)| {
                    let a = &plain.iter().find(|(n, _)| n == name).unwrap().1;
                    !a.equal(&t.grad())
                })
                .count();
            assert!(changed > 0, "the hand-made selection was not used");
        }
    }

    /// A second backward without the loss's first is an error, not a panic.
    #[test]
    fn backward_before_the_loss_is_an_error() {
        let cfg = ModelConfig::preset("tiny").unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Model::new(&vs.root(), &cfg).unwrap();
        let tokens = Tensor::randint(cfg.vocab_size, [1, 9], (Kind::Int64, Device::Cpu));
        let (_hidden, rc) = model
            .forward_hidden_recompute(&tokens, &ForwardOpts::default())
            .unwrap();
        let err = rc.backpropagate(&model).unwrap_err().to_string();
        assert!(err.contains("did not reach"), "{err}");
    }
}
