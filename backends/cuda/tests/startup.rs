//! Starting the backend where CUDA is missing: a clear
//! `BackendUnavailable` error, never a panic (cudarc panics when asked for a
//! library it cannot open). Runs everywhere; on a GPU machine it checks
//! that the backend starts instead.

use emu_backend_cuda::{probe, CudaBackend, CudaOptions, DEVICE_ENV};
use emu_core::Error;

#[test]
fn new_either_starts_or_says_why_it_cannot() {
    match (probe(), CudaBackend::new()) {
        (None, Ok(be)) => eprintln!("CUDA available: {be:?}"),
        (Some(reason), Err(Error::BackendUnavailable { backend, reason: r })) => {
            assert_eq!(backend, "cuda");
            assert!(!r.is_empty());
            // The reason names what is missing.
            assert!(
                r.contains("libcuda") || r.contains("libnvrtc") || r.contains("libcublas") || r.contains("device"),
                "{r}"
            );
            eprintln!("as expected without CUDA: {reason}");
        }
        (None, Err(e @ Error::BackendUnavailable { .. })) => {
            // Libraries present but no usable device (e.g. a container without the GPU).
            eprintln!("libraries present, no device: {e}");
        }
        (p, r) => panic!("probe {p:?} disagrees with new() {r:?}"),
    }
}

#[test]
fn every_constructor_returns_an_error_instead_of_panicking() {
    for r in [
        CudaBackend::with_device(0),
        CudaBackend::with_device(999),
        CudaBackend::with_options(CudaOptions { device: 7, tf32: true }),
    ] {
        if let Err(e) = r {
            assert!(matches!(e, Error::BackendUnavailable { .. }), "{e}");
        }
    }
    // A device number past the last one is refused even with a GPU.
    let e = CudaBackend::with_device(999).unwrap_err().to_string();
    assert!(e.contains("cuda"), "{e}");
}

#[test]
fn a_malformed_device_variable_is_an_invalid_argument() {
    // Only this test in this binary touches the variable.
    std::env::set_var(DEVICE_ENV, "first");
    let r = CudaOptions::from_env();
    std::env::remove_var(DEVICE_ENV);
    let e = r.unwrap_err().to_string();
    assert!(e.contains(DEVICE_ENV) && e.contains("first"), "{e}");
}
