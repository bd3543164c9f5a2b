//! Text-answering pipelines: Emu2-Chat ([`ChatPipeline`]) and Emu2 base
//! few-shot completion ([`CompletionPipeline`]).

use super::dump::Dump;
use super::emu2::Emu2Model;
use super::error::{PipelineError, Result};
use super::model::{ModelDir, ModelFamily};
use super::{Component, Residency, Timings};
use emu_core::Backend;
use emu_llm::{generate_batch, generate_with, BatchRow, GenerationConfig, Hooks};
use emu_prompt::{
    parse_boxes, render, Emu2Tokenizer, Grounding, ModelKind, Prompt, RenderOptions, SpecialToken, Variant,
};
use std::time::Instant;

/// Upstream's decoding settings for Emu2 and Emu2-Chat (SPEC §3.7): beam
/// search with 5 beams and `length_penalty = -1`, which favours short
/// answers (good for VQA); set `length_penalty` to about 2.0 for longer chat
/// answers. `max_new_tokens` is 64 as in upstream's Hugging Face examples.
/// `num_beams = 1` is greedy search, the only mode that can stream.
/// Decoding follows transformers 5.x; upstream pins 4.31, which scores beams
/// differently: set `transformers` to `TransformersVersion::V4_31` for that.
pub fn upstream_generation() -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: 64,
        min_new_tokens: 1,
        eos_token_ids: vec![SpecialToken::Eos.id()],
        pad_token_id: Some(SpecialToken::Pad.id()),
        bos_token_id: Some(SpecialToken::Bos.id()),
        num_beams: 5,
        length_penalty: -1.0,
        ..GenerationConfig::default()
    }
}

/// What a text pipeline returns.
#[derive(Debug, Clone)]
pub struct ChatAnswer {
    /// The decoded answer.
    pub text: String,
    /// The generated token ids, up to (not including) the end-of-sequence token.
    pub ids: Vec<u32>,
    /// Length of the prompt in tokens (image slots included).
    pub prompt_tokens: usize,
    /// Boxes read from the answer in grounding mode, in pixels of the first image.
    pub grounding: Option<Grounding>,
    pub timings: Timings,
}

/// Streams decoded text as tokens arrive, holding back incomplete UTF-8.
struct TextStream<'a, 'b> {
    tokenizer: &'a Emu2Tokenizer,
    skip_special: bool,
    eos: &'a [u32],
    ids: Vec<u32>,
    done: bool,
    printed: usize,
    sink: &'a mut (dyn FnMut(&str) + 'b),
}

impl TextStream<'_, '_> {
    fn push(&mut self, id: u32) {
        if self.done || self.eos.contains(&id) {
            self.done = true;
            return;
        }
        self.ids.push(id);
        self.flush(false);
    }

    fn flush(&mut self, last: bool) {
        let Ok(text) = self.tokenizer.decode(&self.ids, self.skip_special) else {
            return;
        };
        // A multi-byte character split over byte tokens decodes as U+FFFD until complete.
        if !last && text.ends_with('\u{FFFD}') {
            return;
        }
        if text.len() > self.printed && text.is_char_boundary(self.printed) {
            (self.sink)(&text[self.printed..]);
            self.printed = text.len();
        }
    }
}

/// Generated ids up to the first end-of-sequence id.
fn until_eos(ids: &[u32], eos: &[u32]) -> Vec<u32> {
    ids.iter().copied().take_while(|id| !eos.contains(id)).collect()
}

/// Refuses a prompt of `prompt_tokens` whose answer cannot fit the context.
fn check_context<V: Backend, L: Backend>(
    model: &Emu2Model<V, L>,
    prompt_tokens: usize,
    generation: &GenerationConfig,
) -> Result<()> {
    let max = model.llm_config().max_position_embeddings;
    if prompt_tokens + generation.max_new_tokens > max {
        return Err(PipelineError::Input(format!(
            "the prompt is {prompt_tokens} tokens and {} new tokens were asked for, more than the model's context of {max}; lower --max-new-tokens or use fewer images",
            generation.max_new_tokens
        )));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_text<V: Backend, L: Backend>(
    model: &Emu2Model<V, L>,
    prompt: &Prompt,
    render_opts: &RenderOptions,
    generation: &GenerationConfig,
    skip_special: bool,
    dump: Option<&Dump>,
    on_text: Option<&mut dyn FnMut(&str)>,
    cancel: &dyn Fn() -> bool,
) -> Result<(Vec<u32>, String, usize, Timings)> {
    let mut timings = Timings::default();
    let rendered = render(prompt, render_opts)?;
    let ids = model.tokenize(&rendered, dump)?;
    check_context(model, ids.len(), generation)?;
    let pics = model.prompt_pictures(&rendered)?;
    // The vision stage ends here (sequential: the encoder is dropped).
    let visuals = model.visuals(&pics, dump, &mut timings)?;
    let side = model.hold_llm(&mut timings)?;
    let embeds = model.embed_prompt(&side, &ids, &visuals, dump, &mut timings)?;
    side.dump_prefill(&embeds, dump)?;
    model.check_llm_memory(
        ids.len(),
        generation.num_beams,
        generation.max_new_tokens,
        &format!(
            "generating {} tokens after a {}-token prompt",
            generation.max_new_tokens,
            ids.len()
        ),
    )?;
    let t0 = Instant::now();
    let eos = generation.eos_token_ids.clone();
    // Stop strings match the text as the answer is decoded; an id the
    // tokenizer cannot decode matches nothing.
    let decode = |ids: &[u32]| model.tokenizer.decode(ids, skip_special).unwrap_or_default();
    // Cancellation ends every sequence at its next token (beams included);
    // the truncated output is then discarded below.
    let mut stop = |_: &[u32]| cancel();
    let out = match on_text {
        Some(sink) if generation.num_beams == 1 => {
            let mut stream = TextStream {
                tokenizer: &model.tokenizer,
                skip_special,
                eos: &eos,
                ids: Vec::new(),
                done: false,
                printed: 0,
                sink,
            };
            let out = {
                let mut on_token = |t: &[u32]| {
                    if let Some(&id) = t.first() {
                        stream.push(id);
                    }
                };
                let hooks = Hooks {
                    on_token: Some(&mut on_token),
                    decode: Some(&decode),
                    stop: Some(&mut stop),
                };
                generate_with(&side.llm, &embeds, &[], generation, hooks)?
            };
            stream.flush(true);
            out
        }
        Some(sink) => {
            let hooks = Hooks {
                on_token: None,
                decode: Some(&decode),
                stop: Some(&mut stop),
            };
            let out = generate_with(&side.llm, &embeds, &[], generation, hooks)?;
            let ids = until_eos(out.first().map(Vec::as_slice).unwrap_or_default(), &eos);
            sink(&model.tokenizer.decode(&ids, skip_special)?);
            out
        }
        None => {
            let hooks = Hooks {
                on_token: None,
                decode: Some(&decode),
                stop: Some(&mut stop),
            };
            generate_with(&side.llm, &embeds, &[], generation, hooks)?
        }
    };
    if cancel() {
        return Err(PipelineError::Cancelled);
    }
    timings.add("generate", t0.elapsed());
    let new_ids = until_eos(out.first().map(Vec::as_slice).unwrap_or_default(), &eos);
    if let Some(d) = dump {
        d.put_ids("generated_ids", &new_ids)?;
    }
    let text = model.tokenizer.decode(&new_ids, skip_special)?;
    Ok((new_ids, text, ids.len(), timings))
}

/// One request of [`ChatPipeline::answer_batch`] or
/// [`CompletionPipeline::complete_batch`]; `O` is the pipeline's options.
pub struct BatchItem<'a, O> {
    pub prompt: &'a Prompt,
    pub opts: &'a O,
    /// Receives this answer's text as it is generated.
    pub on_text: Option<&'a mut dyn FnMut(&str)>,
    /// Stops this request at its next token, with [`PipelineError::Cancelled`].
    pub cancel: &'a dyn Fn() -> bool,
}

/// [`run_text`]'s inputs, for one request of a batch.
struct TextJob<'a> {
    prompt: &'a Prompt,
    render_opts: RenderOptions,
    generation: &'a GenerationConfig,
    skip_special: bool,
    on_text: Option<&'a mut dyn FnMut(&str)>,
    cancel: &'a dyn Fn() -> bool,
}

type TextOut = (Vec<u32>, String, usize, Timings);

/// A request of a batch whose prompt is embedded and checked.
struct Prepared<'a, L: Backend> {
    index: usize,
    prompt_tokens: usize,
    embeds: emu_core::Tensor<L>,
    timings: Timings,
    generation: &'a GenerationConfig,
    skip_special: bool,
    cancel: &'a dyn Fn() -> bool,
}

type TokenSink<'a> = Box<dyn FnMut(&[u32]) + 'a>;
type StopRule<'a> = Box<dyn FnMut(&[u32]) -> bool + 'a>;

/// [`run_text`] for several requests: each prompt is rendered and its images
/// encoded on its own, then greedy search / sampling runs for all of them in
/// lockstep ([`generate_batch`]), so every answer is the one [`run_text`]
/// gives alone. Beam-search requests run alone, one after another.
fn run_text_batch<V: Backend, L: Backend>(model: &Emu2Model<V, L>, jobs: Vec<TextJob<'_>>) -> Vec<Result<TextOut>> {
    let mut results: Vec<Option<Result<TextOut>>> = (0..jobs.len()).map(|_| None).collect();
    let collect = |results: Vec<Option<Result<TextOut>>>| -> Vec<Result<TextOut>> {
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(no_result())))
            .collect()
    };
    // Beam-search requests run alone, first (each one holds its own stages);
    // the others are tokenized and their pictures decoded.
    let mut pending = Vec::new();
    for (index, job) in jobs.into_iter().enumerate() {
        if job.generation.num_beams != 1 {
            results[index] = Some(run_text(
                model,
                job.prompt,
                &job.render_opts,
                job.generation,
                job.skip_special,
                None,
                job.on_text,
                job.cancel,
            ));
            continue;
        }
        let tokenized = render(job.prompt, &job.render_opts)
            .map_err(PipelineError::from)
            .and_then(|r| {
                let ids = model.tokenize(&r, None)?;
                check_context(model, ids.len(), job.generation)?;
                Ok((ids, model.prompt_pictures(&r)?))
            });
        match tokenized {
            Ok((ids, pics)) => pending.push((index, job, ids, pics, Timings::default())),
            Err(e) => results[index] = Some(Err(e)),
        }
    }
    // The vision stage of every request, then (sequential) the encoder is dropped.
    let mut encoded = Vec::new();
    {
        let mut enc = None;
        for (index, job, ids, pics, mut timings) in pending {
            let visuals = match (&enc, pics.is_empty()) {
                (None, false) => model.hold_vision(&mut timings).map(|held| enc = Some(held)),
                _ => Ok(()),
            }
            .and_then(|()| model.encode_visuals(enc.as_deref(), &pics, None, &mut timings));
            match visuals {
                Ok(v) => encoded.push((index, job, ids, v, timings)),
                Err(e) => results[index] = Some(Err(e)),
            }
        }
    }
    let Some(first) = encoded.first_mut() else {
        return collect(results);
    };
    let side = match model.hold_llm(&mut first.4) {
        Ok(side) => side,
        Err(e) => {
            for (index, ..) in &encoded {
                results[*index] = Some(Err(e.duplicate()));
            }
            return collect(results);
        }
    };
    let mut prepared = Vec::new();
    let mut sinks = Vec::new();
    for (index, job, ids, visuals, mut timings) in encoded {
        match model.embed_prompt(&side, &ids, &visuals, None, &mut timings) {
            Ok(embeds) => {
                prepared.push(Prepared {
                    index,
                    prompt_tokens: ids.len(),
                    embeds,
                    timings,
                    generation: job.generation,
                    skip_special: job.skip_special,
                    cancel: job.cancel,
                });
                sinks.push(job.on_text);
            }
            Err(e) => results[index] = Some(Err(e)),
        }
    }
    if prepared.is_empty() {
        return collect(results);
    }
    let t0 = Instant::now();
    let mut streams: Vec<Option<TextStream<'_, '_>>> = sinks
        .into_iter()
        .zip(&prepared)
        .map(|(sink, p)| {
            sink.map(|sink| TextStream {
                tokenizer: &model.tokenizer,
                skip_special: p.skip_special,
                eos: &p.generation.eos_token_ids,
                ids: Vec::new(),
                done: false,
                printed: 0,
                sink,
            })
        })
        .collect();
    let decode_plain = |ids: &[u32]| model.tokenizer.decode(ids, true).unwrap_or_default();
    let decode_special = |ids: &[u32]| model.tokenizer.decode(ids, false).unwrap_or_default();
    let outs = {
        let mut on_tokens: Vec<Option<TokenSink<'_>>> = streams
            .iter_mut()
            .map(|s| {
                s.as_mut().map(|s| {
                    Box::new(move |t: &[u32]| {
                        if let Some(&id) = t.first() {
                            s.push(id);
                        }
                    }) as TokenSink<'_>
                })
            })
            .collect();
        // Cancellation ends a row at its next token; its output is discarded below.
        let mut stops: Vec<StopRule<'_>> = prepared
            .iter()
            .map(|p| {
                let cancel = p.cancel;
                Box::new(move |_: &[u32]| cancel()) as StopRule<'_>
            })
            .collect();
        let rows: Vec<BatchRow<'_, L>> = prepared
            .iter()
            .zip(on_tokens.iter_mut())
            .zip(stops.iter_mut())
            .map(|((p, on_token), stop)| {
                let decode: &dyn Fn(&[u32]) -> String = if p.skip_special { &decode_plain } else { &decode_special };
                BatchRow {
                    embeds: p.embeds.clone(),
                    cfg: p.generation.clone(),
                    hooks: Hooks {
                        on_token: on_token.as_mut().map(|f| &mut **f as &mut dyn FnMut(&[u32])),
                        decode: Some(decode),
                        stop: Some(&mut **stop),
                    },
                }
            })
            .collect();
        generate_batch(&side.llm, rows)
    };
    for s in streams.iter_mut().flatten() {
        s.flush(true);
    }
    let took = t0.elapsed();
    for (p, out) in prepared.into_iter().zip(outs) {
        let r = out.map_err(PipelineError::from).and_then(|ids| {
            if (p.cancel)() {
                return Err(PipelineError::Cancelled);
            }
            let new_ids = until_eos(&ids, &p.generation.eos_token_ids);
            let text = model.tokenizer.decode(&new_ids, p.skip_special)?;
            let mut timings = p.timings;
            timings.add("generate", took);
            Ok((new_ids, text, p.prompt_tokens, timings))
        });
        results[p.index] = Some(r);
    }
    collect(results)
}

fn no_result() -> PipelineError {
    PipelineError::Input("a batched request produced no result".into())
}

/// Settings of [`ChatPipeline::answer`].
#[derive(Debug, Clone)]
pub struct ChatOptions {
    /// Grounding mode: the concise system message and `<grounding>`; the
    /// answer keeps its special tokens and its boxes are parsed.
    pub grounding: bool,
    /// Replaces the system message.
    pub system: Option<String>,
    /// Decoding; see [`upstream_generation`].
    pub generation: GenerationConfig,
}

impl Default for ChatOptions {
    fn default() -> Self {
        Self {
            grounding: false,
            system: None,
            generation: upstream_generation(),
        }
    }
}

/// What both text pipelines hold: the model, how long loading took, and
/// where to dump stage tensors.
struct TextModel<V: Backend, L: Backend> {
    model: Emu2Model<V, L>,
    load_timings: Timings,
    dump: Option<Dump>,
}

impl<V: Backend, L: Backend> TextModel<V, L> {
    /// Loads `dir`, which must hold a model of `family` (`needs` names it in the error).
    fn load(
        dir: &ModelDir,
        family: ModelFamily,
        variant: Variant,
        needs: &str,
        vision: &Component<V>,
        llm: &Component<L>,
        residency: Residency,
    ) -> Result<Self> {
        if dir.family() != family {
            return Err(PipelineError::Model(format!("{} is not {needs}", dir.root().display())));
        }
        let mut load_timings = Timings::default();
        let model = Emu2Model::load_with_residency(dir, variant, vision, llm, residency, &mut load_timings)?;
        Ok(Self {
            model,
            load_timings,
            dump: None,
        })
    }
}

/// Emu2-Chat: answers about images and videos, in one or several turns.
pub struct ChatPipeline<V: Backend, L: Backend> {
    inner: TextModel<V, L>,
}

impl<V: Backend, L: Backend> ChatPipeline<V, L> {
    /// Loads an Emu2-Chat model directory, every component resident.
    pub fn load(dir: &ModelDir, vision: &Component<V>, llm: &Component<L>) -> Result<Self> {
        Self::load_with_residency(dir, vision, llm, Residency::All)
    }

    /// [`Self::load`]; under [`Residency::Sequential`] each answer loads the
    /// vision encoder (when there are pictures), drops it, then loads the
    /// language model and drops it after answering.
    pub fn load_with_residency(
        dir: &ModelDir,
        vision: &Component<V>,
        llm: &Component<L>,
        residency: Residency,
    ) -> Result<Self> {
        let needs = "an Emu2-Chat model; the chat pipeline needs BAAI/Emu2-Chat";
        Ok(Self {
            inner: TextModel::load(dir, ModelFamily::Emu2Chat, Variant::Chat, needs, vision, llm, residency)?,
        })
    }

    pub fn model(&self) -> &Emu2Model<V, L> {
        &self.inner.model
    }

    /// How long loading took.
    pub fn load_timings(&self) -> &Timings {
        &self.inner.load_timings
    }

    /// Writes every stage's tensors of the following calls into a folder
    /// (see [`Dump`]); a later call overwrites the files of an earlier one.
    pub fn set_dump(&mut self, dump: Option<Dump>) {
        self.inner.dump = dump;
    }

    /// The model's answer to `conversation` (turns alternating user and
    /// assistant, ending with a user turn). `on_text` receives the answer as
    /// it is generated (token by token with greedy search; at the end with
    /// beam search).
    pub fn answer(
        &self,
        conversation: &Prompt,
        opts: &ChatOptions,
        on_text: Option<&mut dyn FnMut(&str)>,
    ) -> Result<ChatAnswer> {
        self.answer_cancellable(conversation, opts, on_text, &|| false)
    }

    /// [`Self::answer`] that stops at the next generated token once `cancel`
    /// returns true, with [`PipelineError::Cancelled`] (a server whose
    /// client went away).
    pub fn answer_cancellable(
        &self,
        conversation: &Prompt,
        opts: &ChatOptions,
        on_text: Option<&mut dyn FnMut(&str)>,
        cancel: &dyn Fn() -> bool,
    ) -> Result<ChatAnswer> {
        let ropts = self.render_options(opts);
        // Upstream decodes grounding answers with their special tokens kept.
        let out = run_text(
            &self.inner.model,
            conversation,
            &ropts,
            &opts.generation,
            !opts.grounding,
            self.inner.dump.as_ref(),
            on_text,
            cancel,
        )?;
        self.finish(conversation, opts, &ropts, out)
    }

    /// Answers several conversations at once: each one's images are encoded
    /// on their own, then greedy and sampled answers decode together, one
    /// forward of every unfinished answer per token (beam-search requests
    /// run alone). Each answer is the one [`Self::answer_cancellable`]
    /// gives for it alone; each streams to its own `on_text` and stops on
    /// its own `cancel`. Nothing is dumped.
    pub fn answer_batch(&self, items: Vec<BatchItem<'_, ChatOptions>>) -> Vec<Result<ChatAnswer>> {
        let ropts: Vec<RenderOptions> = items.iter().map(|i| self.render_options(i.opts)).collect();
        let keep: Vec<(&Prompt, &ChatOptions)> = items.iter().map(|i| (i.prompt, i.opts)).collect();
        let jobs = items
            .into_iter()
            .zip(&ropts)
            .map(|(i, r)| TextJob {
                prompt: i.prompt,
                render_opts: r.clone(),
                generation: &i.opts.generation,
                skip_special: !i.opts.grounding,
                on_text: i.on_text,
                cancel: i.cancel,
            })
            .collect();
        run_text_batch(&self.inner.model, jobs)
            .into_iter()
            .zip(keep.into_iter().zip(&ropts))
            .map(|(out, ((prompt, opts), r))| out.and_then(|o| self.finish(prompt, opts, r, o)))
            .collect()
    }

    fn render_options(&self, opts: &ChatOptions) -> RenderOptions {
        let mut ropts = RenderOptions::new(ModelKind::Emu2Chat).grounding(opts.grounding);
        ropts.n_query = self.inner.model.n_query();
        ropts.v_query = self.inner.model.v_query();
        ropts.system = opts.system.clone();
        ropts
    }

    /// The answer, with its boxes read in grounding mode.
    fn finish(
        &self,
        conversation: &Prompt,
        opts: &ChatOptions,
        ropts: &RenderOptions,
        out: TextOut,
    ) -> Result<ChatAnswer> {
        let (ids, text, prompt_tokens, timings) = out;
        let grounding = if opts.grounding {
            let first = emu_prompt::render(conversation, ropts)?.images.into_iter().next();
            let (w, h) = match first {
                Some(v) => {
                    let img = self.inner.model.load_pictures(std::slice::from_ref(&v))?;
                    (img[0].width(), img[0].height())
                }
                None => (224, 224),
            };
            Some(parse_boxes(&text, w, h))
        } else {
            None
        };
        Ok(ChatAnswer {
            text,
            ids,
            prompt_tokens,
            grounding,
            timings,
        })
    }
}

/// Settings of [`CompletionPipeline::complete`].
#[derive(Debug, Clone)]
pub struct CompletionOptions {
    /// Decoding; see [`upstream_generation`].
    pub generation: GenerationConfig,
}

impl Default for CompletionOptions {
    fn default() -> Self {
        Self {
            generation: upstream_generation(),
        }
    }
}

/// Emu2 (base): continues an interleaved image/text prompt (few-shot,
/// in-context; SPEC §3.6).
pub struct CompletionPipeline<V: Backend, L: Backend> {
    inner: TextModel<V, L>,
}

impl<V: Backend, L: Backend> CompletionPipeline<V, L> {
    /// Loads an Emu2 (base) model directory, every component resident.
    pub fn load(dir: &ModelDir, vision: &Component<V>, llm: &Component<L>) -> Result<Self> {
        Self::load_with_residency(dir, vision, llm, Residency::All)
    }

    /// [`Self::load`] with a [`Residency`] (see [`ChatPipeline::load_with_residency`]).
    pub fn load_with_residency(
        dir: &ModelDir,
        vision: &Component<V>,
        llm: &Component<L>,
        residency: Residency,
    ) -> Result<Self> {
        let needs = "an Emu2 base model; the completion pipeline needs BAAI/Emu2";
        Ok(Self {
            inner: TextModel::load(dir, ModelFamily::Emu2, Variant::Base, needs, vision, llm, residency)?,
        })
    }

    pub fn model(&self) -> &Emu2Model<V, L> {
        &self.inner.model
    }

    pub fn load_timings(&self) -> &Timings {
        &self.inner.load_timings
    }

    /// Writes every stage's tensors of the following calls into a folder (see [`Dump`]).
    pub fn set_dump(&mut self, dump: Option<Dump>) {
        self.inner.dump = dump;
    }

    /// The model's continuation of `prompt` (one user turn of text, images
    /// and videos, no template).
    pub fn complete(
        &self,
        prompt: &Prompt,
        opts: &CompletionOptions,
        on_text: Option<&mut dyn FnMut(&str)>,
    ) -> Result<ChatAnswer> {
        self.complete_cancellable(prompt, opts, on_text, &|| false)
    }

    /// [`Self::complete`] that stops at the next generated token once
    /// `cancel` returns true, with [`PipelineError::Cancelled`].
    pub fn complete_cancellable(
        &self,
        prompt: &Prompt,
        opts: &CompletionOptions,
        on_text: Option<&mut dyn FnMut(&str)>,
        cancel: &dyn Fn() -> bool,
    ) -> Result<ChatAnswer> {
        let ropts = self.render_options();
        let out = run_text(
            &self.inner.model,
            prompt,
            &ropts,
            &opts.generation,
            true,
            self.inner.dump.as_ref(),
            on_text,
            cancel,
        )?;
        Ok(answer(out))
    }

    /// Continues several prompts at once, as [`ChatPipeline::answer_batch`]
    /// answers several conversations: each result is the one
    /// [`Self::complete_cancellable`] gives for it alone.
    pub fn complete_batch(&self, items: Vec<BatchItem<'_, CompletionOptions>>) -> Vec<Result<ChatAnswer>> {
        let ropts = self.render_options();
        let jobs = items
            .into_iter()
            .map(|i| TextJob {
                prompt: i.prompt,
                render_opts: ropts.clone(),
                generation: &i.opts.generation,
                skip_special: true,
                on_text: i.on_text,
                cancel: i.cancel,
            })
            .collect();
        run_text_batch(&self.inner.model, jobs)
            .into_iter()
            .map(|r| r.map(answer))
            .collect()
    }

    fn render_options(&self) -> RenderOptions {
        let mut ropts = RenderOptions::new(ModelKind::Emu2);
        ropts.n_query = self.inner.model.n_query();
        ropts.v_query = self.inner.model.v_query();
        ropts
    }
}

fn answer((ids, text, prompt_tokens, timings): TextOut) -> ChatAnswer {
    ChatAnswer {
        text,
        ids,
        prompt_tokens,
        grounding: None,
        timings,
    }
}
