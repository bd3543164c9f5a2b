//! `emu-cli`: the `emu` command-line tool, a thin binary over the [`emu`]
//! library crate (which holds the pipelines, the tiny model, inspection,
//! conversion and backend selection).
//!
//! This library half holds only what is specific to the command line: the
//! subcommands' clap arguments, the code that runs a pipeline for each and
//! prints its result, and the progress bars ([`commands::progress`]).

pub mod commands;
