//! Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p,
//! on the host with the data pipeline's seeded generator (the same tokens on every device).
use anyhow::{anyhow, ensure, Result};

use crate::data::Rng;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Softmax temperature; 0 means greedy (the most likely token).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (nucleus).
    pub top_p: Option<f64>,
}

impl Sampling {
    pub const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_k: None,
        top_p: None,
    };

    /// Every value in range: temperature finite and ≥ 0, k ≥ 1, p in (0, 1].
    pub fn check(&self) -> Result<()> {
        ensure!(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "--temperature must be a finite number >= 0 (0 = greedy), got {}",
            self.temperature
        );
        ensure!(self.top_k != Some(0), "--top-k must be at least 1");
        if let Some(p) = self.top_p {
            ensure!(p > 0.0 && p <= 1.0, "--top-p must lie in (0, 1], got {p}");
        }
        Ok(())
    }

    /// One line for the log.
    pub fn describe(&self) -> String {
        if self.temperature == 0.0 {
            return "greedy".into();
        }
        let mut s = format!("temperature {}", self.temperature);
        if let Some(k) = self.top_k {
            s += &format!(", top-k {k}");
        }
        if let Some(p) = self.top_p {
            s += &format!(", top-p {p}");
        }
        s
    }
}

/// [`Sampling`] with its random state.
#[derive(Debug)]
pub struct Sampler {
    how: Sampling,
    rng: Rng,
}

impl Sampler {
    pub fn new(how: Sampling, seed: u64) -> Result<Self> {
        how.check()?;
        Ok(Self {
            how,
            rng: Rng::new(&[seed, 0x5a4d_504c]),
        })
    }

    /// The next token for one sequence's `logits` `[V]`. Equal logits go to the lower id;
    /// NaN logits count as impossible.
    pub fn pick(&mut self, logits: &[f32]) -> Result<i64> {
        const ALL_NAN: &str = "every logit is NaN: the model's output is broken";
        // Ids by logit, highest first (ties: lower id first), NaN excluded: a total order, so
        // its first k ids are the same however they are found.
        // Greedy needs only the first id: one pass over the logits, no list of ids (the pick
        // that listed 50,304 ids first took 0.16–0.22 ms on the GPU host, a tenth of a token
        // from graphs; one pass takes a third of the old pick's time on the CPU machine).
        if self.how.temperature == 0.0 {
            let mut best: Option<(usize, f32)> = None;
            for (i, &x) in logits.iter().enumerate() {
                // Strictly above: an equal logit later keeps the lower id.
                let above = best.is_none_or(|(_, b)| x.total_cmp(&b).is_gt());
                if !x.is_nan() && above {
                    best = Some((i, x));
                }
            }
            return best.map(|(i, _)| i as i64).ok_or_else(|| anyhow!(ALL_NAN));
        }
        let rank = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        let mut order: Vec<usize> = (0..logits.len()).filter(|&i| !logits[i].is_nan()).collect();
        ensure!(!order.is_empty(), ALL_NAN);
        // Top-k needs only the first k ids of the order: a selection and a sort of k ids
        // (sorting a 50,304-token vocabulary took about 2 ms a token).
        match self.how.top_k {
            Some(k) if k < order.len() => {
                order.select_nth_unstable_by(k.saturating_sub(1), rank);
                order.truncate(k);
                order.sort_by(rank);
            }
            _ => order.sort_by(rank),
        }
        Ok(draw(&self.how, &mut self.rng, logits, &order))
    }
}

/// A draw with `how`'s temperature and top-p from `order` (ids, most likely first, not empty,
/// already cut to top-k): each id weighted by `exp((logit − top) / temperature)`, the list cut
/// where the probability mass reaches p, one uniform number from `rng`.
fn draw(how: &Sampling, rng: &mut Rng, logits: &[f32], order: &[usize]) -> i64 {
    let top = f64::from(logits[order[0]]);
    let mut weights: Vec<f64> = order
        .iter()
        .map(|&i| f64::exp((f64::from(logits[i]) - top) / how.temperature))
        .collect();
    let total: f64 = weights.iter().sum();
    if let Some(p) = how.top_p {
        let mut mass = 0.0;
        let keep = weights
            .iter()
            .position(|w| {
                mass += w / total;
                mass >= p
            })
            .map_or(weights.len(), |i| i + 1);
        weights.truncate(keep);
    }
    let total: f64 = weights.iter().sum();
    // Uniform in [0, total): the top 53 bits of the generator.
    let mut u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64 * total;
    for (&id, w) in order.iter().zip(&weights) {
        if u < *w {
            return id as i64;
        }
        u -= w;
    }
    order[weights.len() - 1] as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f64, top_k: Option<usize>, top_p: Option<f64>) -> Sampler {
        Sampler::new(
            Sampling {
                temperature,
                top_k,
                top_p,
            },
            7,
        )
        .unwrap()
    }

    #[test]
    fn greedy_takes_the_largest_logit_and_the_lower_id_on_ties() {
        let mut s = sampler(0.0, None, None);
        assert_eq!(s.pick(&[0.1, 2.0, -1.0, 2.0]).unwrap(), 1);
        assert_eq!(s.pick(&[f32::NAN, -3.0, -4.0]).unwrap(), 1);
        assert!(s.pick(&[f32::NAN]).is_err());
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [1.0f32, 3.0, 2.9, -2.0, 2.8];
        let mut k2 = sampler(1.0, Some(2), None);
        let mut nucleus = sampler(5.0, None, Some(0.5));
        let mut all = sampler(1.0, None, None);
        let (mut seen_k2, mut seen_p, mut seen_all) = (vec![0; 5], vec![0; 5], vec![0; 5]);
        for _ in 0..2000 {
            seen_k2[k2.pick(&logits).unwrap() as usize] += 1;
            seen_p[nucleus.pick(&logits).unwrap() as usize] += 1;
            seen_all[all.pick(&logits).unwrap() as usize] += 1;
        }
        // top-k 2: ids 1 and 2 only, both drawn.
        assert_eq!(seen_k2.iter().filter(|&&n| n > 0).count(), 2, "{seen_k2:?}");
        assert!(seen_k2[1] > 0 && seen_k2[2] > 0);
        // At temperature 5 the three top ids carry about 0.23 each: p = 0.5 keeps three.
        assert_eq!(seen_p[0] + seen_p[3], 0, "{seen_p:?}");
        assert!(
            seen_p[1] > 0 && seen_p[2] > 0 && seen_p[4] > 0,
            "{seen_p:?}"
        );
        // Without limits every id with a non-negligible probability appears.
        assert!(seen_all.iter().all(|&n| n > 0), "{seen_all:?}");
        // top-k 1 and a tiny top-p are greedy.
        assert_eq!(sampler(2.0, Some(1), None).pick(&logits).unwrap(), 1);
        assert_eq!(sampler(2.0, None, Some(1e-9)).pick(&logits).unwrap(), 1);
    }

    /// The sampler's choice of candidates as it was before greedy and top-k stopped sorting
    /// the whole vocabulary (the draw from them is `draw`, which did not change).
    fn pick_by_full_sort(how: Sampling, rng: &mut Rng, logits: &[f32]) -> Option<i64> {
        let mut order: Vec<usize> = (0..logits.len()).filter(|&i| !logits[i].is_nan()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if how.temperature == 0.0 {
            return order.first().map(|&i| i as i64);
        }
        if let Some(k) = how.top_k {
            order.truncate(k);
        }
        (!order.is_empty()).then(|| draw(&how, rng, logits, &order))
    }

    proptest::proptest! {
        /// Greedy and top-k picks equal a full sort's, draw for draw with the same seed, on
        /// logits from a few values (ties) with NaNs among them.
        #[test]
        fn picks_equal_the_full_sort(
            levels in proptest::collection::vec(0u8..6, 1..80),
            temperature in proptest::sample::select(vec![0.0, 0.7, 1.0]),
            top_k in proptest::option::of(1usize..10),
            top_p in proptest::option::of(proptest::sample::select(vec![0.3, 0.9, 1.0])),
            seed in 0u64..1000,
        ) {
            let logits: Vec<f32> = levels
                .iter()
                .map(|&l| if l == 5 { f32::NAN } else { f32::from(l) * 0.5 - 1.0 })
                .collect();
            let how = Sampling { temperature, top_k, top_p };
            let mut fast = Sampler::new(how, seed).unwrap();
            let mut rng = Rng::new(&[seed, 0x5a4d_504c]);
            for _ in 0..5 {
                let want = pick_by_full_sort(how, &mut rng, &logits);
                proptest::prop_assert_eq!(fast.pick(&logits).ok(), want);
            }
        }
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens_and_bad_settings_are_refused() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(
                Sampling {
                    temperature: 1.0,
                    top_k: None,
                    top_p: None,
                },
                seed,
            )
            .unwrap();
            (0..20)
                .map(|_| s.pick(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
        for (t, k, p, what) in [
            (-1.0, None, None, "temperature"),
            (f64::NAN, None, None, "temperature"),
            (1.0, Some(0), None, "top-k"),
            (1.0, None, Some(0.0), "top-p"),
            (1.0, None, Some(1.5), "top-p"),
        ] {
            let e = Sampling {
                temperature: t,
                top_k: k,
                top_p: p,
            }
            .check()
            .unwrap_err();
            assert!(e.to_string().contains(what), "{e}");
        }
    }
}
