//! Helpers shared by the wgpu backend's test binaries.
#![allow(dead_code, unused_imports)] // each test binary uses its own subset

use emu_backend_wgpu::WgpuBackend;

/// The backend, or `None` (with a note) where no adapter exists; any other
/// failure to start is a test failure.
pub fn backend() -> Option<WgpuBackend> {
    emu_core::testing::available(WgpuBackend::new())
}

pub use emu_core::testing::{host_rel_err as rel_err, uniform_host as uniform};
