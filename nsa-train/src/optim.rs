//! AdamW with decoupled weight decay, fp32 state that can be saved and restored, global-norm
//! gradient clipping, and the warmup + cosine learning-rate schedule.
//!
//! tch's own optimizers cannot save their state, so resuming with them would restart the moment
//! estimates; this one keeps `m` and `v` as named fp32 tensors and writes them to safetensors.
//!
//! On CUDA the step, the gradient norm and the zeroing run on libtorch's multi-tensor kernels
//! (`nsa_sys::optim`: `_fused_adamw_`, `_foreach_norm`, `_foreach_zero_`), a few launches for
//! the whole model instead of about twenty per parameter tensor; on the CPU as per-tensor
//! operators. Both follow the same formula; they differ in float rounding only.
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this value (0 = no clipping).
    pub grad_clip: f64,
    /// Micro-batches accumulated per optimizer step.
    pub grad_accum: u64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 20,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            grad_accum: 1,
        }
    }
}

impl OptimConfig {
    /// Every hyper-parameter finite and in its range (an infinite `eps` would silently stop
    /// learning; an `lr` of 1e30 only produces NaN weights).
    pub fn validate(&self) -> Result<()> {
        for (key, v) in [
            ("lr", self.lr),
            ("min_lr", self.min_lr),
            ("weight_decay", self.weight_decay),
            ("beta1", self.beta1),
            ("beta2", self.beta2),
            ("eps", self.eps),
            ("grad_clip", self.grad_clip),
        ] {
            ensure!(
                v.is_finite(),
                "optim.{key} must be a finite number (got {v})"
            );
        }
        ensure!(
            self.lr > 0.0 && self.lr <= 10.0,
            "optim.lr must be in (0, 10] (got {})",
            self.lr
        );
        ensure!(
            self.min_lr >= 0.0 && self.min_lr <= self.lr,
            "optim.min_lr must be in [0, lr] (got {})",
            self.min_lr
        );
        ensure!(
            (0.0..1.0).contains(&self.beta1),
            "optim.beta1 must be in [0, 1) (got {})",
            self.beta1
        );
        ensure!(
            (0.0..1.0).contains(&self.beta2),
            "optim.beta2 must be in [0, 1) (got {})",
            self.beta2
        );
        ensure!(
            self.eps > 0.0 && self.eps <= 1.0,
            "optim.eps must be in (0, 1] (got {})",
            self.eps
        );
        ensure!(
            (0.0..=10.0).contains(&self.weight_decay),
            "optim.weight_decay must be in [0, 10] (got {})",
            self.weight_decay
        );
        ensure!(
            self.grad_clip >= 0.0,
            "optim.grad_clip must be >= 0 (got {})",
            self.grad_clip
        );
        ensure!(
            self.grad_accum >= 1,
            "optim.grad_accum must be >= 1 (got {})",
            self.grad_accum
        );
        Ok(())
    }

    /// Learning rate at `step` (0-based) of `total`: linear warmup, then cosine to `min_lr`.
    pub fn lr_at(&self, step: u64, total: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        self.min_lr
            + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

#[derive(Debug)]
struct Slot {
    name: String,
    param: Tensor,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

/// AdamW over named fp32 parameters.
#[derive(Debug)]
pub struct AdamW {
    cfg: OptimConfig,
    slots: Vec<Slot>,
    /// Step, norm and zeroing on libtorch's multi-tensor kernels (every parameter on CUDA).
    multi_tensor: bool,
    /// Optimizer steps taken (bias correction uses it).
    pub steps: u64,
}

impl AdamW {
    /// `decay` / `no_decay`: (name, parameter) lists, e.g. from `nsa_model::decay_groups`.
    pub fn new(
        cfg: OptimConfig,
        decay: Vec<(String, Tensor)>,
        no_decay: Vec<(String, Tensor)>,
    ) -> Result<Self> {
        let slot = |(name, param): (String, Tensor), decay: bool| -> Result<Slot> {
            Ok(Slot {
                m: param.f_zeros_like()?.f_to_kind(Kind::Float)?,
                v: param.f_zeros_like()?.f_to_kind(Kind::Float)?,
                name,
                param,
                decay,
            })
        };
        let mut slots = Vec::with_capacity(decay.len() + no_decay.len());
        for p in decay {
            slots.push(slot(p, true)?);
        }
        for p in no_decay {
            slots.push(slot(p, false)?);
        }
        slots.sort_by(|a, b| a.name.cmp(&b.name));
        let multi_tensor = !slots.is_empty()
            && slots
                .iter()
                .all(|s| matches!(s.param.device(), tch::Device::Cuda(_)));
        Ok(AdamW {
            cfg,
            slots,
            multi_tensor,
            steps: 0,
        })
    }

    /// Runs the step, norm and zeroing on libtorch's multi-tensor kernels (`on`) or as
    /// per-tensor operators. [`AdamW::new`] picks the kernels when every parameter is on CUDA;
    /// libtorch also implements them on the CPU, where tests compare the two.
    #[cfg(test)]
    pub fn with_multi_tensor(mut self, on: bool) -> Self {
        self.multi_tensor = on;
        self
    }

    /// The parameters whose gradients are defined.
    fn with_grads(&self) -> Vec<Tensor> {
        self.slots
            .iter()
            .filter(|s| s.param.grad().defined())
            .map(|s| s.param.shallow_clone())
            .collect()
    }

    pub fn zero_grad(&mut self) -> Result<()> {
        if self.multi_tensor {
            let params: Vec<Tensor> = self.slots.iter().map(|s| s.param.shallow_clone()).collect();
            return Ok(nsa_sys::optim::zero_grads(&params)?);
        }
        for s in &mut self.slots {
            let mut g = s.param.grad();
            if g.defined() {
                let _ = g.f_zero_()?;
            }
        }
        Ok(())
    }

    /// Global L2 norm of all gradients (NaN/inf propagate, so the caller can guard on it).
    pub fn grad_norm(&self) -> Result<f64> {
        if self.multi_tensor {
            let params = self.with_grads();
            if params.is_empty() {
                return Ok(0.0);
            }
            return Ok(nsa_sys::optim::grad_norm(&params)?.f_double_value(&[])?);
        }
        let mut norms = Vec::new();
        for s in &self.slots {
            let g = s.param.grad();
            if g.defined() {
                norms.push(g.f_to_kind(Kind::Float)?.f_square()?.f_sum(Kind::Float)?);
            }
        }
        if norms.is_empty() {
            return Ok(0.0);
        }
        Ok(Tensor::f_stack(&norms, 0)?
            .f_sum(Kind::Float)?
            .f_sqrt()?
            .f_double_value(&[])?)
    }

    /// Clips to `grad_clip` given the norm, then takes one AdamW step at learning rate `lr`.
    pub fn step(&mut self, lr: f64, grad_norm: f64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let c = &self.cfg;
        let clip = if c.grad_clip > 0.0 && grad_norm > c.grad_clip {
            c.grad_clip / (grad_norm + 1e-6)
        } else {
            1.0
        };
        self.steps += 1;
        let t = self.steps as i32;
        if self.multi_tensor {
            // One call per weight-decay group, parameters with a gradient only.
            for decay in [true, false] {
                let group: Vec<&Slot> = self
                    .slots
                    .iter()
                    .filter(|s| s.decay == decay && s.param.grad().defined())
                    .collect();
                let list = |f: fn(&Slot) -> &Tensor| -> Vec<Tensor> {
                    group.iter().map(|s| f(s).shallow_clone()).collect()
                };
                nsa_sys::optim::fused_adamw(
                    &list(|s| &s.param),
                    &list(|s| &s.m),
                    &list(|s| &s.v),
                    nsa_sys::optim::AdamWStep {
                        step: self.steps,
                        lr,
                        beta1: c.beta1,
                        beta2: c.beta2,
                        weight_decay: if decay { c.weight_decay } else { 0.0 },
                        eps: c.eps,
                        grad_divisor: 1.0 / clip,
                    },
                )?;
            }
            return Ok(());
        }
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for s in &mut self.slots {
            let g = s.param.grad();
            if !g.defined() {
                continue;
            }
            let g = g.f_to_kind(Kind::Float)?.f_mul_scalar(clip)?;
            let _ =
                s.m.f_mul_scalar_(c.beta1)?
                    .f_add_(&g.f_mul_scalar(1.0 - c.beta1)?)?;
            let _ =
                s.v.f_mul_scalar_(c.beta2)?
                    .f_add_(&g.f_square()?.f_mul_scalar(1.0 - c.beta2)?)?;
            if s.decay && c.weight_decay > 0.0 {
                let _ = s.param.f_mul_scalar_(1.0 - lr * c.weight_decay)?;
            }
            let denom = s.v.f_div_scalar(bc2)?.f_sqrt()?.f_add_scalar(c.eps)?;
            let update = s.m.f_div_scalar(bc1)?.f_div(&denom)?.f_mul_scalar(lr)?;
            let _ = s.param.f_sub_(&update.f_to_kind(s.param.kind())?)?;
        }
        Ok(())
    }

    /// The first parameter or moment that holds a NaN or infinity, by name (`None`: all finite).
    /// Checked before a checkpoint is written and after one is loaded.
    pub fn first_non_finite(&self) -> Result<Option<String>> {
        let _g = tch::no_grad_guard();
        for s in &self.slots {
            for (what, t) in [("", &s.param), ("m.", &s.m), ("v.", &s.v)] {
                if !bool::try_from(t.f_isfinite()?.f_all()?)? {
                    return Ok(Some(format!("{what}{}", s.name)));
                }
            }
        }
        Ok(None)
    }

    /// Writes `m.<name>` and `v.<name>` for every parameter to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut named: Vec<(String, Tensor)> = Vec::with_capacity(2 * self.slots.len());
        for s in &self.slots {
            named.push((format!("m.{}", s.name), s.m.f_to_device(tch::Device::Cpu)?));
            named.push((format!("v.{}", s.name), s.v.f_to_device(tch::Device::Cpu)?));
        }
        Tensor::write_safetensors(&named, path)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Restores the moments saved by [`AdamW::save`]; every parameter must be present with the
    /// same shape, and no unknown names may appear.
    pub fn load(&mut self, path: &Path, steps: u64) -> Result<()> {
        let named = Tensor::read_safetensors(path)
            .with_context(|| format!("reading optimizer state {}", path.display()))?;
        let mut map: std::collections::HashMap<String, Tensor> = named.into_iter().collect();
        for s in &mut self.slots {
            for (prefix, dst) in [("m", &mut s.m), ("v", &mut s.v)] {
                let key = format!("{prefix}.{}", s.name);
                let src = map.remove(&key).with_context(|| {
                    format!(
                        "optimizer state {} has no {key}: it belongs to another model",
                        path.display()
                    )
                })?;
                if src.size() != dst.size() {
                    bail!(
                        "optimizer state {}: {key} has shape {:?}, the model needs {:?}",
                        path.display(),
                        src.size(),
                        dst.size()
                    );
                }
                let _g = tch::no_grad_guard();
                dst.f_copy_(&src)?;
            }
        }
        if let Some(extra) = map.keys().next() {
            bail!(
                "optimizer state {} has {extra}, which this model lacks",
                path.display()
            );
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let c = OptimConfig {
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 10,
            ..Default::default()
        };
        assert!((c.lr_at(0, 100) - 0.1).abs() < 1e-12);
        assert!((c.lr_at(9, 100) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(10, 100) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(100, 100) - 0.1).abs() < 1e-12);
        assert!(c.lr_at(50, 100) < 1.0 && c.lr_at(50, 100) > 0.1);
    }

    /// One step against the AdamW formula written out by hand.
    #[test]
    fn step_matches_the_formula() {
        let cfg = OptimConfig {
            lr: 0.1,
            weight_decay: 0.5,
            grad_clip: 0.0,
            ..Default::default()
        };
        let w = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let b = Tensor::from_slice(&[0.5f32]).set_requires_grad(true);
        let loss = (&w * Tensor::from_slice(&[3.0f32, 4.0])).sum(Kind::Float)
            + (&b * 2.0).sum(Kind::Float);
        loss.backward();
        let mut opt = AdamW::new(
            cfg.clone(),
            vec![("w".into(), w.shallow_clone())],
            vec![("b".into(), b.shallow_clone())],
        )
        .unwrap();
        let norm = opt.grad_norm().unwrap();
        assert!((norm - (9.0f64 + 16.0 + 4.0).sqrt()).abs() < 1e-5);
        opt.step(0.1, norm).unwrap();
        // Step 1: m̂ = g, v̂ = g², update = lr · g/(|g| + eps) = ±lr; decay multiplies w by 1 - lr·wd.
        let w1 = Vec::<f32>::try_from(&w).unwrap();
        assert!((w1[0] - (1.0 * 0.95 - 0.1)).abs() < 1e-5, "{w1:?}");
        assert!((w1[1] - (-2.0 * 0.95 - 0.1)).abs() < 1e-5, "{w1:?}");
        let b1 = Vec::<f32>::try_from(&b).unwrap();
        assert!((b1[0] - (0.5 - 0.1)).abs() < 1e-5, "no decay on b: {b1:?}");
    }

    /// The multi-tensor kernels (what CUDA runs; libtorch has them on the CPU too) and the
    /// per-tensor operators take the same steps: clipping, both decay groups, a parameter
    /// without a gradient, three steps.
    #[test]
    fn multi_tensor_steps_equal_the_per_tensor_ones() {
        let cfg = OptimConfig {
            lr: 0.05,
            weight_decay: 0.1,
            grad_clip: 1.0,
            ..Default::default()
        };
        let run = |multi: bool| -> Vec<Vec<f32>> {
            tch::manual_seed(7);
            let f = (Kind::Float, tch::Device::Cpu);
            let w = Tensor::randn([4, 3], f).set_requires_grad(true);
            let b = Tensor::randn([3], f).set_requires_grad(true);
            let unused = Tensor::randn([2], f).set_requires_grad(true);
            let mut opt = AdamW::new(
                cfg.clone(),
                vec![("w".into(), w.shallow_clone())],
                vec![
                    ("b".into(), b.shallow_clone()),
                    ("unused".into(), unused.shallow_clone()),
                ],
            )
            .unwrap()
            .with_multi_tensor(multi);
            for step in 0..3 {
                opt.zero_grad().unwrap();
                let x = Tensor::randn([5, 4], f);
                let loss = (x.matmul(&w) + &b).square().sum(Kind::Float) * (step + 1) as f64;
                loss.backward();
                let n = opt.grad_norm().unwrap();
                assert!(n > cfg.grad_clip, "the test should clip");
                opt.step(cfg.lr, n).unwrap();
            }
            let mut out: Vec<Vec<f32>> = Vec::new();
            for s in &opt.slots {
                for t in [&s.param, &s.m, &s.v] {
                    out.push(Vec::<f32>::try_from(&t.detach().flatten(0, -1)).unwrap());
                }
            }
            out
        };
        let (per_tensor, multi) = (run(false), run(true));
        for (i, (a, b)) in per_tensor.iter().zip(&multi).enumerate() {
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= 1e-5 * (1.0 + x.abs()),
                    "tensor {i}: {x} vs {y}"
                );
            }
        }
    }

    #[test]
    fn clipping_scales_the_gradient() {
        let cfg = OptimConfig {
            grad_clip: 1.0,
            weight_decay: 0.0,
            ..Default::default()
        };
        let w = Tensor::from_slice(&[0.0f32]).set_requires_grad(true);
        (&w * 100.0).sum(Kind::Float).backward();
        let mut opt = AdamW::new(cfg, vec![], vec![("w".into(), w.shallow_clone())]).unwrap();
        let n = opt.grad_norm().unwrap();
        opt.step(0.1, n).unwrap();
        // m = 0.1 · g · clip = 0.1 · 100 · 0.01; Adam's step size is still lr (ratio m̂/√v̂ = 1).
        let m = Vec::<f32>::try_from(&opt.slots[0].m).unwrap()[0];
        assert!((m - 0.1).abs() < 1e-4, "{m}");
    }

    #[test]
    fn state_round_trips_and_mismatches_are_named() {
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().to_path_buf();
        std::fs::create_dir_all(&dir).unwrap();
        let w = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        (&w * &w).sum(Kind::Float).backward();
        let mut a = AdamW::new(
            OptimConfig::default(),
            vec![("w".into(), w.shallow_clone())],
            vec![],
        )
        .unwrap();
        let n = a.grad_norm().unwrap();
        a.step(0.01, n).unwrap();
        let path = dir.join("optim.safetensors");
        a.save(&path).unwrap();
        let w2 = Tensor::from_slice(&[1.0f32, 2.0]);
        let mut b = AdamW::new(OptimConfig::default(), vec![("w".into(), w2)], vec![]).unwrap();
        b.load(&path, a.steps).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(&b.slots[0].v).unwrap(),
            Vec::<f32>::try_from(&a.slots[0].v).unwrap()
        );
        let mut c = AdamW::new(
            OptimConfig::default(),
            vec![(
                "other".into(),
                Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)),
            )],
            vec![],
        )
        .unwrap();
        assert!(c
            .load(&path, 1)
            .unwrap_err()
            .to_string()
            .contains("has no m.other"));
        let mut d = AdamW::new(
            OptimConfig::default(),
            vec![(
                "w".into(),
                Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)),
            )],
            vec![],
        )
        .unwrap();
        assert!(d.load(&path, 1).unwrap_err().to_string().contains("shape"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
