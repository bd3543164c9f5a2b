//! Standard output that reports failures instead of panicking.
//!
//! `println!` panics when stdout cannot be written: a full disk
//! (`emu inspect m > /dev/full`) or a reader that went away (`emu chat … |
//! head -1`; Rust ignores SIGPIPE, so the write fails with EPIPE). Every
//! result goes through [`write_out`] instead; `main` ends quietly with
//! success on a closed pipe, as Unix tools do, and reports anything else.

use emu::pipeline::{PipelineError, Result};
use std::io::Write;

/// Writes `text` to stdout and flushes it (so a full disk is reported here,
/// not lost when the process exits).
pub fn write_out(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(PipelineError::Stdout)
}

/// `println!` that returns the write error: `outln!("x {y}")?`.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::commands::output::write_out("\n")
    };
    ($($arg:tt)*) => {
        $crate::commands::output::write_out(&format!("{}\n", format_args!($($arg)*)))
    };
}

/// A streaming sink for generated text: writes each piece as it comes and
/// keeps the first failure for [`Stream::finish`] (generation itself cannot
/// be interrupted from the sink).
#[derive(Default)]
pub struct Stream {
    failed: Option<std::io::Error>,
}

impl Stream {
    /// Writes one piece (nothing more after a failure).
    pub fn write(&mut self, s: &str) {
        if self.failed.is_none() {
            if let Err(PipelineError::Stdout(e)) = write_out(s) {
                self.failed = Some(e);
            }
        }
    }

    /// The first write failure, if any.
    pub fn finish(self) -> Result<()> {
        match self.failed {
            Some(e) => Err(PipelineError::Stdout(e)),
            None => Ok(()),
        }
    }
}

/// Whether `e` (anywhere in its chain) is a write to a closed pipe.
pub fn is_broken_pipe(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::BrokenPipe {
                return true;
            }
        }
        if let Some(PipelineError::Stdout(io)) = err.downcast_ref::<PipelineError>() {
            if io.kind() == std::io::ErrorKind::BrokenPipe {
                return true;
            }
        }
        cur = err.source();
    }
    false
}
