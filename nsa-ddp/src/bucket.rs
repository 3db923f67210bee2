//! Gradient buckets: persistent flat buffers that gradients are packed into for communication.
//!
//! # Layout
//!
//! [`GradBuckets::new`] walks the trainable parameters in **reverse** order (roughly the order in
//! which backward produces their gradients, as PyTorch DDP does; [`GradBuckets::with_order`] takes
//! the order explicitly, e.g. the one observed in a backward pass) and keeps one *open* bucket per
//! (dtype, device). A parameter joins the open bucket of its dtype/device unless that would push
//! the bucket past `bucket_mb` MiB (2²⁰ bytes); then the open bucket is closed and a new one
//! started. A parameter larger than the cap closes the open bucket and gets a bucket of its own.
//! So, within one dtype/device, buckets are contiguous runs of the reversed parameter list, every
//! parameter is in exactly one bucket, and buckets are listed in the order they were started.
//!
//! Each bucket owns one contiguous 1-D buffer `flat` of its dtype on its device, `numel` =
//! the sum of its parameters' element counts. Entry `e` occupies
//! `flat[e.offset .. e.offset + e.numel]`, the parameter's gradient in row-major (contiguous)
//! order. The buffers are allocated once and reused every step.
use tch::{Device, Kind, Tensor};

use crate::DdpError;

/// Bytes in one "MB" of `bucket_mb` (MiB, as PyTorch's `bucket_cap_mb`).
pub const MB: f64 = (1u64 << 20) as f64;

/// Where one parameter lives inside its bucket's flat buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketEntry {
    /// Index of the parameter in the list given to [`GradBuckets::new`].
    pub param: usize,
    /// The parameter's name.
    pub name: String,
    /// First element of the parameter inside `flat`.
    pub offset: i64,
    /// Number of elements.
    pub numel: i64,
    /// The parameter's shape.
    pub shape: Vec<i64>,
}

/// One bucket: a flat buffer and the parameters packed into it.
#[derive(Debug)]
pub struct Bucket {
    kind: Kind,
    device: Device,
    flat: Tensor,
    entries: Vec<BucketEntry>,
}

impl Bucket {
    /// Entry `e`'s slice of the flat buffer, shaped like its parameter.
    fn entry_view(&self, e: &BucketEntry) -> Result<Tensor, tch::TchError> {
        self.flat
            .f_narrow(0, e.offset, e.numel)?
            .f_view(&e.shape[..])
    }

    /// The dtype of the buffer (and of every parameter in it).
    pub fn kind(&self) -> Kind {
        self.kind
    }
    /// The device of the buffer.
    pub fn device(&self) -> Device {
        self.device
    }
    /// Elements in the buffer.
    pub fn numel(&self) -> i64 {
        self.entries.iter().map(|e| e.numel).sum()
    }
    /// Bytes of the buffer.
    pub fn bytes(&self) -> usize {
        self.numel() as usize * self.kind.elt_size_in_bytes()
    }
    /// The parameters in this bucket, in packing order (reverse parameter order).
    pub fn entries(&self) -> &[BucketEntry] {
        &self.entries
    }
    /// The flat buffer, `[numel]`, contiguous.
    pub fn flat(&self) -> &Tensor {
        &self.flat
    }
    /// The flat buffer, mutable (for in-place collectives).
    pub fn flat_mut(&mut self) -> &mut Tensor {
        &mut self.flat
    }
}

/// The bucket plan and buffers for a list of parameters (see the module docs).
#[derive(Debug)]
pub struct GradBuckets {
    params: Vec<(String, Tensor)>,
    buckets: Vec<Bucket>,
    cap_bytes: usize,
    bucket_mb: f64,
    order: Vec<usize>,
}

impl GradBuckets {
    /// Plans buckets of at most `bucket_mb` MiB over `params` (forward order, as a `VarStore`
    /// lists them; only trainable parameters belong here) and allocates their buffers.
    /// The tensors are kept as shallow clones: they share storage with the caller's parameters.
    pub fn new(params: &[(String, Tensor)], bucket_mb: f64) -> Result<Self, DdpError> {
        let reversed: Vec<usize> = (0..params.len()).rev().collect();
        Self::with_order(params, bucket_mb, &reversed)
    }

    /// As [`GradBuckets::new`], but fills the buckets in `order` (indices into `params`, each
    /// exactly once) instead of reverse order: the order in which backward makes the gradients
    /// ready, so that the first bucket is complete first.
    pub fn with_order(
        params: &[(String, Tensor)],
        bucket_mb: f64,
        order: &[usize],
    ) -> Result<Self, DdpError> {
        let mut seen = vec![false; params.len()];
        for &i in order {
            match seen.get_mut(i) {
                Some(s) if !*s => *s = true,
                _ => {
                    return Err(DdpError::Invalid(format!(
                        "bucket order must list each of the {} parameters once (bad or repeated index {i})",
                        params.len()
                    )))
                }
            }
        }
        if order.len() != params.len() {
            return Err(DdpError::Invalid(format!(
                "bucket order lists {} of {} parameters",
                order.len(),
                params.len()
            )));
        }
        if !(bucket_mb.is_finite() && bucket_mb > 0.0) {
            return Err(DdpError::Invalid(format!(
                "bucket size must be a positive number of MB, got {bucket_mb}"
            )));
        }
        let cap_bytes = ((bucket_mb * MB) as usize).max(1);
        struct Plan {
            kind: Kind,
            device: Device,
            params: Vec<usize>,
            bytes: usize,
            open: bool,
        }
        let mut plans: Vec<Plan> = Vec::new();
        for &idx in order {
            let t = &params[idx].1;
            let (kind, device) = (t.kind(), t.device());
            let bytes = t.numel() * kind.elt_size_in_bytes();
            let open = plans
                .iter()
                .position(|p| p.open && p.kind == kind && p.device == device);
            let fits = |p: &Plan| p.params.is_empty() || p.bytes + bytes <= cap_bytes;
            match open {
                Some(i) if bytes <= cap_bytes && fits(&plans[i]) => {
                    plans[i].params.push(idx);
                    plans[i].bytes += bytes;
                    continue;
                }
                Some(i) => plans[i].open = false,
                None => {}
            }
            plans.push(Plan {
                kind,
                device,
                params: vec![idx],
                bytes,
                // An oversized parameter is alone in its bucket.
                open: bytes <= cap_bytes,
            });
        }
        let buckets = tch::no_grad(|| {
            plans
                .into_iter()
                .map(|plan| {
                    let mut offset = 0;
                    let entries: Vec<BucketEntry> = plan
                        .params
                        .iter()
                        .map(|&i| {
                            let t = &params[i].1;
                            let numel = t.numel() as i64;
                            let e = BucketEntry {
                                param: i,
                                name: params[i].0.clone(),
                                offset,
                                numel,
                                shape: t.size(),
                            };
                            offset += numel;
                            e
                        })
                        .collect();
                    Ok(Bucket {
                        kind: plan.kind,
                        device: plan.device,
                        flat: Tensor::f_zeros([offset], (plan.kind, plan.device))?,
                        entries,
                    })
                })
                .collect::<Result<Vec<_>, DdpError>>()
        })?;
        Ok(GradBuckets {
            params: params
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
            buckets,
            cap_bytes,
            bucket_mb,
            order: order.to_vec(),
        })
    }

    /// The bucket size given to the constructor, in MB.
    pub fn bucket_mb(&self) -> f64 {
        self.bucket_mb
    }

    /// The order in which parameters were packed (reverse order for [`GradBuckets::new`]).
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// The buckets, in communication order.
    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// The buckets, mutable (to run collectives on their buffers).
    pub fn buckets_mut(&mut self) -> &mut [Bucket] {
        &mut self.buckets
    }

    /// The cap in bytes derived from `bucket_mb`.
    pub fn cap_bytes(&self) -> usize {
        self.cap_bytes
    }

    /// The parameters, in the order given to [`GradBuckets::new`].
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Copies the gradients of bucket `i`'s parameters into its flat buffer. A parameter with
    /// no gradient contributes zeros; its name is returned so the caller can report it.
    pub fn pack(&mut self, i: usize) -> Result<Vec<String>, DdpError> {
        let mut missing = Vec::new();
        let bucket = &mut self.buckets[i];
        tch::no_grad(|| -> Result<(), DdpError> {
            for e in &bucket.entries {
                let grad = self.params[e.param].1.f_grad()?;
                let mut dst = bucket.flat.f_narrow(0, e.offset, e.numel)?;
                if grad.defined() {
                    dst.f_copy_(&grad.f_reshape([-1])?)?;
                } else {
                    let _ = dst.f_zero_()?;
                    missing.push(e.name.clone());
                }
            }
            Ok(())
        })?;
        Ok(missing)
    }

    /// Copies bucket `i`'s flat buffer back into its parameters' gradients (those that have one).
    pub fn unpack(&mut self, i: usize) -> Result<(), DdpError> {
        let bucket = &self.buckets[i];
        tch::no_grad(|| {
            for e in &bucket.entries {
                let mut grad = self.params[e.param].1.f_grad()?;
                if grad.defined() {
                    grad.f_copy_(&bucket.entry_view(e)?)?;
                }
            }
            Ok(())
        })
    }

    /// Copies the *values* of bucket `i`'s parameters into its flat buffer (for broadcasts and
    /// checksums).
    pub fn pack_values(&mut self, i: usize) -> Result<(), DdpError> {
        let bucket = &mut self.buckets[i];
        tch::no_grad(|| {
            for e in &bucket.entries {
                let p = &self.params[e.param].1;
                bucket
                    .flat
                    .f_narrow(0, e.offset, e.numel)?
                    .f_copy_(&p.f_detach()?.f_reshape([-1])?)?;
            }
            Ok(())
        })
    }

    /// Copies bucket `i`'s flat buffer into its parameters' values (in place, without autograd).
    pub fn unpack_values(&mut self, i: usize) -> Result<(), DdpError> {
        let bucket = &self.buckets[i];
        tch::no_grad(|| {
            for e in &bucket.entries {
                let mut p = self.params[e.param].1.f_detach()?;
                p.f_copy_(&bucket.entry_view(e)?)?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, numel: i64, kind: Kind) -> (String, Tensor) {
        (
            name.to_string(),
            Tensor::zeros([numel], (kind, Device::Cpu)),
        )
    }

    fn names(b: &GradBuckets) -> Vec<Vec<String>> {
        b.buckets()
            .iter()
            .map(|b| b.entries().iter().map(|e| e.name.clone()).collect())
            .collect()
    }

    #[test]
    fn greedy_reverse_plan_with_oversized_param() {
        // f32: 4 bytes each. Cap = 64 bytes = 16 elements.
        let params = vec![
            p("a", 4, Kind::Float),
            p("b", 8, Kind::Float),
            p("c", 40, Kind::Float), // 160 bytes > cap: alone
            p("d", 6, Kind::Float),
            p("e", 6, Kind::Float),
            p("f", 6, Kind::Float),
        ];
        let b = GradBuckets::new(&params, 64.0 / MB).unwrap();
        assert_eq!(b.cap_bytes(), 64);
        assert_eq!(
            names(&b),
            vec![vec!["f", "e"], vec!["d"], vec!["c"], vec!["b", "a"]]
        );
        let first = &b.buckets()[0];
        assert_eq!(first.entries()[1].offset, 6);
        assert_eq!(first.flat().size(), vec![12]);
        assert_eq!(first.bytes(), 48);
    }

    #[test]
    fn buckets_are_per_dtype() {
        let params = vec![
            p("a", 2, Kind::Float),
            p("b", 2, Kind::Double),
            p("c", 2, Kind::Float),
            p("d", 2, Kind::Double),
        ];
        let b = GradBuckets::new(&params, 1.0).unwrap();
        assert_eq!(names(&b), vec![vec!["d", "b"], vec!["c", "a"]]);
        assert_eq!(b.buckets()[0].kind(), Kind::Double);
        assert_eq!(b.buckets()[1].kind(), Kind::Float);
    }

    #[test]
    fn explicit_order_fills_buckets_in_that_order() {
        let params = vec![
            p("a", 4, Kind::Float),
            p("b", 4, Kind::Float),
            p("c", 4, Kind::Float),
            p("d", 4, Kind::Float),
        ];
        // Cap 32 bytes = two parameters per bucket.
        let b = GradBuckets::with_order(&params, 32.0 / MB, &[2, 0, 3, 1]).unwrap();
        assert_eq!(names(&b), vec![vec!["c", "a"], vec!["d", "b"]]);
        assert_eq!(b.order(), &[2, 0, 3, 1]);
        for bad in [&[0, 1, 2][..], &[0, 1, 2, 2], &[0, 1, 2, 4]] {
            assert!(matches!(
                GradBuckets::with_order(&params, 1.0, bad),
                Err(DdpError::Invalid(_))
            ));
        }
    }

    #[test]
    fn bad_bucket_size_is_rejected() {
        let params = vec![p("a", 2, Kind::Float)];
        for mb in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                GradBuckets::new(&params, mb),
                Err(DdpError::Invalid(_))
            ));
        }
    }

    #[test]
    fn pack_unpack_round_trip_and_missing_grads() {
        let w = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0])
            .view([2, 2])
            .set_requires_grad(true);
        let unused = Tensor::zeros([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        (&w * &w).sum(Kind::Float).backward();
        let params = vec![("w".to_string(), w.shallow_clone()), ("u".into(), unused)];
        let mut b = GradBuckets::new(&params, 1.0).unwrap();
        assert_eq!(b.buckets().len(), 1);
        let missing = b.pack(0).unwrap();
        assert_eq!(missing, vec!["u".to_string()]);
        // Order: u (reversed first) at 0..3, then w at 3..7.
        let flat = Vec::<f32>::try_from(b.buckets()[0].flat()).unwrap();
        assert_eq!(flat, vec![0.0, 0.0, 0.0, 2.0, 4.0, 6.0, 8.0]);
        let _ = b.buckets_mut()[0].flat_mut().g_mul_scalar_(0.5);
        b.unpack(0).unwrap();
        let g = Vec::<f32>::try_from(w.grad().reshape([-1])).unwrap();
        assert_eq!(g, vec![1.0, 2.0, 3.0, 4.0]);
        // Values: pack, change, unpack.
        b.pack_values(0).unwrap();
        let _ = b.buckets_mut()[0].flat_mut().g_add_scalar_(1.0);
        b.unpack_values(0).unwrap();
        let v = Vec::<f32>::try_from(w.detach().reshape([-1])).unwrap();
        assert_eq!(v, vec![2.0, 3.0, 4.0, 5.0]);
    }
}
