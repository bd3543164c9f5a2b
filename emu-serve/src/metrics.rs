//! Counters for `GET /metrics`, in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Metrics {
    /// `(route, status)` → responses.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Error kind (OpenAI `code`, else `type`) → responses.
    errors: Mutex<BTreeMap<String, u64>>,
    /// Jobs accepted and not yet picked up by the worker.
    pub queued: AtomicUsize,
    /// Requests the worker is computing (more than 1 for a batch).
    pub running: AtomicUsize,
    /// Runs of the worker by how many requests each computed: counts per
    /// [`BATCH_BUCKETS`] upper bound (the last one counts the rest).
    batches: [AtomicU64; BATCH_BUCKETS.len() + 1],
    batched_requests: AtomicU64,
    tokens: AtomicU64,
    token_micros: AtomicU64,
    steps: AtomicU64,
    step_micros: AtomicU64,
    jobs: AtomicU64,
    job_micros: AtomicU64,
    pub cancelled: AtomicU64,
    pub panics: AtomicU64,
}

/// Upper bounds of the batch-size histogram.
const BATCH_BUCKETS: [usize; 6] = [1, 2, 4, 8, 16, 32];

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Metrics {
    pub fn response(&self, route: &str, status: u16, error_kind: Option<&str>) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((route.to_string(), status)).or_default() += 1;
        }
        if let Some(k) = error_kind {
            if let Ok(mut m) = self.errors.lock() {
                *m.entry(k.to_string()).or_default() += 1;
            }
        }
    }

    pub fn tokens(&self, n: usize, took: Duration) {
        self.tokens.fetch_add(n as u64, Ordering::Relaxed);
        self.token_micros.fetch_add(micros(took), Ordering::Relaxed);
    }

    pub fn steps(&self, n: usize, took: Duration) {
        self.steps.fetch_add(n as u64, Ordering::Relaxed);
        self.step_micros.fetch_add(micros(took), Ordering::Relaxed);
    }

    /// `n` jobs finished together in `took`.
    pub fn jobs(&self, n: usize, took: Duration) {
        self.jobs.fetch_add(n as u64, Ordering::Relaxed);
        self.job_micros.fetch_add(micros(took), Ordering::Relaxed);
    }

    /// The worker starts computing `n` requests together.
    pub fn batch(&self, n: usize) {
        let i = BATCH_BUCKETS
            .iter()
            .position(|&b| n <= b)
            .unwrap_or(BATCH_BUCKETS.len());
        self.batches[i].fetch_add(1, Ordering::Relaxed);
        self.batched_requests.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Mean seconds per finished job (1 before the first).
    pub fn mean_job_seconds(&self) -> f64 {
        let n = self.jobs.load(Ordering::Relaxed);
        if n == 0 {
            return 1.0;
        }
        self.job_micros.load(Ordering::Relaxed) as f64 / n as f64 / 1e6
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut lines = Vec::new();
        let n = header(
            &mut s,
            "emu_requests_total",
            "counter",
            "HTTP responses by route and status.",
        );
        if let Ok(m) = self.requests.lock() {
            for ((route, status), v) in m.iter() {
                lines.push(format!("{n}{{route=\"{route}\",status=\"{status}\"}} {v}"));
            }
        }
        flush(&mut s, &mut lines);
        let n = header(&mut s, "emu_errors_total", "counter", "Error responses by kind.");
        if let Ok(m) = self.errors.lock() {
            for (k, v) in m.iter() {
                lines.push(format!("{n}{{kind=\"{k}\"}} {v}"));
            }
        }
        flush(&mut s, &mut lines);
        let n = header(
            &mut s,
            "emu_batch_size",
            "histogram",
            "Requests computed together per run of the model (text requests batch; 1 = alone).",
        );
        let mut cumulative = 0;
        for (i, c) in self.batches.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            let le = BATCH_BUCKETS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(s, "{n}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let requests = self.batched_requests.load(Ordering::Relaxed);
        let _ = writeln!(s, "{n}_sum {requests}\n{n}_count {cumulative}");
        let n = header(
            &mut s,
            "emu_batch_size_mean",
            "gauge",
            "Mean requests per run of the model, over the server's life.",
        );
        let mean = if cumulative > 0 {
            requests as f64 / cumulative as f64
        } else {
            0.0
        };
        let _ = writeln!(s, "{n} {mean:.3}");
        let gauges: [(&str, &str, String); 10] = [
            (
                "emu_queue_depth",
                "Requests waiting for the model.",
                self.queued.load(Ordering::Relaxed).to_string(),
            ),
            (
                "emu_running",
                "Requests the model is computing (more than 1 while a batch runs).",
                self.running.load(Ordering::Relaxed).to_string(),
            ),
            (
                "emu_generated_tokens_total",
                "Tokens generated.",
                self.tokens.load(Ordering::Relaxed).to_string(),
            ),
            (
                "emu_generation_seconds_total",
                "Seconds spent in text requests.",
                secs(&self.token_micros),
            ),
            (
                "emu_tokens_per_second",
                "Generated tokens per second of text requests, over the server's life.",
                rate(&self.tokens, &self.token_micros),
            ),
            (
                "emu_diffusion_steps_total",
                "Denoising steps run.",
                self.steps.load(Ordering::Relaxed).to_string(),
            ),
            (
                "emu_diffusion_seconds_total",
                "Seconds spent in image requests.",
                secs(&self.step_micros),
            ),
            (
                "emu_steps_per_second",
                "Denoising steps per second of image requests, over the server's life.",
                rate(&self.steps, &self.step_micros),
            ),
            (
                "emu_cancelled_total",
                "Requests stopped because their client went away.",
                self.cancelled.load(Ordering::Relaxed).to_string(),
            ),
            (
                "emu_panics_total",
                "Requests that panicked (answered with a 500; the server kept running).",
                self.panics.load(Ordering::Relaxed).to_string(),
            ),
        ];
        for (name, help, value) in gauges {
            let kind = if name.ends_with("_total") { "counter" } else { "gauge" };
            let n = header(&mut s, name, kind, help);
            let _ = writeln!(s, "{n} {value}");
        }
        s
    }
}

fn header(s: &mut String, name: &str, kind: &str, help: &str) -> String {
    let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
    name.to_string()
}

fn flush(s: &mut String, lines: &mut Vec<String>) {
    for l in lines.drain(..) {
        s.push_str(&l);
        s.push('\n');
    }
}

fn secs(m: &AtomicU64) -> String {
    format!("{:.6}", m.load(Ordering::Relaxed) as f64 / 1e6)
}

fn rate(n: &AtomicU64, m: &AtomicU64) -> String {
    let t = m.load(Ordering::Relaxed) as f64 / 1e6;
    let v = if t > 0.0 {
        n.load(Ordering::Relaxed) as f64 / t
    } else {
        0.0
    };
    format!("{v:.3}")
}
