//! Keeping freed activation memory in the process (glibc).
//!
//! glibc hands allocations over its mmap threshold (32 MiB at most) back to
//! the kernel on free, and trims the top of its heap past a threshold, so
//! the next op's large output is fresh memory that faults in page by page.
//! On the VM the benchmarks run on, first touching 32 MiB costs about 13 ms
//! of page faults against 7 ms to write it; a softmax over it computes in a
//! few. A bf16 model converts through such buffers on every op, and the VAE
//! at 256 px holds 32 MiB activations.
//!
//! So the first CPU backend asks glibc to serve every allocation from its
//! heaps (`M_MMAP_MAX` 0) and not to trim them (`M_TRIM_THRESHOLD`): a
//! freed buffer is reused by the next allocation of its size, as PyTorch's
//! smaller buffers are. The cost is that the process keeps its peak heap
//! until it exits (a component released by staged offload is reused by the
//! next one, not returned). `EMU_CPU_MALLOC=system` keeps glibc's defaults.

/// Applies the settings once per process (no-op off glibc, or when
/// `EMU_CPU_MALLOC=system`).
pub(crate) fn keep_freed_memory() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var("EMU_CPU_MALLOC").is_ok_and(|v| v.trim() == "system") {
            return;
        }
        apply();
    });
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() {
    // SAFETY: mallopt only changes allocator parameters; it is safe to call
    // at any time (glibc takes its own lock).
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() {}
