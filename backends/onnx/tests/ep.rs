//! Execution provider selection: CPU by default, CUDA on request, and a
//! `BackendUnavailable` error that says why when the loaded ONNX Runtime has
//! no CUDA provider (the CPU wheel `.ci/run` installs has none). One test, as
//! it sets `EMU_ONNX_EP` for the whole process.

use emu_backend_onnx::{ExecutionProvider, OnnxBackend};
use emu_core::{Error, Tensor};

fn squares_on(be: &OnnxBackend) {
    let x = Tensor::from_f32(be, &[2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
    assert_eq!(x.matmul(&x).unwrap().to_f32_vec().unwrap(), vec![7.0, 10.0, 15.0, 22.0]);
}

#[test]
fn the_provider_is_cpu_by_default_and_cuda_on_request_or_a_clear_error() {
    assert_eq!(ExecutionProvider::parse("cpu").unwrap(), ExecutionProvider::Cpu);
    assert_eq!(
        ExecutionProvider::parse("CUDA").unwrap(),
        ExecutionProvider::Cuda { device: 0 }
    );
    assert_eq!(
        ExecutionProvider::parse("cuda:1").unwrap(),
        ExecutionProvider::Cuda { device: 1 }
    );
    for bad in ["tpu", "cuda:-1", "cuda:x"] {
        assert!(
            matches!(ExecutionProvider::parse(bad), Err(Error::InvalidArgument(_))),
            "{bad}"
        );
    }
    std::env::remove_var("EMU_ONNX_EP");
    let Some(be) = emu_core::testing::available(OnnxBackend::new()) else {
        return;
    };
    assert_eq!(be.execution_provider(), ExecutionProvider::Cpu);
    squares_on(&be);

    std::env::set_var("EMU_ONNX_EP", "cuda");
    match OnnxBackend::new() {
        Ok(gpu) => {
            eprintln!("this ONNX Runtime has the CUDA provider");
            assert_eq!(gpu.execution_provider(), ExecutionProvider::Cuda { device: 0 });
            squares_on(&gpu);
        }
        Err(Error::BackendUnavailable { backend, reason }) => {
            eprintln!("as expected without a GPU build: {reason}");
            assert_eq!(backend, "onnx");
            assert!(reason.contains("no CUDA execution provider"), "{reason}");
        }
        Err(e) => panic!("unexpected error for EMU_ONNX_EP=cuda: {e}"),
    }
    std::env::set_var("EMU_ONNX_EP", "tpu");
    assert!(matches!(OnnxBackend::new(), Err(Error::InvalidArgument(_))));
    std::env::remove_var("EMU_ONNX_EP");
}
