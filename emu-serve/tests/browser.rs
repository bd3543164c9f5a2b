//! The web page in a real browser: headless Chromium loads `/`, and the
//! test drives it through the DevTools protocol (over
//! `--remote-debugging-pipe`: fd 3 in, fd 4 out, NUL-separated JSON) to run
//! the page's `emuSelfTest()`, which uploads an image through the page's own
//! upload path, asks a question, reads the streamed answer, generates an
//! image and reports what the page shows. Skips (with a message) without
//! Chromium; `EMU_CHROMIUM` names the binary when it is not on PATH.
#![cfg(unix)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn chromium() -> Option<String> {
    if let Ok(p) = std::env::var("EMU_CHROMIUM") {
        return Some(p);
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find_map(|name| {
            let ok = Command::new(name)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            ok.then(|| name.to_string())
        })
}

/// A DevTools session over the pipe.
struct Cdp {
    to_browser: std::io::PipeWriter,
    messages: mpsc::Receiver<Value>,
    next_id: u64,
    deadline: Instant,
}

impl Cdp {
    /// Sends a command and waits for its answer (events in between are skipped).
    fn call(&mut self, method: &str, params: Value, session: Option<&str>) -> Value {
        self.try_call(method, params, session)
            .unwrap_or_else(|e| panic!("{method}: {e}"))
    }

    fn try_call(&mut self, method: &str, params: Value, session: Option<&str>) -> Result<Value, Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(0);
        self.to_browser.write_all(&bytes).expect("write to chromium");
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            let m = self
                .messages
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no answer from chromium to {method} in time"));
            if m["id"] == id {
                return match m.get("error") {
                    Some(e) => Err(e.clone()),
                    None => Ok(m["result"].clone()),
                };
            }
        }
    }
}

#[test]
fn the_page_chats_and_generates_in_chromium() {
    let Some(browser) = chromium() else {
        eprintln!("skipping the browser test: no Chromium found (apt-get install --no-install-recommends chromium, or set EMU_CHROMIUM)");
        return;
    };
    let server = start(&emu_serve::ServeArgs::for_model("tiny"));
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{}/", server.addr());
    let (browser_in, to_browser) = std::io::pipe().unwrap();
    let (mut from_browser, browser_out) = std::io::pipe().unwrap();
    let (in_fd, out_fd) = (browser_in.as_raw_fd(), browser_out.as_raw_fd());
    let mut cmd = Command::new(&browser);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        "--remote-debugging-pipe",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .arg(&url)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    // SAFETY: only dup2 (async-signal-safe) runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for (from, to) in [(in_fd, 3), (out_fd, 4)] {
                if libc::dup2(from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("start chromium");
    drop((browser_in, browser_out));
    let (tx, messages) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 65536];
        while let Ok(n) = from_browser.read(&mut chunk) {
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            while let Some(end) = buf.iter().position(|&b| b == 0) {
                let msg: Vec<u8> = buf.drain(..=end).collect();
                if let Ok(v) = serde_json::from_slice::<Value>(&msg[..end]) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut cdp = Cdp {
        to_browser,
        messages,
        next_id: 0,
        deadline: Instant::now() + Duration::from_secs(240),
    };
    let report = {
        let page = loop {
            let targets = cdp.call("Target.getTargets", json!({}), None);
            let found = targets["targetInfos"].as_array().and_then(|t| {
                t.iter()
                    .find(|t| t["type"] == "page" && t["url"].as_str() == Some(url.as_str()))
                    .cloned()
            });
            if let Some(p) = found {
                break p;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let attached = cdp.call(
            "Target.attachToTarget",
            json!({"targetId": page["targetId"], "flatten": true}),
            None,
        );
        let session = attached["sessionId"].as_str().unwrap().to_string();
        // Waits until the page has loaded (evaluations during the first
        // navigation lose their context), then runs the scripted session.
        loop {
            let ready = cdp.try_call(
                "Runtime.evaluate",
                json!({"expression": "document.readyState === 'complete' && !!window.emuSelfTest", "returnByValue": true}),
                Some(&session),
            );
            if ready.is_ok_and(|r| r["result"]["value"] == true) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let out = cdp.call(
            "Runtime.evaluate",
            json!({"expression": "window.emuSelfTest()", "awaitPromise": true, "returnByValue": true}),
            Some(&session),
        );
        let text = out["result"]["value"]
            .as_str()
            .unwrap_or_else(|| panic!("{out}"))
            .to_string();
        serde_json::from_str::<Value>(&text).unwrap()
    };
    let _ = cdp.call("Browser.close", json!({}), None);
    let _ = child.wait();

    eprintln!("page report: {report}");
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["canvas"], json!([64, 48]), "the uploaded image is drawn");
    let chat = &report["chat"];
    let text = chat["text"].as_str().unwrap();
    // The tiny model answers this with several tokens, streamed in pieces.
    assert!(chat["chunks"].as_u64().unwrap() >= 2 && !text.is_empty(), "{report}");
    assert_eq!(report["shown"], chat["text"], "the page shows the streamed answer");
    // The page's answer is the server's answer to the same request.
    let same = post(
        server.addr(),
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": report["image"]}},
            {"type": "text", "text": "What is in the picture?"}]}], "max_tokens": 12}),
    );
    assert_eq!(same.json()["choices"][0]["message"]["content"], chat["text"]);
    assert_eq!(
        report["generate"],
        json!({"progress": 3, "width": 32, "height": 32}),
        "{report}"
    );
    assert_eq!(report["bar"], json!([3, 3]), "the progress bar is full");
    assert_eq!(report["shownImage"], json!([32, 32]), "the generated image is shown");
}
