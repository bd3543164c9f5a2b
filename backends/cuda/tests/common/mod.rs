//! Helpers shared by the CUDA backend's test binaries.
#![allow(dead_code, unused_imports)] // each test binary uses its own subset

use emu_backend_cuda::CudaBackend;

/// The backend, or `None` (with a note) where this machine has no NVIDIA
/// driver, device or CUDA library; any other failure to start is a test failure.
pub fn backend() -> Option<CudaBackend> {
    emu_core::testing::available(CudaBackend::new())
}

pub use emu_core::testing::{host_rel_err as rel_err, uniform_host as uniform};
