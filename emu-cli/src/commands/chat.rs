//! `emu chat`: ask Emu2-Chat about images and videos.

use super::{report_timings, DecodeArgs, ModelArgs, OffloadArgs};
use clap::Args;
use emu::pipeline::{ChatOptions, ChatPipeline, ModelFamily, PipelineError, Result};
use emu::with_backend;
use emu_core::Backend;
use emu_prompt::{Item, Prompt, Role, Turn, Video};
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

/// Arguments of `emu chat`.
#[derive(Args, Debug, Clone)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The question. Without one, an interactive session reads questions
    /// from standard input, one per line, until an empty line or end of input.
    pub question: Option<String>,
    /// An image to ask about; repeat for several. Images come before the
    /// question, in the order given.
    #[arg(long = "image", value_name = "FILE")]
    pub images: Vec<PathBuf>,
    /// A video, given as its frames (already sampled, in order).
    #[arg(long, value_name = "FRAME", num_args = 1..)]
    pub video: Vec<PathBuf>,
    /// Grounding mode: answers with [x1, y1, x2, y2] boxes, printed in pixels of the first image.
    #[arg(long)]
    pub grounding: bool,
    /// With --grounding: save the first image with the answer's boxes drawn on it (PNG).
    #[arg(long, value_name = "FILE.png", requires = "grounding")]
    pub boxes_out: Option<PathBuf>,
    /// Replace the system message.
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    #[command(flatten)]
    pub decode: DecodeArgs,
    #[command(flatten)]
    pub offload: OffloadArgs,
}

/// Runs `emu chat`.
pub fn run(args: &ChatArgs) -> Result<()> {
    args.decode.check()?;
    for p in args.images.iter().chain(&args.video) {
        if !p.is_file() {
            return Err(PipelineError::Input(format!(
                "image `{}` does not exist or is not a file",
                p.display()
            )));
        }
    }
    if args.grounding && args.images.is_empty() {
        return Err(PipelineError::Input(
            "--grounding answers with boxes in pixels of the first image; give one with --image".into(),
        ));
    }
    if let Some(out) = &args.boxes_out {
        if args.images.is_empty() {
            return Err(PipelineError::Input(
                "--boxes-out draws on the first image; give one with --image".into(),
            ));
        }
        super::generate::check_png_output(out)?;
    }
    let (kind, dir) = args.model.resolve(ModelFamily::Emu2Chat)?;
    let (v, l) = args.model.open(kind, &mut args.model.backends())?;
    with_backend!(v, |vb| with_backend!(l, |lb| run_on(vb, lb, args, &dir)))
}

fn path_str(p: &std::path::Path) -> Result<String> {
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| PipelineError::Input(format!("path `{}` is not valid UTF-8", p.display())))
}

fn run_on<V: Backend, L: Backend>(vision: V, llm: L, args: &ChatArgs, dir: &emu::pipeline::ModelDir) -> Result<()> {
    let (vision, llm) = args.model.components(&vision, &llm, dir)?;
    let loading = super::progress::loading(dir.root());
    let mut chat = ChatPipeline::load_with_residency(dir, &vision, &llm, args.offload.offload)?;
    drop(loading);
    chat.set_dump(args.model.dump()?);
    let opts = ChatOptions {
        grounding: args.grounding,
        system: args.system.clone(),
        generation: args.decode.generation(),
    };
    let mut visuals: Vec<Item> = Vec::new();
    for p in &args.images {
        visuals.push(Item::Image(path_str(p)?));
    }
    if !args.video.is_empty() {
        let frames = args.video.iter().map(|p| path_str(p)).collect::<Result<Vec<_>>>()?;
        visuals.push(Item::Video(Video { frames }));
    }
    let mut turns: Vec<Turn> = Vec::new();
    let interactive = args.question.is_none();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        let question = match &args.question {
            Some(q) => q.clone(),
            None => {
                if std::io::stdin().is_terminal() {
                    eprint!("> ");
                    let _ = std::io::stderr().flush();
                }
                match lines.next() {
                    Some(Ok(l)) if !l.trim().is_empty() => l,
                    Some(Err(e)) => return Err(PipelineError::Input(format!("reading standard input: {e}"))),
                    _ => break,
                }
            }
        };
        let mut items = if turns.is_empty() { visuals.clone() } else { Vec::new() };
        items.push(Item::Text(question));
        turns.push(Turn {
            role: Role::User,
            items,
        });
        let prompt = Prompt { turns: turns.clone() };
        let stream = super::output::Stream::default();
        let answer = chat.answer_cancellable(&prompt, &opts, Some(&mut |s: &str| stream.write(s)), &|| {
            stream.failed()
        });
        let answer = stream.finish(answer)?;
        crate::outln!()?;
        if let Some(g) = &answer.grounding {
            for b in &g.boxes {
                let [l, t, r, bt] = b.pixels;
                crate::outln!("box: [{l:.0}, {t:.0}, {r:.0}, {bt:.0}] (pixels of the first image)")?;
            }
            for p in &g.problems {
                eprintln!("warning: unreadable box in the answer: {}", p.message);
            }
            if let (Some(out), Some(first)) = (&args.boxes_out, args.images.first()) {
                draw_boxes(first, out, &g.boxes.iter().map(|b| b.pixels).collect::<Vec<_>>())?;
            }
        }
        super::progress::report_tokens(answer.ids.len(), &answer.timings);
        report_timings(args.model.verbose, chat.load_timings(), &answer.timings);
        if !interactive {
            break;
        }
        turns.push(Turn {
            role: Role::Assistant,
            items: vec![Item::Text(answer.text.trim().to_string())],
        });
    }
    Ok(())
}

/// Writes `image` with `boxes` (`[left, top, right, bottom]` in its pixels)
/// outlined in red, 2 px wide, clipped to the image.
pub fn draw_boxes(image: &std::path::Path, out: &std::path::Path, boxes: &[[f64; 4]]) -> Result<()> {
    let img = emu_vision::load_image(image, &emu_vision::DecodeOptions::default())?;
    let (w, h) = (img.width(), img.height());
    let mut buf = image::RgbImage::from_raw(w, h, img.into_bytes())
        .ok_or_else(|| PipelineError::Input(format!("`{}`: decoded image has the wrong size", image.display())))?;
    let red = image::Rgb([255u8, 0, 0]);
    for b in boxes {
        let clamp = |v: f64, max: u32| (v.round().max(0.0) as u32).min(max.saturating_sub(1));
        let (l, t, r, bt) = (clamp(b[0], w), clamp(b[1], h), clamp(b[2], w), clamp(b[3], h));
        for k in 0..2u32 {
            for x in l..=r {
                for y in [t.saturating_add(k).min(bt), bt.saturating_sub(k).max(t)] {
                    buf.put_pixel(x, y, red);
                }
            }
            for y in t..=bt {
                for x in [l.saturating_add(k).min(r), r.saturating_sub(k).max(l)] {
                    buf.put_pixel(x, y, red);
                }
            }
        }
    }
    buf.save_with_format(out, image::ImageFormat::Png)
        .map_err(|e| PipelineError::Input(format!("cannot write `{}`: {e}", out.display())))?;
    Ok(())
}
