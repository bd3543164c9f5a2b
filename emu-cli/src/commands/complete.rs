//! `emu complete`: let Emu2 (base) continue an interleaved image/text prompt.

use super::{report_timings, DecodeArgs, ModelArgs, OffloadArgs};
use clap::Args;
use emu::pipeline::{CompletionOptions, CompletionPipeline, ModelFamily, Result};
use emu::with_backend;
use emu_core::Backend;

/// Arguments of `emu complete`.
#[derive(Args, Debug, Clone)]
pub struct CompleteArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt in emu markup: text, with `{image PATH}` for images and
    /// `{video PATH PATH ...}` for videos, e.g.
    /// "{image a.png}[red, 3].{image b.png}[blue, 2].{image c.png}".
    pub prompt: String,
    #[command(flatten)]
    pub decode: DecodeArgs,
    #[command(flatten)]
    pub offload: OffloadArgs,
}

/// Runs `emu complete`.
pub fn run(args: &CompleteArgs) -> Result<()> {
    args.decode.check()?;
    let prompt = emu_prompt::parse_markup(&args.prompt)?;
    let (kind, dir) = args.model.resolve(ModelFamily::Emu2)?;
    let (v, l) = args.model.open(kind, &mut args.model.backends())?;
    with_backend!(v, |vb| with_backend!(l, |lb| run_on(vb, lb, args, &prompt, &dir)))
}

fn run_on<V: Backend, L: Backend>(
    vision: V,
    llm: L,
    args: &CompleteArgs,
    prompt: &emu_prompt::Prompt,
    dir: &emu::pipeline::ModelDir,
) -> Result<()> {
    let (vision, llm) = args.model.components(&vision, &llm, dir)?;
    let loading = super::progress::loading(dir.root());
    let mut pipe = CompletionPipeline::load_with_residency(dir, &vision, &llm, args.offload.offload)?;
    drop(loading);
    pipe.set_dump(args.model.dump()?);
    let opts = CompletionOptions {
        generation: args.decode.generation(),
    };
    let stream = super::output::Stream::default();
    let answer = pipe.complete_cancellable(prompt, &opts, Some(&mut |s: &str| stream.write(s)), &|| stream.failed());
    let answer = stream.finish(answer)?;
    crate::outln!()?;
    super::progress::report_tokens(answer.ids.len(), &answer.timings);
    report_timings(args.model.verbose, pipe.load_timings(), &answer.timings);
    Ok(())
}
