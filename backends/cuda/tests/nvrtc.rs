//! Every kernel module compiles with NVRTC for sm_80 (A100) and sm_90
//! (H100): no GPU or driver needed, only libnvrtc. CI installs the pinned
//! `nvidia-cuda-nvrtc` wheel and points `EMU_CUDA_LIB_DIRS` at its lib
//! folder; without libnvrtc the test says so and skips.

use emu_backend_cuda::kernels::{self, Module};

#[test]
fn every_kernel_module_compiles_for_sm80_and_sm90() {
    if !kernels::nvrtc_available() {
        eprintln!(
            "skipping: libnvrtc not found (set {} to the lib folder of the nvidia-cuda-nvrtc wheel)",
            emu_backend_cuda::loader::LIB_DIRS_ENV
        );
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
    if !kernels::nvrtc_available() {
        eprintln!("skipping: libnvrtc not found");
        return;
    }
    let ptx: Vec<String> = Module::ALL.iter().map(|&m| kernels::compile(m, "compute_80").unwrap()).collect();
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
    if !kernels::nvrtc_available() {
        eprintln!("skipping: libnvrtc not found");
        return;
    }
    let e = kernels::compile_source("extern \"C\" __global__ void k() { undefined_thing(); }", "bad.cu", "compute_80")
        .unwrap_err();
    assert!(e.contains("bad.cu") && e.contains("undefined_thing"), "{e}");
}
