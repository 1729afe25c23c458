//! Choosing the next token from logits, with transformers' semantics and order: the repetition
//! penalty first, then (when sampling) temperature, top-k, top-p and min-p, then a seeded draw
//! from the softmax of what is left. Greedy is the argmax after the penalty (`do_sample` off or
//! temperature 0). Every step is a plain function on a logit vector, tested against its
//! definition below.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How the next token is chosen. Defaults are transformers' `GenerationConfig` defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Draw from the distribution (true) or take the most likely token (false: greedy).
    pub do_sample: bool,
    /// Logits are divided by it before sampling; 0 means greedy. Default 1.
    pub temperature: f64,
    /// Keep the k most likely tokens (ties with the k-th kept); 0 = off. Default 50.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p; 1 = off.
    pub top_p: f64,
    /// Drop tokens less likely than `min_p` × the most likely one's probability; 0 = off.
    pub min_p: f64,
    /// transformers' repetition penalty on every token already in the sequence (prompt
    /// included): positive logits divided by it, negative ones multiplied; 1 = off.
    pub repetition_penalty: f64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
        }
    }
}

impl SamplingParams {
    /// Whether the choice is the argmax (no draw).
    pub fn is_greedy(&self) -> bool {
        !self.do_sample || self.temperature <= 0.0
    }
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: each distinct token of `seen` gets its logit
/// divided by `penalty` when positive, multiplied when negative.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f64) {
    if penalty == 1.0 {
        return;
    }
    let mut done = std::collections::HashSet::new();
    for &id in seen {
        if !done.insert(id) {
            continue;
        }
        if let Some(l) = logits.get_mut(id as usize) {
            *l = if *l < 0.0 {
                (*l as f64 * penalty) as f32
            } else {
                (*l as f64 / penalty) as f32
            };
        }
    }
}

/// Divides every logit by `temperature` (> 0).
pub fn apply_temperature(logits: &mut [f32], temperature: f64) {
    if temperature > 0.0 && temperature != 1.0 {
        logits
            .iter_mut()
            .for_each(|l| *l = (*l as f64 / temperature) as f32);
    }
}

/// Sets to -inf every logit below the k-th largest (transformers' `TopKLogitsWarper`: ties with
/// the k-th are kept); `k` = 0 or ≥ V keeps all.
pub fn top_k_filter(logits: &mut [f32], k: usize) {
    if k == 0 || k >= logits.len() {
        return;
    }
    let mut sorted: Vec<f32> = logits.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    logits
        .iter_mut()
        .filter(|l| **l < kth)
        .for_each(|l| *l = f32::NEG_INFINITY);
}

/// Keeps the most likely tokens until their probabilities sum to at least `p` (the one that
/// crosses it included, at least one kept), -inf for the rest (`TopPLogitsWarper`); `p` ≥ 1 keeps
/// all.
pub fn top_p_filter(logits: &mut [f32], p: f64) {
    if p >= 1.0 {
        return;
    }
    let probs = softmax(logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let mut cum = 0.0;
    for (rank, &i) in order.iter().enumerate() {
        if rank > 0 && cum >= p {
            logits[i] = f32::NEG_INFINITY;
        }
        cum += probs[i];
    }
}

/// Drops tokens whose probability is below `min_p` × the largest probability (`MinPLogitsWarper`),
/// keeping at least the most likely; `min_p` = 0 keeps all.
pub fn min_p_filter(logits: &mut [f32], min_p: f64) {
    if min_p <= 0.0 {
        return;
    }
    let probs = softmax(logits);
    let top = probs.iter().copied().fold(0.0, f64::max);
    let best = argmax(logits);
    for (i, l) in logits.iter_mut().enumerate() {
        if probs[i] < min_p * top && i != best as usize {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Softmax in f64 (-inf logits get probability 0).
pub fn softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exp: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

/// Index of the largest logit (the first one on ties, as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Index drawn from `probs` (summing to 1) with the uniform draw `u` in [0, 1): the first index
/// whose cumulative probability exceeds `u` (the last non-zero one if rounding leaves a gap).
pub fn draw(probs: &[f64], u: f64) -> u32 {
    let mut cum = 0.0;
    let mut last = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            last = i;
            cum += p;
            if u < cum {
                return i as u32;
            }
        }
    }
    last as u32
}

/// Picks tokens with [`SamplingParams`] and a seeded generator: the same seed, logits and
/// history give the same tokens.
#[derive(Debug, Clone)]
pub struct Sampler {
    /// The settings.
    pub params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler whose draws come from `seed`.
    pub fn new(params: SamplingParams, seed: u64) -> Self {
        Self {
            params,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The next token from `logits` (V), given every token of the sequence so far (`seen`).
    pub fn next(&mut self, mut logits: Vec<f32>, seen: &[u32]) -> u32 {
        let p = &self.params;
        apply_repetition_penalty(&mut logits, seen, p.repetition_penalty);
        if p.is_greedy() {
            return argmax(&logits);
        }
        apply_temperature(&mut logits, p.temperature);
        top_k_filter(&mut logits, p.top_k);
        top_p_filter(&mut logits, p.top_p);
        min_p_filter(&mut logits, p.min_p);
        let probs = softmax(&logits);
        draw(&probs, self.rng.random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEG: f32 = f32::NEG_INFINITY;

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits_once() {
        let mut l = vec![2.0, -1.0, 0.5, 3.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1, 0], 2.0);
        assert_eq!(l, vec![1.0, -2.0, 0.5, 3.0]);
    }

    #[test]
    fn temperature_divides_logits() {
        let mut l = vec![1.0, -2.0, 4.0];
        apply_temperature(&mut l, 0.5);
        assert_eq!(l, vec![2.0, -4.0, 8.0]);
    }

    #[test]
    fn top_k_keeps_the_k_largest_and_ties() {
        let mut l = vec![1.0, 5.0, 3.0, 3.0, 0.0];
        top_k_filter(&mut l, 2);
        assert_eq!(l, vec![NEG, 5.0, 3.0, 3.0, NEG]);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // probabilities 0.5, 0.3, 0.2: p = 0.7 needs the first two; p = 0.5 only the first.
        let ln = |p: f64| p.ln() as f32;
        let base = vec![ln(0.3), ln(0.5), ln(0.2)];
        let mut l = base.clone();
        top_p_filter(&mut l, 0.7);
        assert_eq!(l, vec![base[0], base[1], NEG]);
        let mut l = base.clone();
        top_p_filter(&mut l, 0.5);
        assert_eq!(l, vec![NEG, base[1], NEG]);
        let mut l = base.clone();
        top_p_filter(&mut l, 0.01);
        assert_eq!(l, vec![NEG, base[1], NEG]);
    }

    #[test]
    fn min_p_drops_tokens_below_a_fraction_of_the_top_probability() {
        // probabilities 0.6, 0.3, 0.1: min_p 0.25 → threshold 0.15 drops the 0.1.
        let ln = |p: f64| p.ln() as f32;
        let base = vec![ln(0.6), ln(0.3), ln(0.1)];
        let mut l = base.clone();
        min_p_filter(&mut l, 0.25);
        assert_eq!(l, vec![base[0], base[1], NEG]);
        let mut l = base.clone();
        min_p_filter(&mut l, 0.9);
        assert_eq!(l, vec![base[0], NEG, NEG]);
    }

    #[test]
    fn softmax_argmax_and_draw_follow_their_definitions() {
        let p = softmax(&[0.0, (3f32).ln(), NEG]);
        assert!((p[0] - 0.25).abs() < 1e-7 && (p[1] - 0.75).abs() < 1e-7 && p[2] == 0.0);
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(draw(&p, 0.1), 0);
        assert_eq!(draw(&p, 0.25), 1);
        assert_eq!(draw(&p, 0.99), 1);
    }

    #[test]
    fn greedy_takes_the_argmax_after_the_penalty() {
        let mut s = Sampler::new(SamplingParams::default(), 0);
        assert_eq!(s.next(vec![1.0, 3.0, 2.0], &[]), 1);
        s.params.repetition_penalty = 2.0;
        // 3/2 = 1.5 < 2: the penalised token loses.
        assert_eq!(s.next(vec![1.0, 3.0, 2.0], &[1]), 2);
        s.params.do_sample = true;
        s.params.temperature = 0.0;
        assert_eq!(s.next(vec![1.0, 3.0, 2.0], &[]), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_follows_the_distribution() {
        let params = SamplingParams {
            do_sample: true,
            top_k: 0,
            ..Default::default()
        };
        let logits = vec![0.0, (3f32).ln(), NEG, 0.0];
        let run = |seed| {
            let mut s = Sampler::new(params.clone(), seed);
            (0..2000)
                .map(|_| s.next(logits.clone(), &[]))
                .collect::<Vec<u32>>()
        };
        let a = run(7);
        assert_eq!(a, run(7));
        assert_ne!(a, run(8));
        assert!(!a.contains(&2));
        let share = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!((share - 0.6).abs() < 0.05, "share of token 1: {share}");
    }
}
