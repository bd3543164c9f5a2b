//! `emu-serve`: the server on its own, until `emu serve` exists in the `emu` binary.

use clap::Parser;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "emu-serve", version, about = "An OpenAI-compatible HTTP server for Emu2, with a web page")]
struct Cli {
    /// Threads of CPU computation (0: all cores).
    #[arg(long, default_value_t = 0, value_name = "N")]
    threads: usize,
    #[command(flatten)]
    serve: emu_serve::ServeArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = emu_serve::set_threads(cli.threads) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    match emu_serve::run(cli.serve) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
