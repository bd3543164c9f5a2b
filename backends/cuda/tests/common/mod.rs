//! Helpers shared by the CUDA backend's test binaries.
#![allow(dead_code)] // each test binary uses its own subset

use emu_backend_cuda::CudaBackend;
use emu_core::testing::Rng;
use emu_core::HostTensor;

/// The backend, or `None` (with a note) where this machine has no NVIDIA
/// driver, device or CUDA library; any other failure to start is a test failure.
pub fn backend() -> Option<CudaBackend> {
    emu_core::testing::available(CudaBackend::new())
}

/// f32 values uniform in `[lo, hi)`.
pub fn uniform(rng: &mut Rng, dims: &[usize], lo: f64, hi: f64) -> HostTensor {
    let n = dims.iter().product();
    HostTensor::from_f32(dims, (0..n).map(|_| rng.uniform(lo, hi) as f32).collect()).unwrap()
}

/// Largest absolute difference relative to the largest reference value.
pub fn rel_err(got: &HostTensor, want: &HostTensor) -> f64 {
    assert_eq!(got.dims(), want.dims());
    let f64s = |t: &HostTensor| -> Vec<f64> { t.to_f32_vec().unwrap().into_iter().map(f64::from).collect() };
    emu_core::testing::rel_err(&f64s(got), &f64s(want))
}
