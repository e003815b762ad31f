//! Latency histograms (nanoseconds, 3 significant figures): recording, shipping between
//! processes as `(value, count)` pairs, merging and summarising.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Longest latency recorded exactly; longer ones are clamped to it.
const MAX_NS: u64 = 60_000_000_000;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, MAX_NS, 3).expect("valid histogram bounds")
}

/// Records `ns`, clamped into the histogram's range.
pub fn record(h: &mut Histogram<u64>, ns: u64) {
    let _ = h.record(ns.clamp(1_000, MAX_NS));
}

/// The recorded values as `(value, count)` pairs (what a worker sends to the coordinator).
pub fn to_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

pub fn merge_pairs(h: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(v, n) in pairs {
        let _ = h.record_n(v.clamp(1_000, MAX_NS), n);
    }
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub count: u64,
    pub min_ms: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

pub fn summarize(h: &Histogram<u64>) -> Summary {
    let ms = |ns: u64| (ns as f64 / 1e6 * 1000.0).round() / 1000.0;
    if h.is_empty() {
        return Summary {
            count: 0,
            min_ms: 0.0,
            mean_ms: 0.0,
            p50_ms: 0.0,
            p90_ms: 0.0,
            p99_ms: 0.0,
            p999_ms: 0.0,
            max_ms: 0.0,
        };
    }
    Summary {
        count: h.len(),
        min_ms: ms(h.min()),
        mean_ms: ms(h.mean() as u64),
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_known_values() {
        let mut h = new_histogram();
        // 1..=1000 ms, one each.
        for i in 1..=1000u64 {
            record(&mut h, i * 1_000_000);
        }
        let s = summarize(&h);
        assert_eq!(s.count, 1000);
        assert!((s.p50_ms - 500.0).abs() < 1.0, "{s:?}");
        assert!((s.p99_ms - 990.0).abs() < 1.0, "{s:?}");
        assert!((s.p999_ms - 999.0).abs() < 1.0, "{s:?}");
        assert!((s.min_ms - 1.0).abs() < 0.01, "{s:?}");
        assert!((s.max_ms - 1000.0).abs() < 1.0, "{s:?}");
    }

    #[test]
    fn empty_summary_is_zero() {
        assert_eq!(summarize(&new_histogram()).count, 0);
    }

    #[test]
    fn pairs_round_trip_and_merge() {
        let mut a = new_histogram();
        let mut b = new_histogram();
        for i in 0..100u64 {
            record(&mut a, 2_000_000 + i * 10_000);
            record(&mut b, 50_000_000);
        }
        let mut merged = new_histogram();
        merge_pairs(&mut merged, &to_pairs(&a));
        merge_pairs(&mut merged, &to_pairs(&b));
        assert_eq!(merged.len(), 200);
        assert_eq!(summarize(&merged).max_ms, summarize(&b).max_ms);
        assert_eq!(merged.min(), a.min());
    }

    #[test]
    fn out_of_range_values_are_clamped() {
        let mut h = new_histogram();
        record(&mut h, 0);
        record(&mut h, u64::MAX);
        assert_eq!(h.len(), 2);
    }
}
