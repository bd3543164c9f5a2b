//! Progress bars on standard error: checkpoint loading (one bar per
//! checkpoint, in tensors and bytes, fed by
//! [`emu_core::checkpoint::set_load_observer`]) and diffusion steps.
//!
//! Bars are drawn only when [`enabled`]: by default when standard error is a
//! terminal; `--progress` / `--no-progress` force it either way.

use emu::units::human_bytes;
use emu_core::checkpoint::{set_load_observer, LoadEvent, LoadObserver};
use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// Redraws at most this often (the last state is always drawn).
const REDRAW: Duration = Duration::from_millis(80);
const WIDTH: usize = 24;

/// One bar on standard error, redrawn in place with `\r`.
pub struct Bar {
    label: String,
    total: u64,
    done: u64,
    /// Shown after the counts, e.g. bytes read.
    extra: String,
    last: Option<Instant>,
    /// A line is on screen (and needs ending).
    open: bool,
    /// The state changed since it was last drawn.
    dirty: bool,
}

impl Bar {
    pub fn new(label: impl Into<String>, total: u64) -> Self {
        Self {
            label: label.into(),
            total,
            done: 0,
            extra: String::new(),
            last: None,
            open: false,
            dirty: false,
        }
    }

    /// Sets the count done (and a note after it) and redraws if due.
    pub fn set(&mut self, done: u64, extra: impl Into<String>) {
        self.done = done.min(self.total);
        self.extra = extra.into();
        self.dirty = true;
        let due = self.last.is_none_or(|t| t.elapsed() >= REDRAW) || self.done == self.total;
        if due {
            self.draw();
        }
    }

    /// The line as drawn (without the leading `\r`).
    pub fn line(&self) -> String {
        let filled = if self.total == 0 {
            WIDTH
        } else {
            (self.done as f64 / self.total as f64 * WIDTH as f64).round() as usize
        };
        let mut s = format!(
            "{} [{}{}] {}/{}",
            self.label,
            "#".repeat(filled),
            "-".repeat(WIDTH - filled),
            self.done,
            self.total
        );
        if !self.extra.is_empty() {
            s.push(' ');
            s.push_str(&self.extra);
        }
        s
    }

    fn draw(&mut self) {
        self.last = Some(Instant::now());
        self.open = true;
        self.dirty = false;
        let mut err = std::io::stderr().lock();
        // Clear to the end of the line: a shorter redraw leaves no tail.
        let _ = write!(err, "\r{}\x1b[K", self.line());
        let _ = err.flush();
    }

    /// Draws the final state and ends the line.
    pub fn finish(&mut self) {
        if self.open {
            if self.dirty {
                self.draw();
            }
            eprintln!();
            self.open = false;
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A bar per diffusion run: `on_step(k, n)` after step `k` of `n`.
pub fn steps(label: &str) -> impl FnMut(usize, usize) {
    let mut bar: Option<Bar> = None;
    let label = label.to_string();
    let on = enabled();
    move |k, n| {
        if !on {
            return;
        }
        let b = bar.get_or_insert_with(|| Bar::new(label.clone(), n as u64));
        b.set(k as u64, "steps");
        if k >= n {
            b.finish();
            bar = None;
        }
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
    bar: Option<Bar>,
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
                if let Some(mut b) = st.bar.take() {
                    b.finish();
                }
                st.origin = origin.to_path_buf();
                st.bytes_total = bytes;
                st.bytes = 0;
                st.read.clear();
                st.bar = Some(Bar::new(
                    format!("loading {}", component_name(origin, &root)),
                    tensors as u64,
                ));
            }
            LoadEvent::Read { origin, key, bytes } if origin == st.origin => {
                if !st.read.insert(key.to_string()) {
                    return;
                }
                st.bytes += bytes;
                let (done, note) = (
                    st.read.len() as u64,
                    format!("tensors, {} / {}", human_bytes(st.bytes), human_bytes(st.bytes_total)),
                );
                if let Some(b) = st.bar.as_mut() {
                    b.set(done, note);
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
            if let Some(mut b) = st.bar.take() {
                b.finish();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_line_shows_fill_and_counts() {
        let mut b = Bar::new("denoising", 4);
        b.done = 1;
        b.extra = "steps".into();
        assert_eq!(
            b.line(),
            format!("denoising [{}{}] 1/4 steps", "#".repeat(6), "-".repeat(18))
        );
        b.done = 4;
        assert!(b.line().contains(&"#".repeat(WIDTH)));
        let empty = Bar::new("x", 0);
        assert!(empty.line().starts_with(&format!("x [{}] 0/0", "#".repeat(WIDTH))));
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
