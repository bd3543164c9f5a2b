//! Text generation from input embeddings with transformers' `generate`
//! semantics (5.x): greedy search, multinomial sampling (temperature, top-k,
//! top-p) and beam search (length penalty, early stopping), with the logits
//! processors repetition penalty and minimum length, in transformers' order.
//!
//! The model runs on its backend; only the last position's logits are
//! downloaded each step, and every decision is made on the host in f32, the
//! way transformers computes it, so that greedy and beam outputs are token for
//! token those of `model.generate(inputs_embeds=...)`.
//!
//! As in transformers with `inputs_embeds` and no `input_ids`, the prompt
//! has no token ids: the output holds only new tokens, and the repetition
//! penalty and minimum length see only generated tokens.
//!
//! Two deliberate differences from transformers 5.24: with a left-padded
//! batch, transformers also exempts the first `padding[b]` *generated* tokens
//! from the repetition penalty (it meant to skip the padded prompt, which
//! `inputs_embeds` generation does not have); here every generated token is
//! penalised. And beam sampling (`num_beams > 1` with `do_sample`) is
//! refused rather than implemented.
//!
//! Stop strings (transformers' `stop_strings` with `StopStringCriteria`)
//! need text, and this crate has no tokenizer: [`generate_with`] takes the
//! caller's decoder in [`Hooks::decode`], as transformers' `generate` takes
//! `tokenizer=`. A sequence stops at the token that completes a stop string,
//! which is kept in the output. [`Hooks::stop`] adds any other per-sequence
//! stopping rule.
//!
//! Upstream Emu2 pins transformers 4.31, whose `generate` differs from 5.x
//! where [`TransformersVersion`] says; [`GenerationConfig::transformers`]
//! picks which one to follow (5.x by default).

use crate::error::{Error, Result};
use crate::model::{KvCache, Llama, Logits};
use emu_core::{Backend, Tensor};

/// transformers' `early_stopping` for beam search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    /// `False`: stop when the best running beam, scored at its current
    /// length, cannot beat the worst finished one (transformers' heuristic).
    #[default]
    Heuristic,
    /// `True`: stop as soon as `num_beams` hypotheses are finished.
    Yes,
    /// `"never"`: the canonical criterion (with a positive length penalty,
    /// the best running beam is scored at the maximum length).
    Never,
}

/// Which transformers `generate` to follow where its versions differ. Both
/// are checked token for token against the real one (5.24 and 4.31.0).
///
/// With `inputs_embeds` and no `input_ids`, transformers 4.31 seeds the ids
/// with one BOS token per sequence (5.x starts them empty), and its beam
/// search is the older `BeamSearchScorer`. Against 5.x that means:
///
/// * hypotheses that reach the maximum length are scored with the BOS
///   counted (`len = generated + 1`); ones ending in EOS with the BOS but
///   not the EOS, i.e. the same `generated` count as 5.x;
/// * the running beams are the best `num_beams` non-EOS continuations out of
///   the top `2 * num_beams` (5.x: of the top `2 * num_beams`, but at the
///   last step only the top `num_beams` may become hypotheses);
/// * the `early_stopping = False` heuristic compares the worst finished
///   score with the best of *all* `2 * num_beams` candidates (EOS ones
///   included) over `(generated + 1)^length_penalty` (5.x: the best running
///   beam over `generated^length_penalty`); with a positive length penalty,
///   `"never"` uses `max_new_tokens + 1` (5.x: `max_new_tokens`);
/// * scores of finished hypotheses are kept in f64 (Python floats);
/// * the repetition penalty also sees the BOS id (when
///   [`GenerationConfig::bos_token_id`] is set), in greedy search and
///   sampling too.
///
/// 4.31 has no per-sequence stop rules (stop strings, [`Hooks::stop`]); under
/// `V4_31` a beam candidate that meets one finishes like an EOS candidate
/// (only among the top `num_beams`), keeps its token and is scored with the
/// BOS counted. Where such rules end so many candidates that fewer than
/// `num_beams` of the top `2 * num_beams` keep running (4.31 raises an error
/// there for EOS), the next best candidates are taken.
///
/// Upstream Emu2's native code pins transformers 4.31.0 (its
/// `requirements.txt`, SPEC §8), so `V4_31` is what it decodes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransformersVersion {
    /// transformers 5.x (checked against 5.24.0).
    #[default]
    V5,
    /// transformers 4.31.0, the version upstream Emu2 pins.
    V4_31,
}

/// Most beams [`GenerationConfig::num_beams`] may ask for: each beam holds a
/// KV cache as large as the whole context, so thousands would exhaust memory
/// long before they helped (upstream Emu2 uses 5).
pub const MAX_BEAMS: usize = 64;

/// Decoding settings; the defaults are transformers' `GenerationConfig`
/// defaults (notably `top_k = 50` when sampling).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// End-of-sequence is suppressed until this many tokens were generated.
    pub min_new_tokens: usize,
    /// Generation of a sequence ends after any of these ids.
    pub eos_token_ids: Vec<u32>,
    /// Fills finished sequences (transformers falls back to the first EOS id).
    pub pad_token_id: Option<u32>,
    pub do_sample: bool,
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens when sampling (0: off).
    pub top_k: usize,
    /// Nucleus sampling threshold when sampling (1.0: off).
    pub top_p: f32,
    /// Seed of the sampling generator (a fixed seed gives a fixed output).
    /// The generator is this crate's own, so samples are not PyTorch's.
    pub seed: u64,
    pub num_beams: usize,
    /// Finished beam scores are `sum_logprob / len^length_penalty`.
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    /// Penalty on tokens already generated (1.0: off).
    pub repetition_penalty: f32,
    /// A sequence ends once its decoded text ends with any of these strings
    /// (the token completing one may run past it). Needs [`Hooks::decode`].
    pub stop_strings: Vec<String>,
    /// Which transformers `generate` to follow (see [`TransformersVersion`]).
    pub transformers: TransformersVersion,
    /// The BOS id that transformers 4.31 seeds `input_ids` with; only
    /// [`TransformersVersion::V4_31`] reads it (its repetition penalty sees it).
    pub bos_token_id: Option<u32>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 20,
            min_new_tokens: 0,
            eos_token_ids: Vec::new(),
            pad_token_id: None,
            do_sample: false,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            seed: 0,
            num_beams: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
            repetition_penalty: 1.0,
            stop_strings: Vec::new(),
            transformers: TransformersVersion::V5,
            bos_token_id: None,
        }
    }
}

impl GenerationConfig {
    /// The ids transformers holds before the first generated token.
    fn seed_ids(&self) -> &[u32] {
        match (self.transformers, &self.bos_token_id) {
            (TransformersVersion::V4_31, Some(b)) => std::slice::from_ref(b),
            _ => &[],
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Generation(m));
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens must be at least 1".into());
        }
        if self.num_beams == 0 {
            return bad("num_beams must be at least 1".into());
        }
        if self.num_beams > MAX_BEAMS {
            return bad(format!(
                "num_beams {} is more than the {MAX_BEAMS} supported (each beam holds its own KV cache; upstream uses 5)",
                self.num_beams
            ));
        }
        if self.num_beams > 1 && self.do_sample {
            return bad("beam sampling (num_beams > 1 with do_sample) is not supported".into());
        }
        if self.do_sample && !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature must be positive, found {}", self.temperature));
        }
        if self.do_sample && !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], found {}", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!(
                "repetition_penalty must be positive, found {}",
                self.repetition_penalty
            ));
        }
        if !self.length_penalty.is_finite() {
            return bad(format!("length_penalty must be finite, found {}", self.length_penalty));
        }
        if self.stop_strings.iter().any(String::is_empty) {
            return bad("stop strings must not be empty".into());
        }
        Ok(())
    }
}

/// A per-step callback for streaming: called with one new token per
/// sequence (finished sequences get the pad id), as transformers' streamers.
pub type OnToken<'a> = &'a mut dyn FnMut(&[u32]);

/// Decodes generated ids into text (for stop strings).
pub type Decode<'a> = &'a dyn Fn(&[u32]) -> String;

/// An extra stopping rule: called with one sequence's generated ids (the
/// newest last; for beam search, each candidate continuation) after every
/// step; `true` ends that sequence, keeping the newest token.
pub type StopCheck<'a> = &'a mut dyn FnMut(&[u32]) -> bool;

/// Caller-side hooks of [`generate_with`].
#[derive(Default)]
pub struct Hooks<'a> {
    /// Streaming (greedy search and sampling only).
    pub on_token: Option<OnToken<'a>>,
    /// Turns ids into text; required when `stop_strings` is set.
    pub decode: Option<Decode<'a>>,
    /// Any other stopping rule, checked with EOS and the stop strings.
    pub stop: Option<StopCheck<'a>>,
}

/// transformers' `StopStringCriteria` on decoded text: matches when a stop
/// string occurs in the text of `tokens` and that occurrence reaches into the
/// text of the newest token (it may begin in earlier tokens and the newest
/// token may run past its end), so a sequence stops at the first token that
/// completes a stop string.
pub struct StopStrings<'a> {
    strings: &'a [String],
    decode: Decode<'a>,
}

impl<'a> StopStrings<'a> {
    pub fn new(strings: &'a [String], decode: Decode<'a>) -> Self {
        Self { strings, decode }
    }

    /// Whether the newest token of `tokens` completes a stop string.
    pub fn matches(&self, tokens: &[u32]) -> bool {
        let Some((_, before)) = tokens.split_last() else {
            return false;
        };
        if self.strings.is_empty() {
            return false;
        }
        let text = (self.decode)(tokens);
        let prev = (self.decode)(before);
        // Decoding a prefix can differ at its end (an incomplete multi-byte
        // character decodes as U+FFFD), so the newest token's text starts
        // where the two texts stop agreeing.
        let mut boundary = text.bytes().zip(prev.bytes()).take_while(|(a, b)| a == b).count();
        while !text.is_char_boundary(boundary) {
            boundary -= 1;
        }
        self.strings.iter().any(|s| {
            let mut from = boundary.saturating_sub(s.len().saturating_sub(1));
            while !text.is_char_boundary(from) {
                from -= 1;
            }
            text[from..]
                .match_indices(s.as_str())
                .any(|(i, m)| from + i + m.len() > boundary)
        })
    }
}

/// Generates continuations of `embeds` (`[B, T, H]`; sequence `b` is
/// left-padded by `padding[b]` positions, or `padding` is empty for none).
///
/// Returns, per sequence, the generated ids padded to a common length the
/// way transformers returns them (after EOS: the pad id for greedy/sampling,
/// `pad_token_id or eos_token_id[0]` for beam search).
///
/// `cfg.stop_strings` needs a decoder: use [`generate_with`].
pub fn generate<B: Backend>(
    model: &Llama<B>,
    embeds: &Tensor<B>,
    padding: &[usize],
    cfg: &GenerationConfig,
    on_token: Option<OnToken<'_>>,
) -> Result<Vec<Vec<u32>>> {
    generate_with(
        model,
        embeds,
        padding,
        cfg,
        Hooks {
            on_token,
            ..Hooks::default()
        },
    )
}

/// [`generate`] with a decoder for stop strings and an optional extra
/// stopping rule (see [`Hooks`]).
pub fn generate_with<B: Backend>(
    model: &Llama<B>,
    embeds: &Tensor<B>,
    padding: &[usize],
    cfg: &GenerationConfig,
    hooks: Hooks<'_>,
) -> Result<Vec<Vec<u32>>> {
    cfg.validate()?;
    let Hooks {
        on_token,
        decode,
        mut stop,
    } = hooks;
    let strings = match (cfg.stop_strings.is_empty(), decode) {
        (true, _) => None,
        (false, Some(d)) => Some(StopStrings::new(&cfg.stop_strings, d)),
        (false, None) => {
            return Err(Error::Generation(
                "stop strings need a decoder from ids to text (Hooks::decode)".into(),
            ))
        }
    };
    let mut stop_rule = |tokens: &[u32]| {
        strings.as_ref().is_some_and(|s| s.matches(tokens)) || stop.as_mut().is_some_and(|f| f(tokens))
    };
    let dims = embeds.dims();
    let (b, t) = match dims.as_slice() {
        [b, t, _] if *b > 0 && *t > 0 => (*b, *t),
        _ => {
            return Err(Error::Input(format!(
                "generate: embeddings must be [B, T, H], found {dims:?}"
            )))
        }
    };
    let padding = if padding.is_empty() {
        vec![0; b]
    } else if padding.len() == b {
        padding.to_vec()
    } else {
        return Err(Error::Input(format!(
            "generate: {} padding lengths for a batch of {b}",
            padding.len()
        )));
    };
    // max_new_tokens comes from users: checked, so a huge value is a context
    // overflow rather than an arithmetic overflow.
    let capacity = t.saturating_add(cfg.max_new_tokens);
    let max_ctx = model.config().max_position_embeddings;
    if capacity > max_ctx {
        return Err(Error::ContextOverflow {
            needed: capacity,
            capacity: max_ctx,
        });
    }
    let mut cache = model.new_cache_padded(&padding, capacity)?;
    let out = model.forward_embeds(embeds, &mut cache, Logits::Last)?;
    let logits = last_logits(&out.logits, b, model.config().vocab_size)?;
    if cfg.num_beams > 1 {
        if on_token.is_some() {
            return Err(Error::Generation("streaming is not available with beam search".into()));
        }
        match cfg.transformers {
            TransformersVersion::V5 => beam_search(model, cache, logits, b, cfg, &mut stop_rule),
            TransformersVersion::V4_31 => beam_search_v4_31(model, cache, logits, b, cfg, &mut stop_rule),
        }
    } else {
        sample(model, cache, logits, b, cfg, on_token, &mut stop_rule)
    }
}

/// One sequence of [`generate_batch`]: its prompt, its own settings and its
/// own hooks (streaming, decoder for stop strings, extra stop rule).
pub struct BatchRow<'a, B: Backend> {
    /// The prompt's embeddings, `[1, T, H]`.
    pub embeds: Tensor<B>,
    /// Greedy search or sampling (`num_beams` must be 1).
    pub cfg: GenerationConfig,
    pub hooks: Hooks<'a>,
}

/// A row of [`generate_batch`] while it generates.
struct Live<'a, B: Backend> {
    index: usize,
    cfg: GenerationConfig,
    hooks: Hooks<'a>,
    rng: Rng,
    cache: KvCache<B>,
    logits: Vec<f32>,
    seq: Vec<u32>,
}

/// Greedy search or sampling for several independent prompts at once: each
/// prompt is prefilled on its own (exactly as [`generate_with`] prefills it),
/// then the decode steps run in lockstep, one forward of every unfinished
/// row per step ([`Llama::forward_rows`]). Each row keeps its own settings
/// (temperature, top-p, seed, `max_new_tokens`, stop strings), streams
/// through its own [`Hooks::on_token`] (called with its one new token) and
/// leaves the batch when it finishes.
///
/// Returns, per row, what [`generate_with`] returns for that prompt alone
/// (its one sequence): the same ids wherever the backend's `linear` treats
/// rows independently, which the CPU backend does for up to 16 rows in f32
/// and 32 in bf16/f16. A row whose settings or prompt are refused gets its
/// own error and the others go on; an error of a shared step fails every
/// row still running.
pub fn generate_batch<B: Backend>(model: &Llama<B>, rows: Vec<BatchRow<'_, B>>) -> Vec<Result<Vec<u32>>> {
    let v = model.config().vocab_size;
    let mut out: Vec<Option<Result<Vec<u32>>>> = (0..rows.len()).map(|_| None).collect();
    let mut live: Vec<Live<'_, B>> = Vec::with_capacity(rows.len());
    for (index, row) in rows.into_iter().enumerate() {
        match prefill_row(model, row) {
            Ok((cache, logits, cfg, hooks)) => live.push(Live {
                index,
                rng: Rng::new(cfg.seed),
                cfg,
                hooks,
                cache,
                logits,
                seq: Vec::new(),
            }),
            Err(e) => out[index] = Some(Err(e)),
        }
    }
    while !live.is_empty() {
        // transformers' `_sample` step for one sequence, per row.
        let mut keep = Vec::with_capacity(live.len());
        for mut row in live {
            let cfg = &row.cfg;
            let scores = &mut row.logits[..];
            process(scores, &row.seq, cfg);
            let tok = if cfg.do_sample {
                warp(scores, cfg);
                row.rng.categorical(&softmax(scores))
            } else {
                argmax(scores)
            } as u32;
            row.seq.push(tok);
            let done = row.seq.len() >= cfg.max_new_tokens
                || cfg.eos_token_ids.contains(&tok)
                || row_stops(&mut row.hooks, cfg, &row.seq);
            if let Some(f) = row.hooks.on_token.as_mut() {
                f(&[tok]);
            }
            if done {
                out[row.index] = Some(Ok(std::mem::take(&mut row.seq)));
            } else {
                keep.push(row);
            }
        }
        live = keep;
        if live.is_empty() {
            break;
        }
        let tokens: Vec<u32> = live.iter().map(|r| r.seq[r.seq.len() - 1]).collect();
        let step = model.embed(&tokens, tokens.len()).and_then(|e| {
            let mut caches: Vec<&mut KvCache<B>> = live.iter_mut().map(|r| &mut r.cache).collect();
            let o = model.forward_rows(&e, &mut caches, Logits::Last)?;
            last_logits(&o.logits, tokens.len(), v)
        });
        match step {
            Ok(logits) => {
                for (row, l) in live.iter_mut().zip(logits.chunks_exact(v)) {
                    row.logits.clear();
                    row.logits.extend_from_slice(l);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for row in live.drain(..) {
                    out[row.index] = Some(Err(Error::Generation(format!("a batched decode step failed: {msg}"))));
                }
            }
        }
    }
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::Generation("a batch row produced no result".into()))))
        .collect()
}

/// Checks one row of [`generate_batch`] as [`generate_with`] checks a
/// single prompt, and runs its prefill.
#[allow(clippy::type_complexity)]
fn prefill_row<'a, B: Backend>(
    model: &Llama<B>,
    row: BatchRow<'a, B>,
) -> Result<(KvCache<B>, Vec<f32>, GenerationConfig, Hooks<'a>)> {
    let BatchRow { embeds, cfg, hooks } = row;
    cfg.validate()?;
    if cfg.num_beams != 1 {
        return Err(Error::Generation(
            "beam search runs alone (generate_with), not in a batch".into(),
        ));
    }
    if !cfg.stop_strings.is_empty() && hooks.decode.is_none() {
        return Err(Error::Generation(
            "stop strings need a decoder from ids to text (Hooks::decode)".into(),
        ));
    }
    let t = match embeds.dims().as_slice() {
        [1, t, _] if *t > 0 => *t,
        d => {
            return Err(Error::Input(format!(
                "generate_batch: each row's embeddings must be [1, T, H], found {d:?}"
            )))
        }
    };
    let capacity = t.saturating_add(cfg.max_new_tokens);
    let max_ctx = model.config().max_position_embeddings;
    if capacity > max_ctx {
        return Err(Error::ContextOverflow {
            needed: capacity,
            capacity: max_ctx,
        });
    }
    let mut cache = model.new_cache(1, capacity)?;
    let out = model.forward_embeds(&embeds, &mut cache, Logits::Last)?;
    let logits = last_logits(&out.logits, 1, model.config().vocab_size)?;
    Ok((cache, logits, cfg, hooks))
}

/// A row's stop strings and extra stop rule, in [`generate_with`]'s order.
fn row_stops(hooks: &mut Hooks<'_>, cfg: &GenerationConfig, seq: &[u32]) -> bool {
    let strings = match hooks.decode {
        Some(d) if !cfg.stop_strings.is_empty() => StopStrings::new(&cfg.stop_strings, d).matches(seq),
        _ => false,
    };
    strings || hooks.stop.as_mut().is_some_and(|f| f(seq))
}

fn last_logits<B: Backend>(l: &Option<Tensor<B>>, b: usize, v: usize) -> Result<Vec<f32>> {
    let l = l
        .as_ref()
        .ok_or_else(|| Error::Input("the model returned no logits".into()))?;
    let x = l.to_f32_vec()?;
    if x.len() != b * v {
        return Err(Error::Input(format!("expected {b} x {v} logits, found {}", x.len())));
    }
    Ok(x)
}

fn step<B: Backend>(model: &Llama<B>, cache: &mut KvCache<B>, tokens: &[u32]) -> Result<Vec<f32>> {
    let b = tokens.len();
    let e = model.embed(tokens, b)?;
    let out = model.forward_embeds(&e, cache, Logits::Last)?;
    last_logits(&out.logits, b, model.config().vocab_size)
}

/// `RepetitionPenaltyLogitsProcessor`, then `MinLength` /
/// `MinNewTokensLength` (the same condition here: the prompt has no ids).
fn process(scores: &mut [f32], generated: &[u32], cfg: &GenerationConfig) {
    if cfg.repetition_penalty != 1.0 {
        let p = cfg.repetition_penalty;
        let mut seen = vec![false; scores.len()];
        for &tok in cfg.seed_ids().iter().chain(generated) {
            let i = tok as usize;
            if i < scores.len() && !seen[i] {
                seen[i] = true;
                let s = scores[i];
                scores[i] = if s < 0.0 { s * p } else { s / p };
            }
        }
    }
    if generated.len() < cfg.min_new_tokens {
        for &e in &cfg.eos_token_ids {
            if let Some(s) = scores.get_mut(e as usize) {
                *s = f32::NEG_INFINITY;
            }
        }
    }
}

/// The sampling warpers in transformers' order: temperature, top-k, top-p.
fn warp(scores: &mut [f32], cfg: &GenerationConfig) {
    if cfg.temperature != 1.0 {
        for s in scores.iter_mut() {
            *s /= cfg.temperature;
        }
    }
    if cfg.top_k != 0 {
        let k = cfg.top_k.min(scores.len());
        let mut sorted = scores.to_vec();
        sorted.sort_unstable_by(|a, b| b.total_cmp(a));
        let kth = sorted[k - 1];
        for s in scores.iter_mut() {
            if *s < kth {
                *s = f32::NEG_INFINITY;
            }
        }
    }
    if cfg.top_p < 1.0 {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
        let sorted: Vec<f32> = order.iter().map(|&i| scores[i]).collect();
        let probs = softmax(&sorted);
        let mut cum = 0f32;
        let last = order.len() - 1;
        let mut remove = Vec::new();
        for (r, &p) in probs.iter().enumerate() {
            cum += p;
            // The most likely token is always kept (min_tokens_to_keep = 1).
            if cum <= 1.0 - cfg.top_p && r != last {
                remove.push(order[r]);
            }
        }
        for i in remove {
            scores[i] = f32::NEG_INFINITY;
        }
    }
}

fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

fn log_softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f32 = x.iter().map(|v| (v - m).exp()).sum();
    let ls = s.ln();
    x.iter().map(|v| v - m - ls).collect()
}

fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best
}

/// xoshiro256** seeded through splitmix64: a small, fixed generator so that
/// a seed means the same samples on every platform and version.
struct Rng([u64; 4]);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Self([next(), next(), next(), next()])
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let r = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        r
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// An index drawn with probability proportional to `w`.
    fn categorical(&mut self, w: &[f32]) -> usize {
        let total: f64 = w.iter().map(|&x| x as f64).sum();
        let u = self.uniform() * total;
        let mut acc = 0f64;
        let mut last = 0;
        for (i, &x) in w.iter().enumerate() {
            if x > 0.0 {
                acc += x as f64;
                last = i;
                if u < acc {
                    return i;
                }
            }
        }
        last
    }
}

/// transformers' `_sample`: greedy search or multinomial sampling.
fn sample<B: Backend>(
    model: &Llama<B>,
    mut cache: KvCache<B>,
    mut logits: Vec<f32>,
    b: usize,
    cfg: &GenerationConfig,
    mut on_token: Option<OnToken<'_>>,
    stop_rule: &mut dyn FnMut(&[u32]) -> bool,
) -> Result<Vec<Vec<u32>>> {
    let v = model.config().vocab_size;
    let pad = cfg.pad_token_id.or(cfg.eos_token_ids.first().copied());
    let mut rng = Rng::new(cfg.seed);
    let mut seqs: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut unfinished = vec![true; b];
    loop {
        let mut next = Vec::with_capacity(b);
        for (row, seq) in seqs.iter().enumerate() {
            let scores = &mut logits[row * v..(row + 1) * v];
            process(scores, seq, cfg);
            let tok = if cfg.do_sample {
                warp(scores, cfg);
                rng.categorical(&softmax(scores))
            } else {
                argmax(scores)
            } as u32;
            next.push(match (unfinished[row], pad) {
                (false, Some(p)) if !cfg.eos_token_ids.is_empty() => p,
                _ => tok,
            });
        }
        for (row, &tok) in next.iter().enumerate() {
            seqs[row].push(tok);
            if unfinished[row] {
                let done =
                    seqs[row].len() >= cfg.max_new_tokens || cfg.eos_token_ids.contains(&tok) || stop_rule(&seqs[row]);
                unfinished[row] = !done;
            }
        }
        if let Some(f) = on_token.as_mut() {
            f(&next);
        }
        if unfinished.iter().all(|u| !u) {
            return Ok(seqs);
        }
        logits = step(model, &mut cache, &next)?;
    }
}

/// One hypothesis: its generated tokens and score.
#[derive(Clone)]
struct Hyp {
    tokens: Vec<u32>,
    score: f32,
}

/// Per-prompt beam state (transformers' `running_*` / finished tensors,
/// one row of the batch).
struct Beams {
    running: Vec<Hyp>,
    finished: Vec<Hyp>,
    is_finished: Vec<bool>,
    improvable: bool,
}

/// Indices of the `k` largest values, largest first; ties keep the lower index.
fn top_k_indices(x: &[f32], k: usize) -> Vec<usize> {
    let order = |a: &usize, b: &usize| x[*b].total_cmp(&x[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..x.len()).collect();
    // Partition first: beam search ranks num_beams x vocab candidates per step.
    if k < idx.len() {
        idx.select_nth_unstable_by(k, order);
        idx.truncate(k);
    }
    idx.sort_by(order);
    idx
}

/// Every beam starts from its prompt: the cache rows of each of the `b`
/// prompts repeated `k` times, and their prefill logits likewise.
fn expand_to_beams<B: Backend>(
    cache: &mut KvCache<B>,
    prefill_logits: &[f32],
    b: usize,
    k: usize,
    v: usize,
) -> Result<Vec<f32>> {
    let rows: Vec<u32> = (0..b * k).map(|r| (r / k) as u32).collect();
    cache.select(&rows)?;
    Ok(rows
        .iter()
        .flat_map(|&r| prefill_logits[r as usize * v..(r as usize + 1) * v].iter().copied())
        .collect())
}

/// The score of every continuation of prompt `bi`'s running beams
/// (`beams.len() x v`, beam-major): processed log-probs plus the beam score.
fn candidate_scores(logits: &[f32], bi: usize, v: usize, beams: &[Hyp], cfg: &GenerationConfig) -> Vec<f32> {
    let k = beams.len();
    let mut acc = Vec::with_capacity(k * v);
    for (j, hyp) in beams.iter().enumerate() {
        let row = bi * k + j;
        let mut lps = log_softmax(&logits[row * v..(row + 1) * v]);
        process(&mut lps, &hyp.tokens, cfg);
        acc.extend(lps.into_iter().map(|x| x + hyp.score));
    }
    acc
}

/// Rows padded with `fill` to the longest one.
fn pad_to_widest(mut rows: Vec<Vec<u32>>, fill: u32) -> Vec<Vec<u32>> {
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    for r in &mut rows {
        r.resize(width, fill);
    }
    rows
}

/// transformers' `_beam_search` (5.x, vectorised form), one prompt at a time
/// on the host, with every score computed in f32 as there.
fn beam_search<B: Backend>(
    model: &Llama<B>,
    mut cache: KvCache<B>,
    prefill_logits: Vec<f32>,
    b: usize,
    cfg: &GenerationConfig,
    stop_rule: &mut dyn FnMut(&[u32]) -> bool,
) -> Result<Vec<Vec<u32>>> {
    let v = model.config().vocab_size;
    let k = cfg.num_beams;
    let keep = 2usize.max(1 + cfg.eos_token_ids.len()) * k;
    if keep > k * v {
        return Err(Error::Generation(format!(
            "{k} beams need at least {keep} candidates, the vocabulary has {v}"
        )));
    }
    let max_len = cfg.max_new_tokens;
    let lp = cfg.length_penalty as f64;
    let penalty = |n: usize| (n as f64).powf(lp) as f32;
    const NEG: f32 = -1.0e9;

    let mut logits = expand_to_beams(&mut cache, &prefill_logits, b, k, v)?;

    let mut state: Vec<Beams> = (0..b)
        .map(|_| Beams {
            running: (0..k)
                .map(|i| Hyp {
                    tokens: Vec::new(),
                    score: if i == 0 { 0.0 } else { NEG },
                })
                .collect(),
            finished: vec![
                Hyp {
                    tokens: Vec::new(),
                    score: NEG,
                };
                k
            ],
            is_finished: vec![false; k],
            improvable: true,
        })
        .collect();
    let mut cur_len = 0usize;
    loop {
        let mut all_stop = true;
        let mut source_rows = Vec::with_capacity(b * k);
        let mut next_tokens = Vec::with_capacity(b * k);
        for (bi, st) in state.iter_mut().enumerate() {
            // b. log-probs of every continuation, processed, plus the beam score.
            let acc = candidate_scores(&logits, bi, v, &st.running, cfg);
            // c. the top `keep` continuations over all beams.
            let top = top_k_indices(&acc, keep);
            let cands: Vec<(usize, u32, f32)> = top.iter().map(|&i| (i / v, (i % v) as u32, acc[i])).collect();
            let with_tok = |&(src, tok, _): &(usize, u32, f32)| {
                let mut t = st.running[src].tokens.clone();
                t.push(tok);
                t
            };
            // d. which of them hit a stopping criterion (max length, EOS, stop rules).
            let stops: Vec<bool> = cands
                .iter()
                .map(|c| cur_len + 1 >= max_len || cfg.eos_token_ids.contains(&c.1) || stop_rule(&with_tok(c)))
                .collect();
            all_stop &= stops.iter().all(|&s| s);
            // e. the best `k` continuations that did not stop keep running.
            let run_scores: Vec<f32> = cands
                .iter()
                .zip(&stops)
                .map(|(c, &s)| c.2 + if s { NEG } else { 0.0 })
                .collect();
            let sel = top_k_indices(&run_scores, k);
            let new_running: Vec<Hyp> = sel
                .iter()
                .map(|&i| Hyp {
                    tokens: with_tok(&cands[i]),
                    score: run_scores[i],
                })
                .collect();
            // f. finished hypotheses among the top `k` candidates join the
            // finished set if they score better.
            let full = cfg.early_stopping == EarlyStopping::Yes && st.is_finished.iter().all(|&f| f);
            let pen = penalty(cur_len + 1);
            let mut merged_scores = st.finished.iter().map(|h| h.score).collect::<Vec<_>>();
            let mut merged_flags = st.is_finished.clone();
            for (i, c) in cands.iter().enumerate() {
                let just_finished = stops[i] && i < k;
                let mut s = c.2 / pen;
                s += if full { NEG } else { 0.0 };
                s += if st.improvable { 0.0 } else { NEG };
                s += if just_finished { 0.0 } else { NEG };
                merged_scores.push(s);
                merged_flags.push(just_finished);
            }
            let pick = top_k_indices(&merged_scores, k);
            let mut finished = Vec::with_capacity(k);
            let mut flags = Vec::with_capacity(k);
            for &i in &pick {
                let tokens = if i < k {
                    st.finished[i].tokens.clone()
                } else {
                    with_tok(&cands[i - k])
                };
                finished.push(Hyp {
                    tokens,
                    score: merged_scores[i],
                });
                flags.push(merged_flags[i]);
            }
            for &i in &sel {
                source_rows.push((bi * k + cands[i].0) as u32);
                next_tokens.push(cands[i].1);
            }
            st.running = new_running;
            st.finished = finished;
            st.is_finished = flags;
        }
        cur_len += 1;
        // The early-stop heuristic and the loop condition.
        for st in state.iter_mut() {
            let best_len = if cfg.early_stopping == EarlyStopping::Never && lp > 0.0 {
                max_len
            } else {
                cur_len
            };
            let best_running = st.running[0].score / penalty(best_len);
            let worst = st.finished.iter().map(|h| h.score).fold(f32::INFINITY, f32::min);
            let any_better = st
                .is_finished
                .iter()
                .any(|&f| best_running > if f { worst } else { NEG });
            st.improvable &= any_better;
        }
        let improvement_possible = state.iter().any(|s| s.improvable);
        let all_finished = state.iter().all(|s| s.is_finished.iter().all(|&f| f));
        let open = !(all_finished && cfg.early_stopping == EarlyStopping::Yes);
        if !(improvement_possible && open && !all_stop) {
            break;
        }
        cache.select(&source_rows)?;
        logits = step(model, &mut cache, &next_tokens)?;
    }
    let fill = match (cfg.pad_token_id, cfg.eos_token_ids.first()) {
        // transformers: `pad_token_id or eos_token_id[0]` (a pad id of 0 is falsy).
        (Some(p), Some(_)) if p != 0 => p,
        (_, Some(&e)) => e,
        (Some(p), None) => p,
        (None, None) => 0,
    };
    let best: Vec<Vec<u32>> = state
        .into_iter()
        .map(|s| s.finished.into_iter().next().map(|h| h.tokens).unwrap_or_default())
        .collect();
    Ok(pad_to_widest(best, fill))
}

/// A finished hypothesis of transformers 4.31's `BeamHypotheses`.
struct Hyp431 {
    /// Generated tokens, without the EOS that ended it.
    tokens: Vec<u32>,
    score: f64,
    /// Ended by EOS: the output gets the EOS back if it fits.
    eos: bool,
}

/// transformers 4.31's `BeamHypotheses`: the `num_beams` best finished
/// hypotheses, scores in f64 as Python computes them.
struct Hyps431 {
    beams: Vec<Hyp431>,
    worst: f64,
    done: bool,
}

impl Hyps431 {
    /// `add(hyp, sum_logprobs)` with `len` = the hypothesis' ids, BOS included.
    fn add(&mut self, k: usize, lp: f64, tokens: Vec<u32>, sum_logprobs: f32, len: usize, eos: bool) {
        let score = sum_logprobs as f64 / (len as f64).powf(lp);
        if self.beams.len() < k || score > self.worst {
            self.beams.push(Hyp431 { tokens, score, eos });
            if self.beams.len() > k {
                // Python's sorted((score, index)): ties go to the lower index.
                let mut order: Vec<usize> = (0..self.beams.len()).collect();
                order.sort_by(|&a, &b| self.beams[a].score.total_cmp(&self.beams[b].score).then(a.cmp(&b)));
                self.worst = self.beams[order[1]].score;
                self.beams.remove(order[0]);
            } else {
                self.worst = self.worst.min(score);
            }
        }
    }

    /// `is_done(best_sum_logprobs, cur_len)`.
    fn is_done(&self, k: usize, cfg: &GenerationConfig, best: f32, cur_len: usize) -> bool {
        if self.beams.len() < k {
            return false;
        }
        let lp = cfg.length_penalty as f64;
        let len = match cfg.early_stopping {
            EarlyStopping::Yes => return true,
            // 4.31's max_length counts the BOS it seeds the ids with.
            EarlyStopping::Never if lp > 0.0 => cfg.max_new_tokens + 1,
            _ => cur_len,
        };
        self.worst >= best as f64 / (len as f64).powf(lp)
    }
}

/// transformers 4.31's `beam_search` with `BeamSearchScorer` (see
/// [`TransformersVersion`]), one prompt at a time on the host; running beam
/// scores in f32, finished ones in f64, as there.
fn beam_search_v4_31<B: Backend>(
    model: &Llama<B>,
    mut cache: KvCache<B>,
    prefill_logits: Vec<f32>,
    b: usize,
    cfg: &GenerationConfig,
    stop_rule: &mut dyn FnMut(&[u32]) -> bool,
) -> Result<Vec<Vec<u32>>> {
    let v = model.config().vocab_size;
    let k = cfg.num_beams;
    let keep = 2 * k;
    if keep > k * v {
        return Err(Error::Generation(format!(
            "{k} beams need at least {keep} candidates, the vocabulary has {v}"
        )));
    }
    let lp = cfg.length_penalty as f64;
    let mut logits = expand_to_beams(&mut cache, &prefill_logits, b, k, v)?;
    let mut running: Vec<Vec<Hyp>> = (0..b)
        .map(|_| {
            (0..k)
                .map(|i| Hyp {
                    tokens: Vec::new(),
                    score: if i == 0 { 0.0 } else { -1.0e9 },
                })
                .collect()
        })
        .collect();
    let mut hyps: Vec<Hyps431> = (0..b)
        .map(|_| Hyps431 {
            beams: Vec::new(),
            worst: 1.0e9,
            done: false,
        })
        .collect();
    // Generated tokens so far; 4.31's `input_ids` hold one more (the BOS).
    let mut generated = 0usize;
    loop {
        let mut source_rows = Vec::with_capacity(b * k);
        let mut next_tokens = Vec::with_capacity(b * k);
        for bi in 0..b {
            if hyps[bi].done {
                // 4.31 feeds pad tokens to a finished prompt's beams; their
                // outputs are never read.
                source_rows.extend(std::iter::repeat_n((bi * k) as u32, k));
                next_tokens.extend(std::iter::repeat_n(cfg.pad_token_id.unwrap_or(0), k));
                continue;
            }
            let beams = &running[bi];
            let acc = candidate_scores(&logits, bi, v, beams, cfg);
            let mut order = top_k_indices(&acc, keep);
            let best = acc[order[0]];
            let mut next: Vec<(usize, Hyp)> = Vec::with_capacity(k);
            let mut rank = 0;
            while next.len() < k {
                if rank == order.len() {
                    if order.len() == acc.len() {
                        return Err(Error::Generation(format!("fewer than {k} continuations left running")));
                    }
                    // Only reached where stop rules end more than `num_beams`
                    // of the top candidates, a case 4.31 (which has none)
                    // rejects: widen the search instead.
                    order = top_k_indices(&acc, acc.len());
                }
                let i = order[rank];
                let (src, tok) = (i / v, (i % v) as u32);
                let mut tokens = beams[src].tokens.clone();
                let eos = cfg.eos_token_ids.contains(&tok);
                if !eos {
                    tokens.push(tok);
                }
                if eos || stop_rule(&tokens) {
                    // Only the top `num_beams` candidates may finish.
                    if rank < k {
                        // The hypothesis' ids: the BOS, then the tokens kept.
                        let len = 1 + tokens.len();
                        hyps[bi].add(k, lp, tokens, acc[i], len, eos);
                    }
                } else {
                    next.push((src, Hyp { tokens, score: acc[i] }));
                }
                rank += 1;
            }
            let cur_len = generated + 2;
            hyps[bi].done = hyps[bi].is_done(k, cfg, best, cur_len);
            for (src, _) in &next {
                source_rows.push((bi * k + src) as u32);
            }
            next_tokens.extend(next.iter().map(|(_, h)| h.tokens[h.tokens.len() - 1]));
            running[bi] = next.into_iter().map(|(_, h)| h).collect();
        }
        generated += 1;
        if hyps.iter().all(|h| h.done) || generated >= cfg.max_new_tokens {
            break;
        }
        cache.select(&source_rows)?;
        logits = step(model, &mut cache, &next_tokens)?;
    }
    // finalize: the running beams of prompts not done join their hypotheses.
    for (h, beams) in hyps.iter_mut().zip(running) {
        if !h.done {
            for hyp in beams {
                let len = 1 + hyp.tokens.len();
                h.add(k, lp, hyp.tokens, hyp.score, len, false);
            }
        }
    }
    let best: Vec<Vec<u32>> = hyps
        .into_iter()
        .map(|h| {
            // sorted(..., key=score).pop(): ties go to the later hypothesis.
            let mut top: Option<Hyp431> = None;
            for hyp in h.beams {
                if top.as_ref().is_none_or(|t| hyp.score >= t.score) {
                    top = Some(hyp);
                }
            }
            top.map(|t| {
                let mut tokens = t.tokens;
                // 4.31 appends the EOS when the row has room before max_length.
                if t.eos && tokens.len() < cfg.max_new_tokens {
                    tokens.push(cfg.eos_token_ids[0]);
                }
                tokens
            })
            .unwrap_or_default()
        })
        .collect();
    let fill = cfg.pad_token_id.or(cfg.eos_token_ids.first().copied()).unwrap_or(0);
    Ok(pad_to_widest(best, fill))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_sorted_with_stable_ties() {
        let x = [0.5, 2.0, -1.0, 2.0, 7.0, 0.5];
        assert_eq!(top_k_indices(&x, 3), vec![4, 1, 3]);
        assert_eq!(top_k_indices(&x, 6), vec![4, 1, 3, 0, 5, 2]);
        assert_eq!(top_k_indices(&x, 5), vec![4, 1, 3, 0, 5]);
    }

    #[test]
    fn rng_is_deterministic_and_uniform_enough() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let xs: Vec<f64> = (0..10000).map(|_| a.uniform()).collect();
        let ys: Vec<f64> = (0..10000).map(|_| b.uniform()).collect();
        assert_eq!(xs, ys);
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
        assert!(xs.iter().all(|&x| (0.0..1.0).contains(&x)));
    }

    #[test]
    fn warpers_follow_transformers() {
        let cfg = GenerationConfig {
            do_sample: true,
            top_k: 2,
            top_p: 1.0,
            temperature: 2.0,
            ..Default::default()
        };
        let mut s = vec![1.0, 4.0, 3.0, 2.0];
        warp(&mut s, &cfg);
        assert_eq!(s, vec![f32::NEG_INFINITY, 2.0, 1.5, f32::NEG_INFINITY]);
        // top-p 0.5 on probabilities ~[0.64, 0.24, 0.09, 0.03]: only the first survives.
        let cfg = GenerationConfig {
            do_sample: true,
            top_k: 0,
            top_p: 0.5,
            ..Default::default()
        };
        let mut s = vec![3.0, 2.0, 1.0, 0.0];
        warp(&mut s, &cfg);
        assert_eq!(s[0], 3.0);
        assert!(s[1..].iter().all(|x| *x == f32::NEG_INFINITY), "{s:?}");
    }

    /// A fake tokenizer: ids index a vocabulary of strings.
    fn vocab_decode(vocab: &'static [&'static str]) -> impl Fn(&[u32]) -> String {
        move |ids| ids.iter().map(|&i| vocab[i as usize]).collect()
    }

    #[test]
    fn stop_strings_match_like_transformers() {
        // transformers' StopStringCriteria docstring, for the stop string "stop".
        const V: &[&str] = &[
            "st", "op", "stop", "opera", "sto", "pper", "las", "topper", "s", "to", "pped", "at", "tion",
        ];
        let tok = |w: &str| V.iter().position(|v| *v == w).unwrap() as u32;
        let ids = |ws: &[&str]| ws.iter().map(|w| tok(w)).collect::<Vec<_>>();
        let decode = vocab_decode(V);
        let strings = vec!["stop".to_string()];
        let stop = StopStrings::new(&strings, &decode);
        for hit in [
            &["st", "op"][..],
            &["stop"],
            &["st", "opera"],
            &["sto", "pper"],
            &["las", "topper"],
            &["s", "to", "pped"],
        ] {
            assert!(stop.matches(&ids(hit)), "{hit:?} should stop");
        }
        for miss in [
            &["stop", "at"][..],
            &["st", "op", "at"],
            &["st", "opera", "tion"],
            &["st"],
            &[],
        ] {
            assert!(!stop.matches(&ids(miss)), "{miss:?} should not stop");
        }
        // Any of several strings; none at all never stops.
        let several = vec!["xyz".to_string(), "pera".to_string()];
        assert!(StopStrings::new(&several, &decode).matches(&ids(&["st", "opera"])));
        assert!(!StopStrings::new(&[], &decode).matches(&ids(&["stop"])));
    }

    #[test]
    fn stop_strings_handle_incomplete_characters() {
        // Byte tokens: "é" is two bytes; the prefix decodes with U+FFFD, as
        // sentencepiece byte fallback does.
        fn decode(ids: &[u32]) -> String {
            let bytes: Vec<u8> = ids
                .iter()
                .flat_map(|&i| match i {
                    0 => b"caf".to_vec(),
                    1 => vec![0xC3],
                    2 => vec![0xA9],
                    _ => b"!".to_vec(),
                })
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
        let strings = vec!["café".to_string()];
        let stop = StopStrings::new(&strings, &decode);
        assert!(!stop.matches(&[0, 1]));
        assert!(stop.matches(&[0, 1, 2]));
        assert!(!stop.matches(&[0, 1, 2, 3]));
        let strings = vec!["é!".to_string()];
        assert!(StopStrings::new(&strings, &decode).matches(&[0, 1, 2, 3]));
    }

    #[test]
    fn processors_follow_transformers() {
        let cfg = GenerationConfig {
            repetition_penalty: 2.0,
            min_new_tokens: 2,
            eos_token_ids: vec![3],
            ..Default::default()
        };
        let mut s = vec![1.0, -1.0, 0.5, 0.25];
        process(&mut s, &[0, 1, 1], &cfg);
        assert_eq!(s, vec![0.5, -2.0, 0.5, 0.25]);
        let mut s = vec![1.0, -1.0, 0.5, 0.25];
        process(&mut s, &[2], &cfg);
        assert_eq!(s, vec![1.0, -1.0, 0.25, f32::NEG_INFINITY]);
    }
}
