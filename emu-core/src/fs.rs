//! Reading user-named files without blocking on special files.
//!
//! `File::open` on a FIFO blocks until a writer appears, and reading
//! `/dev/zero` or a directory never ends or fails obscurely. Every file a
//! user names (checkpoint, config, tokenizer, image) is therefore checked
//! with `metadata` first: only regular files (symlinks followed) are opened.
//! The errors are `std::io::Error`s whose text says what the path is and
//! what was expected, so each crate wraps them with the path in its own
//! error type.

use std::io::{Error, ErrorKind, Read};
use std::path::Path;

/// Largest config/index/tokenizer file read whole into memory (JSON configs
/// are kilobytes; tokenizer files a few megabytes).
pub const MAX_TEXT_FILE: u64 = 256 << 20;

/// What a non-regular file is, in words.
fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    let ft = meta.file_type();
    if ft.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    "a special file"
}

/// `std::fs::metadata` (symlinks followed) with errors that say what is
/// wrong in words: missing, a dangling symlink, a symlink loop.
pub fn metadata(path: &Path) -> std::io::Result<std::fs::Metadata> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(m),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let dangling = std::fs::symlink_metadata(path).is_ok();
            Err(Error::new(
                ErrorKind::NotFound,
                if dangling {
                    "is a symlink to a file that does not exist"
                } else {
                    "does not exist"
                },
            ))
        }
        // ELOOP: the message of the OS is obscure ("too many levels").
        Err(e) if e.raw_os_error() == Some(40) => Err(Error::other("is a symlink loop, not a file")),
        Err(e) => Err(e),
    }
}

/// Checks that `path` is a regular file (after following symlinks) and
/// returns its length. Directories, FIFOs, devices, sockets, symlink loops
/// and missing files are errors that say which.
pub fn regular_file_len(path: &Path) -> std::io::Result<u64> {
    let meta = metadata(path)?;
    if !meta.is_file() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("is {}, expected a regular file", kind_of(&meta)),
        ));
    }
    Ok(meta.len())
}

/// Reads a whole regular file of at most `limit` bytes (see
/// [`regular_file_len`]); the limit also holds if the file grows meanwhile.
pub fn read_limited(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let len = regular_file_len(path)?;
    if len > limit {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("is {len} bytes, more than the {limit} bytes expected of this file"),
        ));
    }
    let mut buf = Vec::with_capacity(len as usize);
    std::fs::File::open(path)?.take(limit + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("grew past the {limit} bytes expected of this file while being read"),
        ));
    }
    Ok(buf)
}

/// [`read_limited`] with [`MAX_TEXT_FILE`], as UTF-8 text.
pub fn read_text(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_limited(path, MAX_TEXT_FILE)?)
        .map_err(|_| Error::new(ErrorKind::InvalidData, "is not UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_files_are_refused_by_kind() {
        let dir = std::env::temp_dir().join(format!("emu-core-fs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = read_text(&dir).unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        #[cfg(unix)]
        {
            let e = regular_file_len(Path::new("/dev/zero")).unwrap_err().to_string();
            assert!(e.contains("character device"), "{e}");
            let lp = dir.join("loop");
            let _ = std::fs::remove_file(&lp);
            std::os::unix::fs::symlink(&lp, &lp).unwrap();
            let e = regular_file_len(&lp).unwrap_err().to_string();
            assert!(e.contains("symlink loop"), "{e}");
            let fifo = dir.join("fifo");
            let _ = std::fs::remove_file(&fifo);
            let made = std::process::Command::new("mkfifo").arg(&fifo).status();
            if made.is_ok_and(|s| s.success()) {
                // Would block forever if it were opened.
                let e = read_text(&fifo).unwrap_err().to_string();
                assert!(e.contains("FIFO"), "{e}");
            }
        }
        let missing = dir.join("missing.json");
        let e = read_text(&missing).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        let big = dir.join("big.json");
        std::fs::write(&big, b"0123456789").unwrap();
        let e = read_limited(&big, 4).unwrap_err().to_string();
        assert!(e.contains("10 bytes"), "{e}");
        assert_eq!(read_limited(&big, 10).unwrap().len(), 10);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
