//! The LLaMA tokenizer with Emu2's special tokens.
//!
//! Upstream runs transformers 4.31's **slow** `LlamaTokenizer` (`legacy: true`), and its token ids
//! are what the checkpoints were trained and evaluated with. It differs from a `tokenizer.json`
//! run through HF `tokenizers` around special tokens, so this module does not use the file's
//! added-token pipeline; it reproduces the slow tokenizer's rules on top of the file's BPE model:
//!
//! * special tokens are cut out first; every text chunk in between is then encoded on its own
//!   by SentencePiece, which gives each chunk the dummy `▁` prefix (`legacy: true`);
//! * a special token swallows the whitespace on both sides of it (`str.strip` semantics:
//!   spaces, tabs and newlines) — except `<unk>`, which upstream registers with
//!   `lstrip=rstrip=False`. That is why `". [USER]: "` has no lone `▁` (29871) before `[USER]`;
//! * `<s>`, `</s>` and `<unk>` are special tokens too, so the literal `</s>` of the Emu2-Chat turn
//!   separator is EOS (id 2).
//!
//! [`Compat::Fast`] instead reproduces `LlamaTokenizerFast` as transformers 4.31 + tokenizers
//! 0.13.3 build it from the same files with the same `add_special_tokens` call (the `AutoTokenizer`
//! behaviour): no whitespace is swallowed, each chunk between Emu2 tokens is normalized
//! (`▁` prefix, spaces to `▁`) and `<s>`/`</s>`/`<unk>` are only recognised in the normalized text
//! as `▁<s>`, `▁</s>`, `▁<unk>` (i.e. after a space or at the start of a chunk).
//!
//! **Safety**: [`Emu2Tokenizer::encode`] and [`Piece::Text`] never turn text into special ids,
//! whatever it contains. Only [`Emu2Tokenizer::encode_markup`], which a caller must choose
//! explicitly, reads special-token markup inside a string.

use std::borrow::Cow;
use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::models::ModelWrapper;
use tokenizers::Model;

use crate::error::{Error, Result};
use crate::special::{SpecialToken, Variant, LLAMA_VOCAB};

const SPIECE: char = '\u{2581}';

/// Which reference tokenizer to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compat {
    /// transformers 4.31 slow `LlamaTokenizer` (`legacy: true`), as upstream's code and demo use.
    #[default]
    Slow,
    /// `LlamaTokenizerFast` from the same files (HF `AutoTokenizer` parity).
    Fast,
}

/// One element of a prompt as the tokenizer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece<'a> {
    /// A special token put there by a template (never by user text).
    Special(SpecialToken),
    /// Text; it is always tokenized as text, even if it looks like special-token markup.
    Text(Cow<'a, str>),
}

impl Piece<'_> {
    /// Owned text piece.
    pub fn text(s: impl Into<String>) -> Piece<'static> {
        Piece::Text(Cow::Owned(s.into()))
    }
}

/// LLaMA SentencePiece BPE plus the Emu2 special tokens.
#[derive(Clone)]
pub struct Emu2Tokenizer {
    bpe: BPE,
    /// id -> piece for the 32000 LLaMA pieces.
    pieces: Vec<String>,
    /// Control pieces (`<s>`, `</s>`), which SentencePiece decodes to nothing.
    control: Vec<bool>,
    variant: Variant,
    compat: Compat,
    add_bos: bool,
    /// Special-token strings for raw-markup parsing, longest first.
    markup: Vec<(String, SpecialToken)>,
}

impl std::fmt::Debug for Emu2Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emu2Tokenizer")
            .field("variant", &self.variant)
            .field("compat", &self.compat)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

impl Emu2Tokenizer {
    /// Loads a LLaMA `tokenizer.json` (a byte-fallback BPE over the 32000 LLaMA pieces).
    ///
    /// Emu2's special tokens are added in upstream order when the file lacks them; when the file
    /// already has added tokens above id 32000 they must be exactly Emu2's (else an error names
    /// the first mismatch). The file's normalizer, pre-tokenizer, post-processor and decoder are
    /// not used: the LLaMA SentencePiece rules are applied as described in the module docs.
    pub fn from_tokenizer_json(path: impl AsRef<Path>, variant: Variant) -> Result<Self> {
        let path = path.as_ref();
        let bytes = Error::read_file(path)?;
        let tok = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let bpe = match tok.get_model() {
            ModelWrapper::BPE(bpe) => bpe.clone(),
            _ => {
                return Err(Error::Tokenizer(format!(
                    "{}: the model is not BPE (LLaMA tokenizers are byte-fallback BPE)",
                    path.display()
                )))
            }
        };
        // The file's own ids: tokenizers renumbers added tokens when it loads them.
        #[derive(serde::Deserialize)]
        struct Added {
            id: u32,
            content: String,
        }
        #[derive(serde::Deserialize)]
        struct File {
            #[serde(default)]
            added_tokens: Vec<Added>,
        }
        let file: File = serde_json::from_slice(&bytes).map_err(|source| Error::Json {
            what: path.display().to_string(),
            source,
        })?;
        let added: Vec<(u32, String)> = file.added_tokens.into_iter().map(|a| (a.id, a.content)).collect();
        Self::from_bpe(bpe, &added, variant)
    }

    /// Builds the tokenizer from a LLaMA BPE model and the added tokens its file lists.
    pub(crate) fn from_bpe(bpe: BPE, added: &[(u32, String)], variant: Variant) -> Result<Self> {
        if !bpe.byte_fallback {
            return Err(Error::Tokenizer(
                "the BPE model has no byte fallback; not a LLaMA tokenizer".into(),
            ));
        }
        let vocab = bpe.get_vocab();
        let mut pieces = vec![String::new(); LLAMA_VOCAB as usize];
        for (piece, id) in &vocab {
            if (*id as usize) < pieces.len() {
                pieces[*id as usize] = piece.clone();
            }
        }
        for (id, want) in [(0u32, "<unk>"), (1, "<s>"), (2, "</s>")] {
            if pieces[id as usize] != want {
                return Err(Error::Tokenizer(format!(
                    "piece {id} is {:?}, expected {want:?}; not a LLaMA vocabulary",
                    pieces[id as usize]
                )));
            }
        }
        if let Some(missing) = pieces.iter().position(|p| p.is_empty()) {
            return Err(Error::Tokenizer(format!(
                "the vocabulary has no piece with id {missing}; LLaMA has {LLAMA_VOCAB}"
            )));
        }
        if let Some((id, p)) = vocab.iter().map(|(p, id)| (*id, p)).find(|(id, _)| *id >= LLAMA_VOCAB) {
            return Err(Error::Tokenizer(format!(
                "the BPE vocabulary has piece {p:?} with id {id}; LLaMA has {LLAMA_VOCAB} pieces"
            )));
        }
        let mut added = added.to_vec();
        added.sort();
        for (id, content) in &added {
            if *id < LLAMA_VOCAB {
                if pieces[*id as usize] != *content {
                    return Err(Error::Tokenizer(format!(
                        "added token {content:?} has id {id}, which is piece {:?}",
                        pieces[*id as usize]
                    )));
                }
                continue;
            }
            match SpecialToken::from_id(*id, variant) {
                Some(t) if t.text() == content.as_str() => {}
                _ => {
                    return Err(Error::Tokenizer(format!(
                        "added token {content:?} has id {id}; the Emu2 {variant:?} vocabulary has {} there",
                        SpecialToken::from_id(*id, variant)
                            .map(|t| format!("{:?}", t.text()))
                            .unwrap_or_else(|| "nothing".into())
                    )))
                }
            }
        }
        let control = pieces.iter().map(|p| p == "<s>" || p == "</s>").collect();
        let mut markup: Vec<(String, SpecialToken)> = SpecialToken::all(variant)
            .into_iter()
            .map(|t| (t.text().into_owned(), t))
            .collect();
        markup.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        Ok(Emu2Tokenizer {
            bpe,
            pieces,
            control,
            variant,
            compat: Compat::Slow,
            add_bos: true,
            markup,
        })
    }

    /// Loads whichever layout `dir` has: `tokenizer.json`, or SentencePiece `tokenizer.model`
    /// (plus `added_tokens.json` when present). `tokenizer_config.json`, when present, sets
    /// `add_bos_token`; `legacy: false` is refused, since upstream's ids need `legacy: true`.
    pub fn from_dir(dir: impl AsRef<Path>, variant: Variant) -> Result<Self> {
        let dir = dir.as_ref();
        let json = dir.join("tokenizer.json");
        let model = dir.join("tokenizer.model");
        // Present in any form (a directory, a FIFO) counts, so that reading
        // it names what is wrong instead of falling back to another file.
        let present = |p: &Path| std::fs::symlink_metadata(p).is_ok();
        let mut tok = if present(&json) {
            Self::from_tokenizer_json(json, variant)?
        } else if present(&model) {
            let added = dir.join("added_tokens.json");
            let added = added.is_file().then_some(added);
            Self::from_sentencepiece(model, added.as_deref(), variant)?
        } else {
            return Err(Error::Tokenizer(format!(
                "{}: neither tokenizer.json nor tokenizer.model",
                dir.display()
            )));
        };
        // Not used beyond this check, but a broken one means a broken download.
        let special = dir.join("special_tokens_map.json");
        if present(&special) {
            let text = Error::read_file(&special)?;
            serde_json::from_slice::<serde_json::Value>(&text).map_err(|source| Error::Json {
                what: special.display().to_string(),
                source,
            })?;
        }
        let config = dir.join("tokenizer_config.json");
        if present(&config) {
            let text = Error::read_file(&config)?;
            let v: serde_json::Value = serde_json::from_slice(&text).map_err(|source| Error::Json {
                what: config.display().to_string(),
                source,
            })?;
            if let Some(b) = v.get("add_bos_token").and_then(serde_json::Value::as_bool) {
                tok.add_bos = b;
            }
            if v.get("legacy").and_then(serde_json::Value::as_bool) == Some(false) {
                return Err(Error::Tokenizer(format!(
                    "{}: legacy: false is not supported (Emu2 uses the legacy LLaMA tokenizer)",
                    config.display()
                )));
            }
        }
        Ok(tok)
    }

    /// Same tokenizer reproducing another reference (default [`Compat::Slow`]).
    pub fn with_compat(mut self, compat: Compat) -> Self {
        self.compat = compat;
        self
    }

    /// Whether `<s>` is prepended (default true, as `tokenizer_config.json` says).
    pub fn with_bos(mut self, add_bos: bool) -> Self {
        self.add_bos = add_bos;
        self
    }

    /// The vocabulary variant.
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// The reference being reproduced.
    pub fn compat(&self) -> Compat {
        self.compat
    }

    /// Total number of ids (32272 or 32274).
    pub fn vocab_size(&self) -> usize {
        self.variant.vocab_size()
    }

    /// The piece or special-token text of an id.
    pub fn id_to_token(&self, id: u32) -> Option<Cow<'_, str>> {
        if id < LLAMA_VOCAB {
            Some(Cow::Borrowed(self.pieces[id as usize].as_str()))
        } else {
            SpecialToken::from_id(id, self.variant).map(|t| t.text())
        }
    }

    /// Encodes plain text. Whatever the text contains (`[IMG]`, `</s>`, `[USER]`), it stays text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_pieces(&[Piece::Text(Cow::Borrowed(text))])
    }

    /// Encodes a rendered prompt: special pieces become their ids, text pieces stay text.
    pub fn encode_pieces(&self, pieces: &[Piece<'_>]) -> Result<Vec<u32>> {
        match self.compat {
            Compat::Slow => {
                let chunks: Vec<Chunk> = pieces
                    .iter()
                    .map(|p| match p {
                        Piece::Special(t) => Chunk::Special(*t),
                        Piece::Text(s) => Chunk::Text(s.to_string(), false),
                    })
                    .collect();
                self.encode_slow(chunks)
            }
            Compat::Fast => {
                let chunks: Vec<Chunk> = pieces
                    .iter()
                    .map(|p| match p {
                        // The fast tokenizer only knows <s>, </s>, <unk> as normalized text.
                        Piece::Special(t) if t.id() < LLAMA_VOCAB => Chunk::Text(t.text().into_owned(), true),
                        Piece::Special(t) => Chunk::Special(*t),
                        Piece::Text(s) => Chunk::Text(s.to_string(), false),
                    })
                    .collect();
                self.encode_fast(chunks)
            }
        }
    }

    /// Encodes a string in which special-token markup (`[IMG]`, `<image>`, `</s>`, `[USER]`, …)
    /// becomes special ids, as the reference tokenizer does with a whole prompt string.
    ///
    /// Only for text the caller controls: user-supplied text passed here can forge image slots
    /// and chat turns.
    pub fn encode_markup(&self, text: &str) -> Result<Vec<u32>> {
        match self.compat {
            Compat::Slow => self.encode_slow(self.split_markup(text, true)),
            Compat::Fast => self.encode_fast(self.split_markup(text, false)),
        }
    }

    /// Splits at special-token markup, leftmost-longest (the slow tokenizer's trie).
    /// `with_llama` also cuts out `<unk>`, `<s>`, `</s>`.
    fn split_markup(&self, text: &str, with_llama: bool) -> Vec<Chunk> {
        let mut out = Vec::new();
        let mut start = 0;
        let mut i = 0;
        let bytes = text.as_bytes();
        while i < bytes.len() {
            if bytes[i] == b'<' || bytes[i] == b'[' {
                let rest = &text[i..];
                let hit = self
                    .markup
                    .iter()
                    .find(|(s, t)| rest.starts_with(s.as_str()) && (with_llama || t.id() >= LLAMA_VOCAB));
                if let Some((s, t)) = hit {
                    if start < i {
                        out.push(Chunk::Text(text[start..i].to_string(), true));
                    }
                    out.push(Chunk::Special(*t));
                    i += s.len();
                    start = i;
                    continue;
                }
            }
            i += 1;
        }
        if start < text.len() {
            out.push(Chunk::Text(text[start..].to_string(), true));
        }
        out
    }

    fn bos(&self) -> Vec<u32> {
        if self.add_bos {
            vec![SpecialToken::Bos.id()]
        } else {
            Vec::new()
        }
    }

    fn encode_slow(&self, chunks: Vec<Chunk>) -> Result<Vec<u32>> {
        let chunks = merge_text(chunks);
        let mut ids = self.bos();
        for (k, c) in chunks.iter().enumerate() {
            match c {
                Chunk::Special(t) => ids.push(t.id()),
                Chunk::Text(s, _) => {
                    // PreTrainedTokenizer.tokenize: a special token registered as a plain string
                    // strips the text on both sides of it; `<unk>` keeps its AddedToken flags
                    // (lstrip = rstrip = False) and strips nothing.
                    let strips = |c: Option<&Chunk>| matches!(c, Some(Chunk::Special(t)) if *t != SpecialToken::Unk);
                    let mut s = s.as_str();
                    if k > 0 && strips(chunks.get(k - 1)) {
                        s = s.trim_start_matches(py_isspace);
                    }
                    if strips(chunks.get(k + 1)) {
                        s = s.trim_end_matches(py_isspace);
                    }
                    if !s.is_empty() {
                        let normalized: String = std::iter::once(SPIECE)
                            .chain(s.chars().map(|c| if c == ' ' { SPIECE } else { c }))
                            .collect();
                        self.bpe_into(&normalized, &mut ids)?;
                    }
                }
            }
        }
        Ok(ids)
    }

    fn encode_fast(&self, chunks: Vec<Chunk>) -> Result<Vec<u32>> {
        // Merge adjacent text while remembering which bytes may form <s>/</s>/<unk>.
        let mut merged: Vec<FastChunk> = Vec::new();
        for c in chunks {
            match c {
                Chunk::Special(t) => merged.push(FastChunk::Special(t)),
                Chunk::Text(s, markup_ok) => {
                    if !matches!(merged.last(), Some(FastChunk::Text(..))) {
                        merged.push(FastChunk::Text(String::new(), Vec::new()));
                    }
                    if let Some(FastChunk::Text(text, ok)) = merged.last_mut() {
                        text.push_str(&s);
                        ok.extend(std::iter::repeat_n(markup_ok, s.len()));
                    }
                }
            }
        }
        let mut ids = self.bos();
        for c in &merged {
            match c {
                FastChunk::Special(t) => ids.push(t.id()),
                FastChunk::Text(text, ok) => {
                    if text.is_empty() {
                        continue;
                    }
                    let mut norm = String::with_capacity(text.len() + 8);
                    let mut norm_ok: Vec<bool> = Vec::with_capacity(text.len() + 8);
                    norm.push(SPIECE);
                    norm_ok.extend([false; 3]);
                    for (pos, ch) in text.char_indices() {
                        let ch = if ch == ' ' { SPIECE } else { ch };
                        norm.push(ch);
                        norm_ok.extend(std::iter::repeat_n(ok[pos], ch.len_utf8()));
                    }
                    self.encode_normalized_fast(&norm, &norm_ok, &mut ids)?;
                }
            }
        }
        Ok(ids)
    }

    /// tokenizers 0.13.3 matches `<s>`, `</s>`, `<unk>` (normalized added tokens) against the
    /// normalized text using their normalized form, which carries the `▁` prefix.
    fn encode_normalized_fast(&self, norm: &str, ok: &[bool], ids: &mut Vec<u32>) -> Result<()> {
        const PATTERNS: [(&str, u32); 3] = [("▁<unk>", 0), ("▁</s>", 2), ("▁<s>", 1)];
        let mut start = 0;
        let mut i = 0;
        while i < norm.len() {
            if norm[i..].starts_with(SPIECE) {
                let hit = PATTERNS.iter().find(|(p, _)| {
                    norm[i..].starts_with(p) && ok[i + SPIECE.len_utf8()..i + p.len()].iter().all(|b| *b)
                });
                if let Some((p, id)) = hit {
                    if start < i {
                        self.bpe_into(&norm[start..i], ids)?;
                    }
                    ids.push(*id);
                    i += p.len();
                    start = i;
                    continue;
                }
            }
            i += norm[i..].chars().next().map_or(1, char::len_utf8);
        }
        if start < norm.len() {
            self.bpe_into(&norm[start..], ids)?;
        }
        Ok(())
    }

    fn bpe_into(&self, normalized: &str, ids: &mut Vec<u32>) -> Result<()> {
        let tokens = self
            .bpe
            .tokenize(normalized)
            .map_err(|e| Error::Tokenizer(format!("BPE: {e}")))?;
        ids.extend(tokens.into_iter().map(|t| t.id));
        Ok(())
    }

    /// Decodes ids to text, as the reference's `decode(ids, skip_special_tokens=…)` does.
    ///
    /// Slow: added tokens are joined to the text around them with single spaces
    /// (`spaces_between_special_tokens=True`); fast: tokens are concatenated. Ids outside the
    /// vocabulary are an error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        for &id in ids {
            if id as usize >= self.vocab_size() {
                return Err(Error::InvalidArgument(format!(
                    "token id {id} is outside the {} vocabulary",
                    self.vocab_size()
                )));
            }
        }
        let is_special = |id: u32| id <= 2 || id >= LLAMA_VOCAB;
        let ids: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|id| !(skip_special_tokens && is_special(*id)))
            .collect();
        Ok(match self.compat {
            Compat::Slow => self.decode_slow(&ids),
            Compat::Fast => self.decode_fast(&ids),
        })
    }

    fn decode_slow(&self, ids: &[u32]) -> String {
        let mut sub_texts: Vec<String> = Vec::new();
        let mut current: Vec<u32> = Vec::new();
        for &id in ids {
            if id >= LLAMA_VOCAB {
                if !current.is_empty() {
                    sub_texts.push(self.tokens_to_string_slow(&current));
                    current.clear();
                }
                sub_texts.push(self.id_to_token(id).unwrap_or_default().into_owned());
            } else {
                current.push(id);
            }
        }
        if !current.is_empty() {
            sub_texts.push(self.tokens_to_string_slow(&current));
        }
        sub_texts.join(" ")
    }

    /// LlamaTokenizer.convert_tokens_to_string (4.31).
    fn tokens_to_string_slow(&self, ids: &[u32]) -> String {
        let mut out = String::new();
        let mut run: Vec<u32> = Vec::new();
        let mut prev_is_special = false;
        for (i, &id) in ids.iter().enumerate() {
            if id <= 2 {
                if !prev_is_special && i != 0 {
                    out.push(' ');
                }
                out.push_str(&self.sp_decode(&run));
                out.push_str(&self.pieces[id as usize]);
                prev_is_special = true;
                run.clear();
            } else {
                run.push(id);
                prev_is_special = false;
            }
        }
        out.push_str(&self.sp_decode(&run));
        out
    }

    /// SentencePiece `DecodeIds`: byte pieces are gathered and decoded as UTF-8 (one U+FFFD per
    /// invalid byte), `▁` becomes a space, and the very first non-control piece loses one
    /// leading `▁` (the dummy prefix).
    fn sp_decode(&self, ids: &[u32]) -> String {
        let mut out = String::new();
        let mut bytes: Vec<u8> = Vec::new();
        let mut bos_ws = true;
        for &id in ids {
            let piece = self.pieces[id as usize].as_str();
            if self.control[id as usize] {
                continue;
            }
            if let Some(b) = byte_piece(piece) {
                bytes.push(b);
                bos_ws = false;
                continue;
            }
            push_utf8_lossy_per_byte(&bytes, &mut out);
            bytes.clear();
            let piece = if id == 0 {
                " \u{2047} "
            } else if bos_ws {
                piece.strip_prefix(SPIECE).unwrap_or(piece)
            } else {
                piece
            };
            bos_ws = false;
            out.extend(piece.chars().map(|c| if c == SPIECE { ' ' } else { c }));
        }
        push_utf8_lossy_per_byte(&bytes, &mut out);
        out
    }

    /// The tokenizer.json decoder of LLaMA: `▁` → space, byte fallback, fuse, strip one
    /// leading space.
    fn decode_fast(&self, ids: &[u32]) -> String {
        let mut out = String::new();
        let mut bytes: Vec<u8> = Vec::new();
        for &id in ids {
            let token = self.id_to_token(id).unwrap_or_default();
            if let Some(b) = byte_piece(&token) {
                bytes.push(b);
                continue;
            }
            flush_byte_fallback(&mut bytes, &mut out);
            out.extend(token.chars().map(|c| if c == SPIECE { ' ' } else { c }));
        }
        flush_byte_fallback(&mut bytes, &mut out);
        match out.strip_prefix(' ') {
            Some(rest) => rest.to_string(),
            None => out,
        }
    }
}

#[derive(Debug, Clone)]
enum Chunk {
    Special(SpecialToken),
    /// Text; the flag says whether `<s>`/`</s>`/`<unk>` in it may be read as tokens in fast
    /// mode (true only for template or explicit-markup text).
    Text(String, bool),
}

enum FastChunk {
    Special(SpecialToken),
    Text(String, Vec<bool>),
}

fn merge_text(chunks: Vec<Chunk>) -> Vec<Chunk> {
    let mut out: Vec<Chunk> = Vec::with_capacity(chunks.len());
    for c in chunks {
        match (out.last_mut(), c) {
            (Some(Chunk::Text(prev, _)), Chunk::Text(s, _)) => prev.push_str(&s),
            (_, c) => out.push(c),
        }
    }
    out
}

/// Python's `str.isspace`, which `str.strip()` uses: Unicode White_Space plus the four
/// information separators U+001C..U+001F.
pub(crate) fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// SentencePiece: each byte that does not start a valid UTF-8 sequence becomes U+FFFD.
fn push_utf8_lossy_per_byte(bytes: &[u8], out: &mut String) {
    let mut rest = bytes;
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                return;
            }
            Err(e) => {
                let good = e.valid_up_to();
                out.push_str(std::str::from_utf8(&rest[..good]).unwrap_or_default());
                out.push('\u{FFFD}');
                rest = &rest[good + 1..];
            }
        }
    }
}

/// tokenizers' ByteFallback decoder: a run of byte tokens that is not valid UTF-8 as a whole
/// becomes one U+FFFD per byte.
fn flush_byte_fallback(bytes: &mut Vec<u8>, out: &mut String) {
    if bytes.is_empty() {
        return;
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => out.push_str(s),
        Err(_) => out.extend(std::iter::repeat_n('\u{FFFD}', bytes.len())),
    }
    bytes.clear();
}
