//! The server's counters, gauges and latency histograms, rendered in Prometheus' text format.
//!
//! The scheduler thread writes most of them and HTTP handlers read them, so every value is an atomic
//! (histograms sit behind a mutex held only to add one observation or to render). Gauges are set by
//! the scheduler after every step, so `/metrics` is at most one step behind.

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A cumulative Prometheus histogram with the fixed [`BUCKETS`].
#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bound, c) in BUCKETS.iter().zip(&mut self.counts) {
            if seconds <= *bound {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, c) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

#[derive(Default)]
pub struct Metrics {
    /// Generation requests accepted into the queue.
    pub requests: AtomicU64,
    /// Requests refused because the queue was full.
    pub rejected: AtomicU64,
    /// Requests whose client went away before they finished.
    pub cancelled: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens whose KV pages came from the prefix cache (not computed again).
    pub prompt_tokens_cached: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Requests waiting for a KV slot.
    pub queue_depth: AtomicU64,
    /// Sequences holding a slot (prefilling or decoding).
    pub active: AtomicU64,
    pub slots_used: AtomicU64,
    pub slots_free: AtomicU64,
    /// KV pages held by sequences, and free in the pool.
    pub kv_pages_used: AtomicU64,
    pub kv_pages_free: AtomicU64,
    /// Free pages among them that hold a cached prompt prefix.
    pub kv_pages_cached: AtomicU64,
    ttft: Mutex<Histogram>,
    itl: Mutex<Histogram>,
}

impl Metrics {
    /// Records a time to first token (from the request's arrival).
    pub fn observe_ttft(&self, d: Duration) {
        if let Ok(mut h) = self.ttft.lock() {
            h.observe(d.as_secs_f64());
        }
    }

    /// Records the time between two tokens of one sequence.
    pub fn observe_itl(&self, d: Duration) {
        if let Ok(mut h) = self.itl.lock() {
            h.observe(d.as_secs_f64());
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut one = |name: &str, kind: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Relaxed)
            );
        };
        one(
            "tern_requests_total",
            "counter",
            "Generation requests accepted.",
            &self.requests,
        );
        one(
            "tern_requests_rejected_total",
            "counter",
            "Generation requests refused because the queue was full.",
            &self.rejected,
        );
        one(
            "tern_requests_cancelled_total",
            "counter",
            "Generation requests whose client disconnected first.",
            &self.cancelled,
        );
        one(
            "tern_prompt_tokens_total",
            "counter",
            "Prompt tokens processed.",
            &self.prompt_tokens,
        );
        one(
            "tern_prompt_tokens_cached_total",
            "counter",
            "Prompt tokens taken from cached KV pages of an earlier prompt's prefix.",
            &self.prompt_tokens_cached,
        );
        one(
            "tern_generated_tokens_total",
            "counter",
            "Tokens generated.",
            &self.generated_tokens,
        );
        one(
            "tern_queue_depth",
            "gauge",
            "Requests waiting for a KV-cache slot.",
            &self.queue_depth,
        );
        one(
            "tern_active_sequences",
            "gauge",
            "Sequences being prefilled or decoded.",
            &self.active,
        );
        one(
            "tern_kv_slots_used",
            "gauge",
            "KV-cache slots held by sequences.",
            &self.slots_used,
        );
        one(
            "tern_kv_slots_free",
            "gauge",
            "KV-cache slots free.",
            &self.slots_free,
        );
        one(
            "tern_kv_pages_used",
            "gauge",
            "KV-cache pages holding tokens of live sequences.",
            &self.kv_pages_used,
        );
        one(
            "tern_kv_pages_free",
            "gauge",
            "KV-cache pages free in the pool (cached prefix pages included).",
            &self.kv_pages_free,
        );
        one(
            "tern_kv_pages_cached",
            "gauge",
            "Free KV-cache pages holding a prompt prefix for reuse, handed out last.",
            &self.kv_pages_cached,
        );
        if let Ok(h) = self.ttft.lock() {
            h.render(
                &mut out,
                "tern_time_to_first_token_seconds",
                "Time from a request's arrival to its first generated token.",
            );
        }
        if let Ok(h) = self.itl.lock() {
            h.render(
                &mut out,
                "tern_inter_token_latency_seconds",
                "Time between consecutive tokens of a sequence.",
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.observe_ttft(Duration::from_millis(3));
        m.observe_ttft(Duration::from_millis(700));
        m.observe_ttft(Duration::from_secs(60));
        let text = m.render();
        for line in [
            "tern_time_to_first_token_seconds_bucket{le=\"0.001\"} 0",
            "tern_time_to_first_token_seconds_bucket{le=\"0.005\"} 1",
            "tern_time_to_first_token_seconds_bucket{le=\"1\"} 2",
            "tern_time_to_first_token_seconds_bucket{le=\"30\"} 2",
            "tern_time_to_first_token_seconds_bucket{le=\"+Inf\"} 3",
            "tern_time_to_first_token_seconds_count 3",
            "tern_inter_token_latency_seconds_count 0",
            "tern_kv_slots_free 0",
            "tern_kv_pages_free 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
    }
}
