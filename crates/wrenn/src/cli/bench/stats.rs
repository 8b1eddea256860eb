//! Summaries of samples: median and p99 by nearest rank, so every figure is one that was
//! actually measured (no interpolation between two runs).

/// The summary of one figure's samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Summary {
    pub(crate) n: usize,
    pub(crate) median: f64,
    pub(crate) p99: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

/// The `p`-th percentile (0 < p <= 100) of `sorted` by nearest rank: the smallest sample with
/// at least `p` percent of the samples at or below it. `None` without samples.
pub(crate) fn nearest_rank(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Median and p99 by nearest rank, min and max; `None` without samples. Non-finite samples
/// (none are expected) are left out rather than poisoning the order.
pub(crate) fn summarize(samples: &[f64]) -> Option<Summary> {
    let mut s: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    Some(Summary {
        n: s.len(),
        median: nearest_rank(&s, 50.0)?,
        p99: nearest_rank(&s, 99.0)?,
        min: *s.first()?,
        max: *s.last()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_picks_real_samples() {
        let s = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(nearest_rank(&s, 50.0), Some(2.0));
        assert_eq!(nearest_rank(&s, 99.0), Some(4.0));
        assert_eq!(nearest_rank(&s, 100.0), Some(4.0));
        assert_eq!(nearest_rank(&s, 0.0), Some(1.0));
        assert_eq!(nearest_rank(&[7.0], 99.0), Some(7.0));
        assert_eq!(nearest_rank(&[], 50.0), None);
        // 100 samples: p99 is the 99th, not the worst.
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(nearest_rank(&hundred, 99.0), Some(99.0));
        assert_eq!(nearest_rank(&hundred, 50.0), Some(50.0));
    }

    #[test]
    fn summaries_sort_first_and_skip_non_finite() {
        let s = summarize(&[5.0, 1.0, f64::NAN, 3.0]).unwrap();
        assert_eq!(
            s,
            Summary {
                n: 3,
                median: 3.0,
                p99: 5.0,
                min: 1.0,
                max: 5.0
            }
        );
        assert_eq!(summarize(&[]), None);
        assert_eq!(summarize(&[f64::INFINITY]), None);
    }
}
