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

#[test]
fn compiled_ptx_is_cached_on_disk_and_reloaded_only_when_intact() {
    use kernels::PtxOrigin::{Cache, Compiled};
    if !nvrtc() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = Some(dir.path());
    let (fresh, origin) = kernels::compile_cached(Module::Reduce, "compute_80", cache).unwrap();
    assert_eq!(origin, Compiled);
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1, "one entry, no temporary file left: {entries:?}");
    let entry = &entries[0];
    let (again, origin) = kernels::compile_cached(Module::Reduce, "compute_80", cache).unwrap();
    assert_eq!((origin, &again), (Cache, &fresh));
    // Another architecture is another entry.
    let (_, origin) = kernels::compile_cached(Module::Reduce, "compute_90", cache).unwrap();
    assert_eq!(origin, Compiled);

    // A damaged entry is never used: it is compiled again and rewritten.
    let good = std::fs::read(entry).unwrap();
    let mut flipped = good.clone();
    let last = flipped.len() - 2;
    flipped[last] ^= 0x01;
    let damaged: [(&str, Vec<u8>); 4] = [
        ("one byte of the PTX changed", flipped),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("empty", Vec::new()),
        ("not an entry", b"hello\n.entry x(".to_vec()),
    ];
    for (what, bytes) in damaged {
        std::fs::write(entry, bytes).unwrap();
        let (ptx, origin) = kernels::compile_cached(Module::Reduce, "compute_80", cache).unwrap();
        assert_eq!((origin, &ptx), (Compiled, &fresh), "{what}");
        assert_eq!(std::fs::read(entry).unwrap(), good, "{what}: the entry is rewritten");
    }

    // A cache folder that cannot be written only costs the cache.
    let blocked = dir.path().join("a-file");
    std::fs::write(&blocked, b"").unwrap();
    let (ptx, origin) = kernels::compile_cached(Module::Reduce, "compute_80", Some(&blocked)).unwrap();
    assert_eq!((origin, &ptx), (Compiled, &fresh));
}

#[test]
fn the_ptx_cache_lives_under_the_user_cache_folder() {
    // Only the variables' values are read, never the environment changed:
    // tests share one process.
    let dir = kernels::ptx_cache_dir();
    match std::env::var_os(kernels::CACHE_DIR_ENV) {
        Some(v) if v.is_empty() => assert_eq!(dir, None),
        Some(v) => assert_eq!(dir, Some(std::path::PathBuf::from(v).join("ptx"))),
        None => {
            if let Some(d) = dir {
                assert!(d.ends_with("emu-rs/ptx"), "{}", d.display());
            }
        }
    }
}
