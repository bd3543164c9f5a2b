//! Finding the CUDA libraries at run time.
//!
//! cudarc opens `libcuda`, `libnvrtc` and `libcublas` by soname, so the
//! dynamic linker's search path (`LD_LIBRARY_PATH`, ldconfig) decides. The
//! NVIDIA pip wheels (`nvidia-cuda-nvrtc`, `nvidia-cublas`) put theirs in
//! `site-packages/nvidia/<pkg>/lib`, which is on no search path. Before
//! cudarc looks, this module opens every such library found in
//! [`LIB_DIRS_ENV`] and in the wheel folders of the active Python
//! environment (`VIRTUAL_ENV`, `CONDA_PREFIX`) by full path with
//! `RTLD_GLOBAL`; the dynamic linker then answers cudarc's open-by-soname
//! with the library already loaded. The driver (`libcuda`) always comes from
//! the system.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Colon-separated folders holding `libnvrtc.so.*` / `libcublas*.so.*`
/// (e.g. `.venv/lib/python3.11/site-packages/nvidia/cu13/lib`).
pub const LIB_DIRS_ENV: &str = "EMU_CUDA_LIB_DIRS";

/// Library name prefixes loaded from those folders, dependencies first.
const PRELOAD: &[&str] = &["libcublasLt.so", "libcublas.so", "libnvrtc.so"];

/// Folders searched: [`LIB_DIRS_ENV`] first, then the active Python
/// environment's `site-packages/nvidia/*/lib`.
pub fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os(LIB_DIRS_ENV)
        .map(|v| {
            std::env::split_paths(&v)
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(prefix) = std::env::var_os(var) {
            dirs.extend(wheel_lib_dirs(Path::new(&prefix)));
        }
    }
    dirs
}

/// `PREFIX/lib/python3*/site-packages/nvidia/*/lib`, sorted.
pub fn wheel_lib_dirs(prefix: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(libdir) = std::fs::read_dir(prefix.join("lib")) else {
        return out;
    };
    for py in libdir.flatten() {
        if !py.file_name().to_string_lossy().starts_with("python3") {
            continue;
        }
        let Ok(pkgs) = std::fs::read_dir(py.path().join("site-packages").join("nvidia")) else {
            continue;
        };
        for pkg in pkgs.flatten() {
            let lib = pkg.path().join("lib");
            if lib.is_dir() {
                out.push(lib);
            }
        }
    }
    out.sort();
    out
}

/// The libraries in `dir` that [`preload`] opens, in load order.
pub fn libraries_in(dir: &Path) -> Vec<PathBuf> {
    let names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    for prefix in PRELOAD {
        // `libcublas.so.13` but not `libcublasLt.so.13` for the `libcublas.so` prefix.
        let mut found: Vec<&String> = names.iter().filter(|n| n.starts_with(prefix)).collect();
        found.sort();
        // The most specific name (`.so.13` over `.so`) is what the soname lookup matches.
        if let Some(n) = found.last() {
            out.push(dir.join(n));
        }
    }
    out
}

/// Opens the libraries of [`candidate_dirs`] once per process and returns
/// what was loaded or failed, for error messages.
pub fn preload() -> &'static [String] {
    static DONE: OnceLock<Vec<String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let mut notes = Vec::new();
        for dir in candidate_dirs() {
            for lib in libraries_in(&dir) {
                notes.push(match open_global(&lib) {
                    Ok(()) => format!("loaded {}", lib.display()),
                    Err(e) => format!("could not load {}: {e}", lib.display()),
                });
            }
        }
        notes
    })
}

#[cfg(unix)]
fn open_global(path: &Path) -> Result<(), String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: loading a CUDA library runs only its own initialisers.
    let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }.map_err(|e| e.to_string())?;
    // Kept for the life of the process: cudarc's handles point into it.
    std::mem::forget(lib);
    Ok(())
}

#[cfg(not(unix))]
fn open_global(_path: &Path) -> Result<(), String> {
    Err("preloading is implemented for Linux only; put the folder on PATH".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_wheel_folders_and_orders_libraries() {
        let root = std::env::temp_dir().join(format!("emu-cuda-loader-{}", std::process::id()));
        let lib = root.join("lib/python3.11/site-packages/nvidia/cu13/lib");
        std::fs::create_dir_all(&lib).unwrap();
        for f in [
            "libnvrtc.so.13",
            "libnvrtc-builtins.so.13.5",
            "libcublas.so.13",
            "libcublasLt.so.13",
            "libcudart.so.13",
        ] {
            std::fs::write(lib.join(f), b"").unwrap();
        }
        std::fs::create_dir_all(root.join("lib/python3.11/site-packages/nvidia/nolib")).unwrap();
        assert_eq!(wheel_lib_dirs(&root), vec![lib.clone()]);
        let names: Vec<String> = libraries_in(&lib)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["libcublasLt.so.13", "libcublas.so.13", "libnvrtc.so.13"]);
        assert!(wheel_lib_dirs(&root.join("absent")).is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
