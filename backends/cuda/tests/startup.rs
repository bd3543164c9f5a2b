//! Starting the backend where CUDA is missing: a clear
//! `BackendUnavailable` error, never a panic (cudarc panics when asked for a
//! library it cannot open). Runs everywhere; on a GPU machine it checks
//! that the backend starts instead.

use emu_backend_cuda::{probe, CudaBackend, CudaOptions, DEVICE_ENV, TF32_ENV};
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
fn malformed_variables_are_invalid_arguments() {
    let e = CudaOptions::parse(Some("first"), None).unwrap_err().to_string();
    assert!(e.contains(DEVICE_ENV) && e.contains("first"), "{e}");
    let e = CudaOptions::parse(None, Some("yes please")).unwrap_err().to_string();
    assert!(e.contains(TF32_ENV), "{e}");
    assert_eq!(
        CudaOptions::parse(Some(" 2 "), Some("1")).unwrap(),
        CudaOptions { device: 2, tf32: true }
    );
    assert_eq!(CudaOptions::parse(None, None).unwrap(), CudaOptions::default());
}
