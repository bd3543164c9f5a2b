//! Every kernel module compiles with NVRTC for sm_80 (A100) and sm_90
//! (H100): no GPU or driver needed, only libnvrtc. CI installs the pinned
//! `nvidia-cuda-nvrtc` wheel and points `EMU_CUDA_LIB_DIRS` at its lib
//! folder; without libnvrtc the tests say so and skip, unless
//! `EMU_REQUIRE_NVRTC=1` (set by CI) makes that a failure.

use emu_backend_cuda::kernels::{self, Module};

/// Whether NVRTC can be used; `false` (with a note) means skip.
fn nvrtc() -> bool {
    if kernels::nvrtc_available() {
        return true;
    }
    let msg = format!(
        "libnvrtc not found: set {} to the lib folder of the nvidia-cuda-nvrtc wheel",
        emu_backend_cuda::loader::LIB_DIRS_ENV
    );
    if std::env::var("EMU_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
        panic!("{msg} (EMU_REQUIRE_NVRTC=1)");
    }
    eprintln!("skipping: {msg}");
    false
}

#[test]
fn every_kernel_module_compiles_for_sm80_and_sm90() {
    if !nvrtc() {
        return;
    }
    for arch in ["compute_80", "compute_90"] {
        for m in Module::ALL {
            let ptx = kernels::compile(m, arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(ptx.contains(".entry"), "{} for {arch}: no kernels in the PTX", m.name());
            eprintln!("{} for {arch}: {} bytes of PTX", m.name(), ptx.len());
        }
    }
}

#[test]
fn every_kernel_the_backend_launches_is_in_its_module() {
    if !nvrtc() {
        return;
    }
    let ptx: Vec<String> = Module::ALL
        .iter()
        .map(|&m| kernels::compile(m, "compute_80").unwrap())
        .collect();
    for (m, name) in kernels::launched_kernels() {
        let idx = Module::ALL.iter().position(|&x| x == m).unwrap();
        assert!(
            ptx[idx].contains(&format!(".entry {name}(")),
            "{name} is launched but not defined in {}",
            m.name()
        );
    }
}

#[test]
fn a_kernel_that_does_not_compile_is_an_error_with_the_log() {
    if !nvrtc() {
        return;
    }
    let e = kernels::compile_source(
        "extern \"C\" __global__ void k() { undefined_thing(); }",
        "bad.cu",
        "compute_80",
    )
    .unwrap_err();
    assert!(e.contains("bad.cu") && e.contains("undefined_thing"), "{e}");
}
