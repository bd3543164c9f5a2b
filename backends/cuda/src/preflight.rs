//! The memory preflight: before a model is loaded onto a device, compare the
//! bytes its weights will take with the device's free memory, and refuse
//! with a message that says what is needed, what is free and what would fit,
//! instead of failing halfway through loading with an out-of-memory error.

use emu_core::{DType, Error, Result};

/// One part of a model that would be loaded onto the device.
#[derive(Debug, Clone, PartialEq)]
pub struct Component {
    /// The name the command line uses for its placement flag, e.g. `llm`
    /// for `--llm-backend` (`vision`, `llm`, `decoder`).
    pub name: String,
    /// Number of weight elements.
    pub params: u64,
    /// The dtype its weights will have on the device.
    pub dtype: DType,
}

impl Component {
    pub fn new(name: impl Into<String>, params: u64, dtype: DType) -> Self {
        Self {
            name: name.into(),
            params,
            dtype,
        }
    }

    /// Bytes of its weights on the device.
    pub fn bytes(&self) -> u64 {
        self.params.saturating_mul(self.dtype.size_in_bytes() as u64)
    }
}

/// Free and total memory of a device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryInfo {
    pub free: u64,
    pub total: u64,
}

/// Memory kept free beyond the weights for activations, the KV cache and
/// the libraries' workspaces: 10% of the weights, at least 1 GiB.
pub fn headroom(weights: u64) -> u64 {
    (weights / 10).max(1 << 30)
}

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

/// `Ok` when the components fit into `mem.free` with [`headroom`]; else an
/// error naming what is needed, what is free, and which `--dtype` or which
/// components moved to another backend (`--NAME-backend cpu`) would fit.
pub fn check_fits(device: &str, components: &[Component], mem: MemoryInfo) -> Result<()> {
    let need = |cs: &[&Component]| -> u64 {
        let w: u64 = cs.iter().map(|c| c.bytes()).sum();
        w + headroom(w)
    };
    let all: Vec<&Component> = components.iter().collect();
    let needed = need(&all);
    if needed <= mem.free {
        return Ok(());
    }
    let weights: u64 = all.iter().map(|c| c.bytes()).sum();
    let parts: Vec<String> = all
        .iter()
        .map(|c| format!("{} {} in {}", c.name, gib(c.bytes()), c.dtype))
        .collect();
    let mut msg = format!(
        "not enough memory on {device}: the weights take {} ({}) plus {} of headroom for activations and caches, \
         but only {} of {} is free",
        gib(weights),
        parts.join(", "),
        gib(needed - weights),
        gib(mem.free),
        gib(mem.total)
    );
    let mut hints = Vec::new();
    if all.iter().any(|c| c.dtype == DType::F32) {
        let halved: Vec<Component> = all
            .iter()
            .map(|c| Component {
                dtype: if c.dtype == DType::F32 { DType::BF16 } else { c.dtype },
                ..(*c).clone()
            })
            .collect();
        let refs: Vec<&Component> = halved.iter().collect();
        let n = need(&refs);
        hints.push(format!(
            "--dtype bf16 (needs {}, {})",
            gib(n),
            if n <= mem.free { "fits" } else { "still too much" }
        ));
    }
    // Move the largest components elsewhere until the rest fits.
    let mut by_size = all.clone();
    by_size.sort_by_key(|c| std::cmp::Reverse(c.bytes()));
    for moved in 1..by_size.len() {
        let rest = &by_size[moved..];
        if need(rest) <= mem.free {
            let flags: Vec<String> = by_size[..moved]
                .iter()
                .map(|c| format!("--{}-backend cpu", c.name))
                .collect();
            hints.push(format!("{} (leaves {} here, fits)", flags.join(" "), gib(need(rest))));
            break;
        }
    }
    if hints.is_empty() {
        hints.push("use a device with more memory or run on another backend (--backend cpu)".into());
    }
    msg.push_str("; try ");
    msg.push_str(&hints.join(", or "));
    Err(Error::Backend {
        backend: "cuda".into(),
        message: msg,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn fitting_models_pass() {
        let cs = [Component::new("llm", 1 << 30, DType::BF16)];
        check_fits(
            "d",
            &cs,
            MemoryInfo {
                free: 4 * GIB,
                total: 8 * GIB,
            },
        )
        .unwrap();
    }

    #[test]
    fn too_large_models_name_needed_free_and_fixes() {
        // 33B parameters of LLM in f32 (~123 GiB), 1B of decoder.
        let cs = [
            Component::new("llm", 33_000_000_000, DType::F32),
            Component::new("decoder", 1_000_000_000, DType::F32),
        ];
        let e = check_fits(
            "device 0 (H100)",
            &cs,
            MemoryInfo {
                free: 79 * GIB,
                total: 80 * GIB,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("device 0 (H100)"), "{e}");
        assert!(e.contains("122.9 GiB"), "{e}");
        assert!(e.contains("79.0 GiB of 80.0 GiB is free"), "{e}");
        assert!(e.contains("--dtype bf16 (needs 69.7 GiB, fits)"), "{e}");
        // Too small even in bf16, but the decoder alone fits.
        let e = check_fits(
            "d",
            &cs,
            MemoryInfo {
                free: 10 * GIB,
                total: 16 * GIB,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--dtype bf16 (needs 69.7 GiB, still too much)"), "{e}");
        assert!(e.contains("--llm-backend cpu (leaves 4.7 GiB here, fits)"), "{e}");
    }

    #[test]
    fn headroom_is_at_least_one_gib() {
        assert_eq!(headroom(0), GIB);
        assert_eq!(headroom(100 * GIB), 10 * GIB);
    }
}
