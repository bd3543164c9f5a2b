//! What every checkpoint fuzz target does with one input: write it where
//! the loader expects a file (the loader maps files; it has no byte API),
//! open it, and read every tensor in two dtypes. Any result but a panic,
//! an abort or a hang is fine.

use emu_core::checkpoint::Checkpoint;
use emu_core::DType;
use std::path::{Path, PathBuf};

/// A folder of this process for the files under test (tmpfs when there is one).
pub fn scratch() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("emu-core-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

/// Opens `path` and reads every tensor; returns how many read.
pub fn open_and_read(path: &Path) -> usize {
    let Ok(ckpt) = Checkpoint::open(path) else { return 0 };
    let mut n = 0;
    for key in ckpt.keys() {
        if let Ok(t) = ckpt.get(key) {
            assert_eq!(t.dims(), ckpt.info(key).unwrap().dims.as_slice());
            n += 1;
        }
        let _ = ckpt.get_as(key, DType::F32);
    }
    n
}

/// Writes `data` as `name` in the scratch folder, then [`open_and_read`].
pub fn run_file(name: &str, data: &[u8]) -> usize {
    let p = scratch().join(name);
    std::fs::write(&p, data).expect("scratch write");
    open_and_read(&p)
}
