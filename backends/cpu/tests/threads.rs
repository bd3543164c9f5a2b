//! `set_num_threads` sizes the pool the CPU backend computes on. Its own
//! test binary: the pool is process-wide and built once.

use emu_backend_cpu::{num_threads, set_num_threads, CpuBackend};
use emu_core::Tensor;

#[test]
fn thread_count_is_set_once_before_computing() {
    set_num_threads(3).unwrap();
    assert_eq!(num_threads(), 3);
    assert_eq!(std::env::var("RAYON_NUM_THREADS").unwrap(), "3");
    // Asking again for the same count is fine; 0 means "leave it".
    set_num_threads(3).unwrap();
    set_num_threads(0).unwrap();
    let cpu = CpuBackend::new();
    let x = Tensor::from_f32(&cpu, &[64, 64], (0..64 * 64).map(|i| (i % 7) as f32).collect()).unwrap();
    let y = x.matmul(&x).unwrap().to_f32_vec().unwrap();
    let want: f32 = (0..64).map(|k| ((k % 7) * ((k * 64) % 7)) as f32).sum();
    assert_eq!(y[0], want);
    let e = set_num_threads(2).unwrap_err().to_string();
    assert!(e.contains("already runs 3"), "{e}");
    assert_eq!(num_threads(), 3);
}
