//! The PyTorch side: `tools/reference/bench_<component>.py MODEL_DIR IO_DIR
//! [--threads N] --warmup N --iters N --dtype f32|bf16` loads the model the
//! Rust side wrote and the inputs in `IO_DIR/inputs.safetensors`, times the
//! same calls, and writes `IO_DIR/torch.json` (`{"torch": version,
//! "threads": n, "ms": {key: [..]}}`) and `IO_DIR/torch_out.safetensors`
//! (the last output of each call, by key, as f32).

use emu_core::Checkpoint;
use std::path::Path;
use std::process::Command;

use super::{Component, Options, Res, Workdir};

/// What the script measured.
pub struct TorchRun {
    /// torch version and thread count, as the script reports them.
    pub about: String,
    /// `(key, ms of each timed run, last output)` per call.
    pub calls: Vec<(String, Vec<f64>, Vec<f32>)>,
}

/// Runs the script of `c` with `python`.
pub fn run(python: &Path, c: Component, work: &Workdir, o: &Options) -> Res<TorchRun> {
    let script = crate::workspace_root().join("tools/reference").join(c.torch_script());
    let io = work.io(c);
    let mut cmd = Command::new(python);
    cmd.arg(&script)
        .arg(work.model(c))
        .arg(&io)
        .args(["--warmup", &o.timing.warmup.to_string()])
        .args(["--iters", &o.timing.iters.to_string()])
        .args(["--dtype", &o.dtype.to_string()]);
    if let Some(n) = o.threads {
        cmd.args(["--threads", &n.to_string()]);
    }
    let status = cmd.status().map_err(|e| format!("running {}: {e}", python.display()))?;
    if !status.success() {
        return Err(format!("{} failed ({status})", script.display()).into());
    }
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(io.join("torch.json"))?)?;
    let outs = Checkpoint::open(io.join("torch_out.safetensors"))?;
    let times = meta["ms"].as_object().ok_or("torch.json has no `ms`")?;
    let mut calls = Vec::new();
    for (key, ms) in times {
        let ms = ms
            .as_array()
            .ok_or_else(|| format!("torch.json: ms.{key} is not a list"))?
            .iter()
            .filter_map(|v| v.as_f64())
            .collect();
        calls.push((key.clone(), ms, outs.get(key)?.to_f32_vec()?));
    }
    Ok(TorchRun {
        about: format!(
            "torch {} on {} threads",
            meta["torch"].as_str().unwrap_or("?"),
            meta["threads"]
        ),
        calls,
    })
}
