//! Load benchmark of `emu serve` (not a test): starts the server in this
//! process on a loopback port and sends chat requests from 1, 8 and 32
//! concurrent clients. Bounded in count (`--requests` per client) and time
//! (`--seconds` per level). Prints completed, rejected (429), lost (any other
//! outcome; must be 0), p50/p99 latency and generated tokens per second.
//!
//! ```sh
//! cargo run --release -p emu-serve --example bench_serve -- --model tiny --requests 4 --seconds 60
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use serde_json::json;
use std::time::{Duration, Instant};

struct Opts {
    model: String,
    requests: usize,
    seconds: u64,
    max_tokens: usize,
    queue_depth: usize,
    clients: Vec<usize>,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        model: "tiny".into(),
        requests: 4,
        seconds: 60,
        max_tokens: 16,
        queue_depth: 16,
        clients: vec![1, 8, 32],
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        let num = |v: String| v.parse::<usize>().map_err(|_| format!("{a}: `{v}` is not a number"));
        match a.as_str() {
            "--model" => o.model = value()?,
            "--requests" => o.requests = num(value()?)?,
            "--seconds" => o.seconds = num(value()?)? as u64,
            "--max-tokens" => o.max_tokens = num(value()?)?,
            "--queue-depth" => o.queue_depth = num(value()?)?,
            "--clients" => {
                o.clients = value()?
                    .split(',')
                    .map(|c| num(c.to_string()))
                    .collect::<Result<_, _>>()?
            }
            other => return Err(format!("unknown option {other}; see the file's header")),
        }
    }
    Ok(o)
}

#[derive(Default)]
struct Level {
    latencies: Vec<Duration>,
    rejected: usize,
    lost: usize,
    tokens: u64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn main() {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let mut args = emu_serve::ServeArgs::for_model(&o.model);
    args.queue_depth = o.queue_depth;
    let server = common::start(&args);
    let addr = server.addr();
    let image = common::data_uri(&common::png(64, 48));
    println!(
        "emu serve load benchmark: model {}, {} requests per client, max_tokens {}, queue depth {}, batching: off (one request per forward)",
        o.model, o.requests, o.max_tokens, o.queue_depth
    );
    println!(
        "{:>7} {:>9} {:>8} {:>5} {:>9} {:>9} {:>9}",
        "clients", "completed", "rejected", "lost", "p50 ms", "p99 ms", "tok/s"
    );
    for &clients in &o.clients {
        let deadline = Instant::now() + Duration::from_secs(o.seconds);
        let t0 = Instant::now();
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let body = json!({
                    "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": image}},
                        {"type": "text", "text": format!("client {c}: what is in the picture?")}]}],
                    "max_tokens": o.max_tokens,
                });
                let n = o.requests;
                std::thread::spawn(move || {
                    let mut l = Level::default();
                    for _ in 0..n {
                        if Instant::now() > deadline {
                            break;
                        }
                        let t = Instant::now();
                        let r = common::post(addr, "/v1/chat/completions", &body);
                        match r.status {
                            200 => {
                                l.latencies.push(t.elapsed());
                                l.tokens += r.json()["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                            }
                            429 => {
                                l.rejected += 1;
                                // Honour Retry-After, within the level's time.
                                let wait: u64 = r.header("retry-after").and_then(|v| v.parse().ok()).unwrap_or(1);
                                std::thread::sleep(Duration::from_secs(wait.min(2)));
                            }
                            _ => l.lost += 1,
                        }
                    }
                    l
                })
            })
            .collect();
        let mut all = Level::default();
        for h in handles {
            match h.join() {
                Ok(l) => {
                    all.latencies.extend(l.latencies);
                    all.rejected += l.rejected;
                    all.lost += l.lost;
                    all.tokens += l.tokens;
                }
                Err(_) => all.lost += 1,
            }
        }
        let wall = t0.elapsed().as_secs_f64();
        all.latencies.sort();
        println!(
            "{:>7} {:>9} {:>8} {:>5} {:>9.1} {:>9.1} {:>9.1}",
            clients,
            all.latencies.len(),
            all.rejected,
            all.lost,
            percentile(&all.latencies, 0.5),
            percentile(&all.latencies, 0.99),
            all.tokens as f64 / wall
        );
    }
}
