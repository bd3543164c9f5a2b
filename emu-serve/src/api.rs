//! Request bodies (OpenAI's shapes plus Emu2's extensions) and their
//! translation into pipeline inputs, with every limit checked.

use crate::deps::{parse_size, upstream_generation, ChatOptions, CompletionOptions, GenerationOptions};
use crate::error::ApiError;
use crate::images::{ImagePolicy, RequestFiles};
use emu_prompt::{Item, Prompt, Role, Turn};
use serde::Deserialize;

/// The server's per-request limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_tokens: usize,
    pub default_max_tokens: usize,
    pub max_beams: usize,
    pub max_images: usize,
    pub max_steps: usize,
    pub max_output_pixels: u64,
    pub max_n: usize,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// Decoding fields shared by chat and completions.
#[derive(Debug, Deserialize, Default)]
pub struct Sampling {
    pub max_tokens: Option<usize>,
    /// OpenAI's newer name for `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub stop: Option<OneOrMany>,
    pub seed: Option<u64>,
    pub n: Option<usize>,
    pub repetition_penalty: Option<f32>,
    /// Emu2 extension: beam search width (upstream's chat default is 5).
    pub num_beams: Option<usize>,
    /// Emu2 extension: beam scores are divided by length^length_penalty (upstream: -1).
    pub length_penalty: Option<f32>,
}

#[derive(Debug, Deserialize)]
pub struct ImageUrl {
    pub url: String,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Content,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub stream: bool,
    /// Emu2 extension: answer with `[x1,y1,x2,y2]` boxes, returned in pixels.
    #[serde(default)]
    pub grounding: bool,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    /// Emu2 markup (`{image "data:image/png;base64,..."}` for images).
    pub prompt: serde_json::Value,
    #[serde(default)]
    pub stream: bool,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Debug, Deserialize)]
pub struct ImageRequest {
    pub model: Option<String>,
    /// Emu2 markup: text, `{image URI}` subjects, `{object box=... phrase=... subject=URI}`.
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub n: Option<usize>,
    /// `N` or `WIDTHxHEIGHT`.
    pub size: Option<String>,
    pub steps: Option<usize>,
    pub guidance: Option<f32>,
    pub seed: Option<u64>,
    pub response_format: Option<String>,
    /// Progress events over server-sent events.
    #[serde(default)]
    pub stream: bool,
}

/// Parses a JSON body into `T`, with a 400 that says what is wrong.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("invalid request body: {e}")))
}

impl Sampling {
    /// The decoding settings. OpenAI's semantics: no temperature (or 0) is
    /// greedy search, a positive one samples; `num_beams` > 1 is upstream's
    /// beam search.
    pub fn generation(&self, limits: &Limits) -> Result<emu_llm::GenerationConfig, ApiError> {
        let mut g = upstream_generation();
        let max = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(limits.default_max_tokens);
        if max == 0 || max > limits.max_tokens {
            return Err(ApiError::param(
                "max_tokens",
                format!(
                    "max_tokens must be 1 to {} on this server, found {max}",
                    limits.max_tokens
                ),
            ));
        }
        g.max_new_tokens = max;
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::param(
                "n",
                format!("n must be 1 (one answer per request), found {n}"),
            ));
        }
        g.num_beams = self.num_beams.unwrap_or(1);
        if g.num_beams == 0 || g.num_beams > limits.max_beams {
            return Err(ApiError::param(
                "num_beams",
                format!("num_beams must be 1 to {}, found {}", limits.max_beams, g.num_beams),
            ));
        }
        if let Some(lp) = self.length_penalty {
            if !lp.is_finite() {
                return Err(ApiError::param(
                    "length_penalty",
                    "length_penalty must be a finite number",
                ));
            }
            g.length_penalty = lp;
        }
        match self.temperature {
            None => {}
            Some(0.0) => {}
            Some(t) if t.is_finite() && t > 0.0 && t <= 2.0 => {
                if g.num_beams > 1 {
                    return Err(ApiError::param(
                        "temperature",
                        "sampling (temperature > 0) needs num_beams 1; beam sampling is not supported",
                    ));
                }
                g.do_sample = true;
                g.temperature = t;
                // OpenAI has no top-k: keep every token unless asked.
                g.top_k = self.top_k.unwrap_or(0);
            }
            Some(t) => {
                return Err(ApiError::param(
                    "temperature",
                    format!("temperature must be 0 to 2, found {t}"),
                ));
            }
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ApiError::param("top_p", format!("top_p must be in (0, 1], found {p}")));
            }
            g.top_p = p;
        }
        if let Some(r) = self.repetition_penalty {
            if !(r.is_finite() && r > 0.0) {
                return Err(ApiError::param(
                    "repetition_penalty",
                    "repetition_penalty must be positive",
                ));
            }
            g.repetition_penalty = r;
        }
        g.seed = self.seed.unwrap_or(0);
        g.stop_strings = match &self.stop {
            None => Vec::new(),
            Some(OneOrMany::One(s)) => vec![s.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
        };
        if g.stop_strings.len() > 4 || g.stop_strings.iter().any(|s| s.is_empty() || s.len() > 256) {
            return Err(ApiError::param(
                "stop",
                "stop takes up to 4 non-empty strings of at most 256 bytes",
            ));
        }
        Ok(g)
    }
}

/// Resolves every image a prompt names (images, video frames, object
/// subjects) through `policy`, counting them against `limit`.
pub fn resolve_images(
    prompt: &mut Prompt,
    policy: &ImagePolicy,
    files: &mut RequestFiles,
    limit: usize,
    param: &str,
) -> Result<(), ApiError> {
    let mut count = 0;
    let mut fix = |p: &mut String| -> Result<(), ApiError> {
        count += 1;
        if count > limit {
            return Err(ApiError::param(
                param,
                format!("more than {limit} images in one request"),
            ));
        }
        *p = policy.resolve(p, param, files)?;
        Ok(())
    };
    for turn in &mut prompt.turns {
        for item in &mut turn.items {
            match item {
                Item::Image(p) => fix(p)?,
                Item::Video(v) => {
                    for f in &mut v.frames {
                        fix(f)?;
                    }
                }
                Item::Object(o) => {
                    if let Some(s) = o.subject.as_mut() {
                        fix(s)?;
                    }
                }
                Item::Text(_) => {}
            }
        }
    }
    Ok(())
}

/// A chat request as a conversation and options. Text stays text (it is
/// never read as markup or special tokens); images come from `image_url` parts.
pub fn chat_task(
    req: ChatRequest,
    limits: &Limits,
    policy: &ImagePolicy,
    files: &mut RequestFiles,
) -> Result<(Prompt, ChatOptions), ApiError> {
    let generation = req.sampling.generation(limits)?;
    let mut system: Option<String> = None;
    let mut turns: Vec<Turn> = Vec::new();
    let mut images = 0;
    for (i, m) in req.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => None,
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            other => {
                return Err(ApiError::param(
                    format!("messages[{i}].role"),
                    format!("unknown role `{other}`; use system, user or assistant"),
                ))
            }
        };
        let mut items = Vec::new();
        match m.content {
            Content::Text(t) => items.push(Item::Text(t)),
            Content::Parts(parts) => {
                for (j, p) in parts.into_iter().enumerate() {
                    match p {
                        Part::Text { text } => items.push(Item::Text(text)),
                        Part::ImageUrl { image_url } => {
                            let param = format!("messages[{i}].content[{j}].image_url.url");
                            if role != Some(Role::User) {
                                return Err(ApiError::param(param, "only user messages may hold images"));
                            }
                            images += 1;
                            if images > limits.max_images {
                                return Err(ApiError::param(
                                    param,
                                    format!("more than {} images in one request", limits.max_images),
                                ));
                            }
                            items.push(Item::Image(policy.resolve(&image_url.url, &param, files)?));
                        }
                    }
                }
            }
        }
        match role {
            None => {
                let text: String = items
                    .iter()
                    .filter_map(|it| if let Item::Text(t) = it { Some(t.as_str()) } else { None })
                    .collect();
                system = Some(match system {
                    Some(s) => format!("{s}\n{text}"),
                    None => text,
                });
            }
            Some(role) => turns.push(Turn { role, items }),
        }
    }
    if turns.last().map(|t| t.role) != Some(Role::User) {
        return Err(ApiError::param(
            "messages",
            "the conversation must end with a user message",
        ));
    }
    Ok((
        Prompt { turns },
        ChatOptions {
            grounding: req.grounding,
            system,
            generation,
        },
    ))
}

/// A completion request: the prompt is Emu2 markup.
pub fn completion_task(
    req: CompletionRequest,
    limits: &Limits,
    policy: &ImagePolicy,
    files: &mut RequestFiles,
) -> Result<(Prompt, CompletionOptions), ApiError> {
    let generation = req.sampling.generation(limits)?;
    let text = match &req.prompt {
        serde_json::Value::String(s) => s.as_str(),
        serde_json::Value::Array(a) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or_default(),
        _ => return Err(ApiError::param("prompt", "prompt must be one string of Emu2 markup")),
    };
    let mut prompt =
        emu_prompt::parse_markup(text).map_err(|e| ApiError::param("prompt", format!("prompt markup: {e}")))?;
    resolve_images(&mut prompt, policy, files, limits.max_images, "prompt")?;
    Ok((prompt, CompletionOptions { generation }))
}

/// An image request: the prompt (and negative prompt) are Emu2 markup;
/// `n` images use seeds `seed`, `seed + 1`, ...
pub fn image_task(
    req: &ImageRequest,
    limits: &Limits,
    default_size: usize,
    policy: &ImagePolicy,
    files: &mut RequestFiles,
) -> Result<(Prompt, Vec<GenerationOptions>), ApiError> {
    if let Some(f) = req.response_format.as_deref().filter(|f| *f != "b64_json") {
        return Err(ApiError::param(
            "response_format",
            format!("response_format `{f}` is not supported; this server returns b64_json only"),
        ));
    }
    let n = req.n.unwrap_or(1);
    if n == 0 || n > limits.max_n {
        return Err(ApiError::param(
            "n",
            format!("n must be 1 to {}, found {n}", limits.max_n),
        ));
    }
    let steps = req.steps.unwrap_or(50.min(limits.max_steps));
    if steps == 0 || steps > limits.max_steps {
        return Err(ApiError::param(
            "steps",
            format!("steps must be 1 to {} on this server, found {steps}", limits.max_steps),
        ));
    }
    let guidance = req.guidance.unwrap_or(3.0);
    if !(guidance.is_finite() && (0.0..=50.0).contains(&guidance)) {
        return Err(ApiError::param(
            "guidance",
            format!("guidance must be 0 to 50, found {guidance}"),
        ));
    }
    let size = match &req.size {
        Some(s) => parse_size(s).map_err(|e| ApiError::param("size", e.to_string()))?,
        None => (default_size, default_size),
    };
    if (size.0 as u64) * (size.1 as u64) > limits.max_output_pixels || size.0 == 0 || size.1 == 0 {
        return Err(ApiError::param(
            "size",
            format!(
                "size {}x{} is outside this server's limit of {} pixels",
                size.1, size.0, limits.max_output_pixels
            ),
        ));
    }
    let mut prompt =
        emu_prompt::parse_markup(&req.prompt).map_err(|e| ApiError::param("prompt", format!("prompt markup: {e}")))?;
    resolve_images(&mut prompt, policy, files, limits.max_images, "prompt")?;
    let negative = match &req.negative_prompt {
        Some(m) => {
            let mut p = emu_prompt::parse_markup(m)
                .map_err(|e| ApiError::param("negative_prompt", format!("negative_prompt markup: {e}")))?;
            resolve_images(&mut p, policy, files, limits.max_images, "negative_prompt")?;
            Some(p)
        }
        None => None,
    };
    let seed = req.seed.unwrap_or(0);
    let runs = (0..n)
        .map(|i| GenerationOptions {
            steps,
            guidance,
            seed: seed.wrapping_add(i as u64),
            size: Some(size),
            negative: negative.clone(),
            latents: None,
        })
        .collect();
    Ok((prompt, runs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_tokens: 100,
            default_max_tokens: 16,
            max_beams: 4,
            max_images: 2,
            max_steps: 10,
            max_output_pixels: 64 * 64,
            max_n: 2,
        }
    }

    fn sampling(json: &str) -> Result<emu_llm::GenerationConfig, ApiError> {
        parse::<Sampling>(json.as_bytes())?.generation(&limits())
    }

    #[test]
    fn decoding_settings() {
        let g = sampling("{}").unwrap();
        assert_eq!((g.max_new_tokens, g.num_beams, g.do_sample), (16, 1, false));
        let g = sampling(r#"{"temperature":0.7,"top_p":0.9,"seed":5,"stop":"x","max_tokens":3}"#).unwrap();
        assert!(g.do_sample);
        assert_eq!((g.temperature, g.top_p, g.seed, g.max_new_tokens), (0.7, 0.9, 5, 3));
        assert_eq!(g.stop_strings, vec!["x".to_string()]);
        let g = sampling(r#"{"num_beams":3,"length_penalty":2.0,"temperature":0}"#).unwrap();
        assert_eq!((g.num_beams, g.length_penalty, g.do_sample), (3, 2.0, false));
        for (bad, param) in [
            (r#"{"max_tokens":0}"#, "max_tokens"),
            (r#"{"max_tokens":101}"#, "max_tokens"),
            (r#"{"temperature":3}"#, "temperature"),
            (r#"{"temperature":1,"num_beams":2}"#, "temperature"),
            (r#"{"top_p":0}"#, "top_p"),
            (r#"{"num_beams":5}"#, "num_beams"),
            (r#"{"n":2}"#, "n"),
            (r#"{"stop":["a","b","c","d","e"]}"#, "stop"),
            (r#"{"stop":[""]}"#, "stop"),
        ] {
            let e = sampling(bad).unwrap_err();
            assert_eq!((e.status.as_u16(), e.param.as_deref()), (400, Some(param)), "{bad}");
        }
        assert_eq!(sampling(r#"{"max_tokens":"many"}"#).unwrap_err().status, 400);
    }

    #[test]
    fn chat_messages_become_turns() {
        let policy = ImagePolicy {
            local_root: None,
            max_pixels: 1 << 20,
        };
        let req: ChatRequest = parse(
            br#"{"messages":[{"role":"system","content":"be brief"},
                 {"role":"user","content":[{"type":"text","text":"{image x} <image> hi"}]}],
                 "grounding":true}"#,
        )
        .unwrap();
        let (prompt, opts) = chat_task(req, &limits(), &policy, &mut RequestFiles::new()).unwrap();
        assert_eq!(opts.system.as_deref(), Some("be brief"));
        assert!(opts.grounding);
        // Markup and special tokens in user text stay text.
        assert_eq!(prompt.turns.len(), 1);
        assert_eq!(prompt.turns[0].items, vec![Item::Text("{image x} <image> hi".into())]);
        let req: ChatRequest = parse(br#"{"messages":[{"role":"assistant","content":"x"}]}"#).unwrap();
        let e = chat_task(req, &limits(), &policy, &mut RequestFiles::new()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let req: ChatRequest = parse(br#"{"messages":[{"role":"robot","content":"x"}]}"#).unwrap();
        let e = chat_task(req, &limits(), &policy, &mut RequestFiles::new()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
    }

    #[test]
    fn image_settings() {
        let policy = ImagePolicy {
            local_root: None,
            max_pixels: 1 << 20,
        };
        let req: ImageRequest = parse(br#"{"prompt":"a cat","n":2,"seed":7,"steps":3,"size":"32"}"#).unwrap();
        let (_, runs) = image_task(&req, &limits(), 32, &policy, &mut RequestFiles::new()).unwrap();
        assert_eq!(runs.iter().map(|r| r.seed).collect::<Vec<_>>(), vec![7, 8]);
        assert_eq!(runs[0].size, Some((32, 32)));
        for (bad, param) in [
            (r#"{"prompt":"a","n":3}"#, "n"),
            (r#"{"prompt":"a","steps":11}"#, "steps"),
            (r#"{"prompt":"a","size":"128"}"#, "size"),
            (r#"{"prompt":"a","size":"big"}"#, "size"),
            (r#"{"prompt":"a","guidance":-1}"#, "guidance"),
            (r#"{"prompt":"a","response_format":"url"}"#, "response_format"),
            (r#"{"prompt":"{image"}"#, "prompt"),
        ] {
            let req: ImageRequest = parse(bad.as_bytes()).unwrap();
            let e = image_task(&req, &limits(), 32, &policy, &mut RequestFiles::new()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{bad}");
        }
    }
}
