//! Progress bars on standard error (indicatif): checkpoint loading (one bar
//! per checkpoint, in tensors and bytes, fed by
//! [`emu_core::checkpoint::set_load_observer`]) and diffusion steps, each
//! with its rate (tensors/s, steps/s) and time left.
//!
//! Bars are drawn only when [`enabled`]: by default when standard error is a
//! terminal; `--progress` / `--no-progress` force it either way.

use emu::units::human_bytes;
use emu_core::checkpoint::{set_load_observer, LoadEvent, LoadObserver};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

const AUTO: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;
static MODE: AtomicU8 = AtomicU8::new(AUTO);

/// Forces bars on (`Some(true)`), off (`Some(false)`), or leaves the choice
/// to whether standard error is a terminal (`None`).
pub fn set_mode(force: Option<bool>) {
    let m = match force {
        None => AUTO,
        Some(true) => ON,
        Some(false) => OFF,
    };
    MODE.store(m, Ordering::Relaxed);
}

/// Whether bars are drawn.
pub fn enabled() -> bool {
    match MODE.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => std::io::stderr().is_terminal(),
    }
}

/// Width of the bar in characters.
const WIDTH: usize = 24;

/// A bar on standard error counting `unit`s (`steps`, `tensors`), with the
/// rate in `unit`s per second and the time left; a `note` (its message,
/// updated with `set_message`) is shown after the counts.
pub fn bar(label: &str, total: u64, unit: &'static str, note: Option<String>) -> ProgressBar {
    let template = format!(
        "{{prefix}} [{{bar:{WIDTH}}}] {{pos}}/{{len}} {unit}{} ({{rate}}, ETA {{eta}})",
        if note.is_some() { ", {msg}" } else { "" }
    );
    let style = ProgressStyle::with_template(&template)
        .expect("the bar template is valid")
        .progress_chars("#-")
        .with_key("rate", move |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{}", rate(s.per_sec(), unit));
        });
    // indicatif draws nothing on a target that is not a terminal; `--progress`
    // asks for bars anyway, so draw through the terminal-like interface,
    // which always writes (at most 20 times a second).
    let target = ProgressDrawTarget::term_like_with_hz(Box::new(console::Term::stderr()), 20);
    // Built before the first draw, so that draw has every part.
    ProgressBar::with_draw_target(Some(total), target)
        .with_style(style)
        .with_prefix(label.to_string())
        .with_message(note.unwrap_or_default())
}

/// Draws the final state of `b` and leaves it on screen. On a terminal the
/// bar's padding to the full width puts what follows on the next line; in a
/// pipe (`--progress` forced) the line is ended here.
fn finish(b: &ProgressBar) {
    b.finish();
    if !std::io::stderr().is_terminal() {
        eprintln!();
    }
}

/// `12.3 steps/s`; below one per second, `4.0 s/step` (a 37B model's
/// denoising steps on a CPU).
fn rate(per_sec: f64, unit: &str) -> String {
    if !per_sec.is_finite() || per_sec <= 0.0 {
        format!("- {unit}/s")
    } else if per_sec >= 1.0 {
        format!("{per_sec:.1} {unit}/s")
    } else {
        format!("{:.1} s/{}", 1.0 / per_sec, unit.strip_suffix('s').unwrap_or(unit))
    }
}

/// A bar per diffusion run: `on_step(k, n)` after step `k` of `n`.
pub fn steps(label: &str) -> impl FnMut(usize, usize) {
    let mut current: Option<ProgressBar> = None;
    let label = label.to_string();
    let on = enabled();
    move |k, n| {
        if !on {
            return;
        }
        let b = current.get_or_insert_with(|| bar(&label, n as u64, "steps", None));
        b.set_position(k as u64);
        if k >= n {
            finish(b);
            current = None;
        }
    }
}

/// After a text answer, when bars are on: how many tokens were generated
/// and how fast (the rate of the `generate` stage: beam search and greedy
/// alike; prompt processing is part of it).
pub fn report_tokens(tokens: usize, timings: &emu::pipeline::Timings) {
    if !enabled() {
        return;
    }
    if let Some((_, d)) = timings.stages().iter().find(|(n, _)| *n == "generate") {
        let secs = d.as_secs_f64();
        let per_sec = if secs > 0.0 { tokens as f64 / secs } else { f64::NAN };
        eprintln!("generated {tokens} tokens in {secs:.2}s ({})", rate(per_sec, "tokens"));
    }
}

/// Which component is loading: the checkpoint's path under the model
/// `root`, else its last two components (`unet/diffusion_pytorch_model.safetensors`).
fn component_name(origin: &Path, root: &Path) -> String {
    if let Ok(rel) = origin.strip_prefix(root) {
        if !rel.as_os_str().is_empty() {
            return rel.display().to_string();
        }
    }
    let mut parts: Vec<String> = origin
        .components()
        .rev()
        .take(2)
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    parts.reverse();
    parts.join("/")
}

struct LoadState {
    bar: Option<ProgressBar>,
    origin: std::path::PathBuf,
    bytes_total: u64,
    bytes: u64,
    /// Keys read so far: a loader may read a tensor twice (e.g. to probe it).
    read: HashSet<String>,
}

/// Shows loading progress while alive (a bar per checkpoint opened);
/// dropping it ends the last bar and removes the observer.
pub struct Loading {
    state: Option<Arc<Mutex<LoadState>>>,
    previous: Option<LoadObserver>,
}

/// Starts showing loading progress of the model in `root` (nothing when
/// bars are off).
pub fn loading(root: &Path) -> Loading {
    if !enabled() {
        return Loading {
            state: None,
            previous: None,
        };
    }
    let state = Arc::new(Mutex::new(LoadState {
        bar: None,
        origin: Default::default(),
        bytes_total: 0,
        bytes: 0,
        read: HashSet::new(),
    }));
    let s = state.clone();
    let root = root.to_path_buf();
    let observer: LoadObserver = Arc::new(move |e: &LoadEvent<'_>| {
        let mut st = s.lock().unwrap_or_else(|e| e.into_inner());
        match *e {
            LoadEvent::Opened { origin, tensors, bytes } => {
                if let Some(b) = st.bar.take() {
                    finish(&b);
                }
                st.origin = origin.to_path_buf();
                st.bytes_total = bytes;
                st.bytes = 0;
                st.read.clear();
                st.bar = Some(bar(
                    &format!("loading {}", component_name(origin, &root)),
                    tensors as u64,
                    "tensors",
                    Some(format!("0 B / {}", human_bytes(bytes))),
                ));
            }
            LoadEvent::Read { origin, key, bytes } if origin == st.origin => {
                if !st.read.insert(key.to_string()) {
                    return;
                }
                st.bytes += bytes;
                if let Some(b) = &st.bar {
                    b.set_position(st.read.len() as u64);
                    b.set_message(format!("{} / {}", human_bytes(st.bytes), human_bytes(st.bytes_total)));
                }
            }
            LoadEvent::Read { .. } => {}
        }
    });
    let previous = set_load_observer(Some(observer));
    Loading {
        state: Some(state),
        previous,
    }
}

impl Drop for Loading {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            set_load_observer(self.previous.take());
            let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(b) = st.bar.take() {
                finish(&b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_per_second_or_seconds_per_unit() {
        assert_eq!(rate(12.345, "steps"), "12.3 steps/s");
        assert_eq!(rate(0.25, "steps"), "4.0 s/step");
        assert_eq!(rate(0.0, "tensors"), "- tensors/s");
        assert_eq!(rate(f64::NAN, "tokens"), "- tokens/s");
    }

    #[test]
    fn components_are_named_by_folder_and_file() {
        let unet = Path::new("/m/Emu2-Gen/unet/diffusion_pytorch_model.safetensors");
        assert_eq!(
            component_name(unet, Path::new("/elsewhere")),
            "unet/diffusion_pytorch_model.safetensors"
        );
        let model = Path::new("/m/Emu2/model.safetensors.index.json");
        assert_eq!(
            component_name(model, Path::new("/m/Emu2")),
            "model.safetensors.index.json"
        );
    }
}
