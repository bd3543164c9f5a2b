//! `Backend::run` puts a whole model call on the CPU backend's pool. Its
//! own test binary, so the pool it starts does not clash with `threads.rs`.

use emu_backend_cpu::CpuBackend;
use emu_core::Tensor;

#[test]
fn run_moves_a_model_call_onto_the_pool_once() {
    use emu_core::Backend;
    let cpu = CpuBackend::new();
    let here = std::thread::current().id();
    let (outer, inner, y) = cpu.run(|| {
        let outer = std::thread::current().id();
        // Nested calls (a model inside a pipeline) stay on the same thread.
        let inner = cpu.run(|| std::thread::current().id());
        let x = Tensor::from_f32(&cpu, &[2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        (outer, inner, x.matmul(&x).unwrap().to_f32_vec().unwrap())
    });
    assert_ne!(outer, here, "the call ran on the caller's thread");
    assert_eq!(inner, outer);
    assert_eq!(y, [7.0, 10.0, 15.0, 22.0]);
}
