//! `emu`: the command-line front end of emu-rs (argument parsing and printing;
//! the work is done by the `emu` library crate).

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use emu::convert::{convert, ConvertOptions};
use emu::inspect::{inspect, render};
use emu::units::{human_bytes, parse_size};
use emu_cli::commands::output::{is_broken_pipe, write_out};
use emu_core::DType;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "emu", version, about = "Run and manage BAAI Emu2 models natively")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Threads for computing on the CPU: the cpu backend's thread pool and
    /// ONNX Runtime's intra-op threads (default: one per physical core).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    /// Draw progress bars (loading, denoising steps) on stderr even when it
    /// is not a terminal.
    #[arg(long, global = true, overrides_with = "no_progress")]
    progress: bool,
    /// Never draw progress bars (by default they are drawn when stderr is a terminal).
    #[arg(long, global = true, overrides_with = "progress")]
    no_progress: bool,
    /// Skip the memory checks that refuse a run whose estimated weights, KV
    /// cache or activations exceed the available memory (for when the
    /// estimate is wrong; also EMU_NO_MEMORY_CHECK=1). An allocation that
    /// then fails aborts the process.
    #[arg(long, global = true)]
    no_memory_check: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Show what a checkpoint holds: layout, components, files, tensors,
    /// dtypes, exact parameter counts, key prefixes and the memory each dtype
    /// needs. Reads headers only.
    Inspect(InspectArgs),
    /// Convert a checkpoint (e.g. BAAI/Emu2's fp32 pickle shards) into sharded
    /// safetensors in one float dtype, streaming one tensor at a time. Config,
    /// tokenizer and other non-weight files are copied.
    Convert(ConvertArgs),
    /// Ask Emu2-Chat about images or a video: one question, or an interactive
    /// session when none is given. `--model tiny` runs a built-in model with
    /// random weights whose answers are meaningless.
    Chat(emu_cli::commands::chat::ChatArgs),
    /// Let Emu2 (base) continue an interleaved image/text prompt (few-shot,
    /// in-context). `--model tiny` runs a built-in model with random weights.
    Complete(emu_cli::commands::complete::CompleteArgs),
    /// Generate an image with Emu2-Gen from text, subject images and boxes,
    /// written as PNG. `--model tiny` runs a built-in model with random
    /// weights whose images are meaningless noise.
    Generate(emu_cli::commands::generate::GenerateArgs),
    /// Encode images with the EVA vision encoder of any Emu2 model and write
    /// the features, pooled tokens and projected embeddings as safetensors.
    Encode(emu_cli::commands::encode::EncodeArgs),
    /// Export model components (vision, llm, unet, vae) as standalone ONNX
    /// files with documented inputs/outputs and a JSON manifest.
    ExportOnnx(emu_cli::commands::export_onnx::ExportOnnxArgs),
    /// Serve the models over an OpenAI-compatible HTTP API (chat with images,
    /// few-shot completion, image generation) with a web page at `/`.
    /// Binds to 127.0.0.1 unless `--host` says otherwise.
    Serve(emu_serve::ServeArgs),
}

#[derive(Args)]
struct InspectArgs {
    /// A checkpoint directory (HF model, diffusers pipeline or component) or
    /// file (safetensors, torch.save archive, *.index.json); `tiny` is the
    /// built-in tiny Emu2-Gen.
    path: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Which weight variant to read where several exist (e.g. bf16).
    #[arg(long)]
    variant: Option<String>,
}

#[derive(Args)]
struct ConvertArgs {
    /// The checkpoint to convert (directory or file).
    src: PathBuf,
    /// The directory to write (created if missing; must be empty unless --force).
    dst: PathBuf,
    /// Target dtype of floating-point tensors (integer and bool tensors keep theirs).
    #[arg(long, default_value = "bf16", value_parser = parse_float_dtype)]
    dtype: DType,
    /// Largest shard size: 5GB, 500MB, 2GiB, or bytes.
    #[arg(long, default_value = "5GB", value_parser = parse_shard_size)]
    shard_size: u64,
    /// Write into a non-empty destination, replacing the weight files there.
    #[arg(long)]
    force: bool,
    /// Which weight variant of the source to read where several exist (e.g. bf16).
    #[arg(long)]
    variant: Option<String>,
    /// Block-quantize linears (q8_0 or q4_k), the language model's unless
    /// --quantize-components says otherwise, and write the weights as one
    /// GGUF file; other tensors take --dtype.
    #[arg(long, value_name = "TYPE")]
    quantize: Option<String>,
    /// Which linears --quantize applies to: attn, mlp, lm_head or all.
    #[arg(long, value_name = "LIST", default_value = "attn,mlp")]
    quantize_linears: String,
    /// Which components --quantize applies to: llm, vision (the EVA blocks'
    /// linears), unet (its transformer blocks' linears), or all.
    #[arg(long, value_name = "LIST", default_value = "llm")]
    quantize_components: String,
    /// Do not print progress.
    #[arg(long, short)]
    quiet: bool,
}

fn parse_float_dtype(s: &str) -> Result<DType, String> {
    match DType::parse(s) {
        Some(d @ (DType::BF16 | DType::F16 | DType::F32)) => Ok(d),
        _ => Err(format!("`{s}` is not a conversion dtype; use bf16, f16 or f32")),
    }
}

fn parse_shard_size(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn run(cli: Cli) -> Result<()> {
    if cli.no_memory_check {
        emu::memory::disable_checks();
    }
    emu_cli::commands::set_threads(cli.threads.unwrap_or(0))?;
    emu_cli::commands::progress::set_mode(match (cli.progress, cli.no_progress) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    });
    match cli.command {
        Command::Chat(a) => emu_cli::commands::chat::run(&a)?,
        Command::Complete(a) => emu_cli::commands::complete::run(&a)?,
        Command::Generate(a) => emu_cli::commands::generate::run(&a)?,
        Command::Encode(a) => emu_cli::commands::encode::run(&a)?,
        Command::ExportOnnx(a) => {
            emu_cli::commands::export_onnx::run(&a)?;
        }
        Command::Serve(a) => emu_serve::run(a)?,
        Command::Inspect(a) => {
            // `tiny` (when no such file exists): the built-in tiny Emu2-Gen,
            // which has every component.
            let tiny = if a.path.as_os_str() == "tiny" && std::fs::symlink_metadata(&a.path).is_err() {
                eprintln!("{}", emu::tiny::TINY_NOTICE);
                Some(emu::pipeline::ModelDir::tiny(emu::pipeline::ModelFamily::Emu2Gen)?)
            } else {
                None
            };
            let path = tiny.as_ref().map_or(a.path.clone(), |t| t.root().to_path_buf());
            let ins = inspect(&path, a.variant.as_deref())?;
            if a.json {
                emu_cli::outln!("{}", serde_json::to_string_pretty(&ins)?)?;
            } else {
                write_out(&render(&ins))?;
            }
        }
        Command::Convert(a) => {
            let opts = ConvertOptions {
                dtype: a.dtype,
                shard_size: a.shard_size,
                force: a.force,
                variant: a.variant,
                quantize: emu_cli::commands::quant_request(a.quantize.as_deref(), &a.quantize_linears)?,
                quantize_components: emu_cli::commands::quant_components(
                    a.quantize.as_deref(),
                    &a.quantize_components,
                )?,
            };
            let quiet = a.quiet;
            let mut progress = |m: &str| {
                if !quiet {
                    eprintln!("{m}");
                }
            };
            let r = convert(&a.src, &a.dst, &opts, &mut progress)?;
            let read: u64 = r.weights.iter().map(|w| w.bytes_read).sum();
            let written: u64 = r.weights.iter().map(|w| w.bytes_written).sum();
            let tensors: usize = r.weights.iter().map(|w| w.tensors).sum();
            let converted: usize = r.weights.iter().map(|w| w.converted).sum();
            let shards: usize = r.weights.iter().map(|w| w.shards.len()).sum();
            emu_cli::outln!(
                "converted {tensors} tensors ({converted} {}) into {shards} shard{} in {}: {} read, {} written, {} other files copied, {:.1}s ({}/s)",
                match &opts.quantize {
                    Some(q) => format!("quantized to {} blocks, the other floats to {}", q.qtype, opts.dtype),
                    None => format!("to {}", opts.dtype),
                },
                if shards == 1 { "" } else { "s" },
                a.dst.display(),
                human_bytes(read),
                human_bytes(written),
                r.copied.len(),
                r.seconds,
                human_bytes((read as f64 / r.seconds.max(1e-9)) as u64),
            )?;
            if !r.skipped.is_empty() {
                let names: Vec<String> = r.skipped.iter().map(|p| p.display().to_string()).collect();
                emu_cli::outln!("not converted (other variants or formats): {}", names.join(", "))?;
            }
        }
    }
    Ok(())
}

/// Points `XDG_RUNTIME_DIR` at a private empty folder when it is unset or
/// invalid, for as long as the returned guard lives. wgpu's GL probe asks
/// libwayland for a display, which prints `error: XDG_RUNTIME_DIR is invalid
/// or not set in the environment` on stderr of every (successful) run
/// otherwise. Called first in `main`, before any thread exists, which is
/// what makes changing the environment sound.
fn quiet_wayland_probe() -> Option<tempfile::TempDir> {
    let valid = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .is_some_and(|p| p.is_absolute() && p.is_dir());
    if valid {
        return None;
    }
    let dir = tempfile::Builder::new().prefix("emu-runtime-").tempdir().ok()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700));
    }
    std::env::set_var("XDG_RUNTIME_DIR", dir.path());
    Some(dir)
}

fn main() -> ExitCode {
    let _runtime_dir = quiet_wayland_probe();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                e.exit();
            }
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = e.print();
                return ExitCode::from(2);
            }
            // clap's message spans several lines (usage, tips); keep the first
            // paragraph on one line and point at --help.
            let text = e.render().to_string();
            let first: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!("{} (see `emu --help`)", first.join(" "));
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output went away (`emu … | head`): end quietly,
        // as Unix tools do.
        Err(e) if is_broken_pipe(e.as_ref()) => ExitCode::SUCCESS,
        Err(e) => {
            // Not eprintln!: it would panic if stderr is closed too.
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
