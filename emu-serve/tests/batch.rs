//! Batched decoding in `emu serve` (tiny models, f32, CPU): text requests
//! that wait together run as one batch, and each answer is byte for byte
//! the answer the same request gets alone.

mod common;

use common::*;
use emu_serve::ServeArgs;
use serde_json::{json, Value};
use std::net::SocketAddr;

fn chat(image: (u32, u32), question: &str, extra: Value) -> (&'static str, Value) {
    let mut body = json!({
        "model": "emu2-chat-tiny",
        "messages": [
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_uri(&png(image.0, image.1))}},
                {"type": "text", "text": question}
            ]}
        ],
        "max_tokens": 20,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    ("/v1/chat/completions", body)
}

fn completion(prompt: String, extra: Value) -> (&'static str, Value) {
    let mut body = json!({"model": "emu2-tiny", "prompt": prompt, "max_tokens": 12});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    ("/v1/completions", body)
}

/// Several different requests: images of different sizes, prompts and
/// lengths, greedy, seeded sampling, a stop string, streamed ones, a beam
/// search (which runs alone), and completions (a batch of their own).
fn requests() -> Vec<(&'static str, Value)> {
    let img = data_uri(&png(20, 20));
    vec![
        chat((40, 30), "What is in the picture?", json!({})),
        chat(
            (64, 64),
            "Describe every colour you see, one by one, at length.",
            json!({"max_tokens": 32}),
        ),
        chat(
            (30, 50),
            "Guess.",
            json!({"temperature": 0.9, "top_p": 0.8, "seed": 11}),
        ),
        chat((40, 30), "What is in the picture?", json!({"stop": ["e"]})),
        chat((50, 20), "Say something.", json!({"stream": true, "max_tokens": 9})),
        chat(
            (40, 30),
            "Guess again.",
            json!({"stream": true, "temperature": 1.3, "seed": 5}),
        ),
        chat((40, 30), "Beams?", json!({"num_beams": 2})),
        completion(format!("{{image \"{img}\"}}[red, 3].{{image \"{img}\"}}"), json!({})),
        completion(
            "A short text prompt without images".into(),
            json!({"stream": true, "max_tokens": 7}),
        ),
        completion("Once".into(), json!({"temperature": 0.7, "seed": 3, "stop": [" "]})),
    ]
}

/// What a client sees of an answer: the text (streamed pieces joined), the
/// finish reason and the usage.
fn answer(reply: &Reply, streamed: bool, chat: bool) -> (String, Value, Value) {
    assert_eq!(reply.status, 200, "{}", reply.text());
    if !streamed {
        let v = reply.json();
        let c = &v["choices"][0];
        let text = if chat { &c["message"]["content"] } else { &c["text"] };
        return (
            text.as_str().unwrap().to_string(),
            c["finish_reason"].clone(),
            v["usage"].clone(),
        );
    }
    let events = reply.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{}", reply.text());
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text = chunks
        .iter()
        .filter_map(|c| {
            let ch = &c["choices"][0];
            if chat {
                ch["delta"]["content"].as_str()
            } else {
                ch["text"].as_str()
            }
        })
        .collect();
    let last = chunks.last().unwrap();
    (text, last["choices"][0]["finish_reason"].clone(), last["usage"].clone())
}

fn ask(a: SocketAddr, (path, body): &(&'static str, Value)) -> (String, Value, Value) {
    let streamed = body["stream"].as_bool().unwrap_or(false);
    answer(&post(a, path, body), streamed, path.contains("chat"))
}

/// Reads a streamed response until `needle` arrives.
fn read_until(s: &mut std::net::TcpStream, needle: &str) {
    use std::io::Read;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "closed before `{needle}`");
        seen.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn concurrent_requests_batch_and_answer_as_alone() {
    let mut args = ServeArgs::for_model("tiny");
    args.queue_depth = 16;
    args.max_batch = 8;
    args.max_steps = 1000;
    let server = start(&args);
    let a = server.addr();
    let reqs = requests();
    // Alone: one request at a time, so every batch has one request.
    let alone: Vec<_> = reqs.iter().map(|r| ask(a, r)).collect();
    assert_eq!(metric(a, "emu_batch_size_mean"), 1.0);
    let runs_alone = metric(a, "emu_batch_size_count");
    // Hold the worker with an image generation, queue every request
    // behind it, then cancel it: the requests are all waiting at once.
    let long = json!({"prompt": "a long walk", "n": 4, "steps": 1000, "size": "32", "stream": true});
    let mut holder = send(a, "POST", "/v1/images/generations", &[], long.to_string().as_bytes());
    read_until(&mut holder, "\"progress\"");
    let together: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = reqs.iter().map(|r| s.spawn(move || ask(a, r))).collect();
        wait_until("every request waits", || {
            metric(a, "emu_queue_depth") == reqs.len() as f64
        });
        drop(holder);
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (one, both)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(one.0.as_bytes(), both.0.as_bytes(), "request {i}: {:?}", reqs[i].1);
        assert_eq!(one.1, both.1, "request {i} finish reason");
        assert_eq!(one.2, both.2, "request {i} usage");
    }
    // The generation, then at most 8 chats with the beam search alone,
    // and the completions: far fewer runs than requests.
    let runs = metric(a, "emu_batch_size_count") - runs_alone;
    assert!(runs <= 5.0, "{runs} runs of the model for {} requests", reqs.len());
    assert!(metric(a, "emu_batch_size_mean") > 1.0);
    // Some answers stopped early, so rows left their batch at different steps.
    let lengths: Vec<u64> = alone
        .iter()
        .map(|(_, _, u)| u["completion_tokens"].as_u64().unwrap())
        .collect();
    assert!(lengths.iter().min() < lengths.iter().max(), "{lengths:?}");
}

#[test]
fn max_batch_one_runs_requests_one_at_a_time() {
    let mut args = ServeArgs::for_model("tiny");
    args.max_batch = 1;
    args.max_steps = 1000;
    let server = start(&args);
    let a = server.addr();
    let reqs: Vec<_> = requests().into_iter().take(3).collect();
    let long = json!({"prompt": "a long walk", "n": 4, "steps": 1000, "size": "32", "stream": true});
    let mut holder = send(a, "POST", "/v1/images/generations", &[], long.to_string().as_bytes());
    read_until(&mut holder, "\"progress\"");
    std::thread::scope(|s| {
        let handles: Vec<_> = reqs.iter().map(|r| s.spawn(move || ask(a, r))).collect();
        wait_until("every request waits", || {
            metric(a, "emu_queue_depth") == reqs.len() as f64
        });
        drop(holder);
        for h in handles {
            h.join().unwrap();
        }
    });
    assert_eq!(metric(a, "emu_batch_size_mean"), 1.0);
    assert_eq!(metric(a, "emu_batch_size_count"), 1.0 + reqs.len() as f64);
}

#[test]
fn max_batch_zero_is_refused() {
    let mut args = ServeArgs::for_model("tiny");
    args.max_batch = 0;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let e = emu_serve::spawn(&args, listener).err().expect("refused");
    assert!(e.to_string().contains("--max-batch"), "{e}");
}
