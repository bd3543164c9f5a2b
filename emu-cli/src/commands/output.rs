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
/// keeps the first failure. Generation polls [`Stream::failed`] as its cancel
/// flag, so a reader that went away (`emu chat … | head -c 10`) stops the
/// run at the next token instead of after every remaining one.
#[derive(Default)]
pub struct Stream {
    failed: std::cell::RefCell<Option<std::io::Error>>,
}

impl Stream {
    /// Writes one piece (nothing more after a failure).
    pub fn write(&self, s: &str) {
        if self.failed() {
            return;
        }
        if let Err(PipelineError::Stdout(e)) = write_out(s) {
            *self.failed.borrow_mut() = Some(e);
        }
    }

    /// Whether a write has failed: the cancel flag of the generation that
    /// feeds this stream.
    pub fn failed(&self) -> bool {
        self.failed.borrow().is_some()
    }

    /// The outcome of a generation that streamed here: the first write
    /// failure if there was one (a generation cancelled because of it ends
    /// with that failure, so a closed pipe still ends quietly), else `result`.
    pub fn finish<T>(self, result: Result<T>) -> Result<T> {
        match self.failed.into_inner() {
            Some(e) => Err(PipelineError::Stdout(e)),
            None => result,
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
