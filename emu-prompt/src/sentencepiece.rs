//! Loading a SentencePiece `tokenizer.model` (the layout BAAI/Emu2 and BAAI/Emu2-Chat ship:
//! `tokenizer.model` + `added_tokens.json` + `tokenizer_config.json`, no `tokenizer.json`).
//!
//! The model file is a protobuf `ModelProto`; the few fields needed are read by hand:
//!
//! ```text
//! ModelProto      1: repeated SentencePiece pieces   2: TrainerSpec   3: NormalizerSpec
//! SentencePiece   1: string piece   2: float score   3: enum type (1 normal, 2 unknown,
//!                 3 control, 4 user-defined, 5 unused, 6 byte)
//! TrainerSpec     3: enum model_type (2 = BPE)   35: bool byte_fallback
//! NormalizerSpec  1: string name   3: bool add_dummy_prefix (default true)
//!                 4: bool remove_extra_whitespaces (default true)   5: bool escape_whitespaces (default true)
//! ```
//!
//! The pieces become a byte-fallback BPE the way HF's `LlamaConverter` /
//! `SentencePieceExtractor` (transformers 4.31) build `tokenizer.json`: the vocabulary is the
//! pieces by id, and every split of a piece with a non-zero score into two pieces of the
//! vocabulary is a merge, ranked by that score (higher first; ties in the converter's
//! iteration order, by left id then right id). With LLaMA's normalizer (`identity`, dummy
//! prefix, no whitespace folding) the encoder then runs the slow-tokenizer rules of
//! [`crate::tokenizer`]; only that normalizer is supported, anything else is an error.

use std::path::Path;

use tokenizers::models::bpe::{Vocab, BPE};

use crate::error::{Error, Result};
use crate::special::{Variant, LLAMA_VOCAB};
use crate::tokenizer::Emu2Tokenizer;

/// The type of a SentencePiece piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    /// An ordinary piece.
    Normal,
    /// `<unk>`.
    Unknown,
    /// `<s>`, `</s>`.
    Control,
    /// A piece the user added at training time.
    UserDefined,
    /// Never produced.
    Unused,
    /// `<0xXX>` byte-fallback piece.
    Byte,
}

/// One vocabulary entry.
#[derive(Debug, Clone, PartialEq)]
pub struct SpPiece {
    /// The piece text (`▁` for spaces).
    pub piece: String,
    /// Its score (for BPE: higher merges first).
    pub score: f32,
    /// Its type.
    pub kind: PieceType,
}

/// The parts of a `ModelProto` a LLaMA tokenizer needs.
#[derive(Debug, Clone, PartialEq)]
pub struct SentencePieceModel {
    /// Pieces by id.
    pub pieces: Vec<SpPiece>,
    /// `trainer_spec.model_type` (1 unigram, 2 BPE, 3 word, 4 char).
    pub model_type: u64,
    /// `trainer_spec.byte_fallback`.
    pub byte_fallback: bool,
    /// `normalizer_spec.name`.
    pub normalizer: String,
    /// `normalizer_spec.add_dummy_prefix`.
    pub add_dummy_prefix: bool,
    /// `normalizer_spec.remove_extra_whitespaces`.
    pub remove_extra_whitespaces: bool,
    /// `normalizer_spec.escape_whitespaces`.
    pub escape_whitespaces: bool,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Tokenizer(format!("tokenizer.model: {}", msg.into()))
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

enum Field<'a> {
    Varint(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
    Other,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).ok_or_else(|| bad("truncated varint"))?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(bad("varint longer than 10 bytes"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| bad("field runs past the end of the message"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn next(&mut self) -> Result<Option<(u64, Field<'a>)>> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = key >> 3;
        let value = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Field::Other
            }
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|_| bad("length overflow"))?;
                Field::Bytes(self.take(n)?)
            }
            5 => {
                let b = self.take(4)?;
                Field::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            w => return Err(bad(format!("unsupported wire type {w} (field {field})"))),
        };
        Ok(Some((field, value)))
    }
}

fn string(b: &[u8], what: &str) -> Result<String> {
    String::from_utf8(b.to_vec()).map_err(|_| bad(format!("{what} is not UTF-8")))
}

impl SentencePieceModel {
    /// Parses a serialized `ModelProto`.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut m = SentencePieceModel {
            pieces: Vec::new(),
            model_type: 1,
            byte_fallback: false,
            normalizer: String::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        };
        let mut r = Reader { buf: bytes, pos: 0 };
        while let Some((field, value)) = r.next()? {
            match (field, value) {
                (1, Field::Bytes(b)) => m.pieces.push(parse_piece(b, m.pieces.len())?),
                (2, Field::Bytes(b)) => {
                    let mut t = Reader { buf: b, pos: 0 };
                    while let Some((f, v)) = t.next()? {
                        match (f, v) {
                            (3, Field::Varint(x)) => m.model_type = x,
                            (35, Field::Varint(x)) => m.byte_fallback = x != 0,
                            _ => {}
                        }
                    }
                }
                (3, Field::Bytes(b)) => {
                    let mut n = Reader { buf: b, pos: 0 };
                    while let Some((f, v)) = n.next()? {
                        match (f, v) {
                            (1, Field::Bytes(s)) => m.normalizer = string(s, "normalizer name")?,
                            (3, Field::Varint(x)) => m.add_dummy_prefix = x != 0,
                            (4, Field::Varint(x)) => m.remove_extra_whitespaces = x != 0,
                            (5, Field::Varint(x)) => m.escape_whitespaces = x != 0,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(m)
    }

    /// Reads and parses a `tokenizer.model` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = Error::read_file(path)?;
        if bytes.is_empty() {
            return Err(Error::Tokenizer(format!("{}: the file is empty", path.display())));
        }
        Self::parse(&bytes).map_err(|e| match e {
            Error::Tokenizer(m) => Error::Tokenizer(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    /// Checks that this is a LLaMA-style model this crate reproduces exactly.
    fn check_llama(&self) -> Result<()> {
        if self.model_type != 2 {
            return Err(bad(format!("model_type {} is not BPE (2)", self.model_type)));
        }
        if !self.byte_fallback {
            return Err(bad("byte_fallback is off; LLaMA tokenizers use it"));
        }
        let llama_normalizer = self.normalizer == "identity"
            && self.add_dummy_prefix
            && !self.remove_extra_whitespaces
            && self.escape_whitespaces;
        if !llama_normalizer {
            return Err(bad(format!(
                "normalizer {:?} (add_dummy_prefix {}, remove_extra_whitespaces {}, escape_whitespaces {}) \
                 is not LLaMA's (identity, true, false, true)",
                self.normalizer, self.add_dummy_prefix, self.remove_extra_whitespaces, self.escape_whitespaces
            )));
        }
        if self.pieces.len() != LLAMA_VOCAB as usize {
            return Err(bad(format!("{} pieces; LLaMA has {LLAMA_VOCAB}", self.pieces.len())));
        }
        let expect = [
            ("<unk>", PieceType::Unknown),
            ("<s>", PieceType::Control),
            ("</s>", PieceType::Control),
        ];
        for (id, (text, kind)) in expect.iter().enumerate() {
            let p = &self.pieces[id];
            if p.piece != *text || p.kind != *kind {
                return Err(bad(format!(
                    "piece {id} is {:?} ({:?}), expected {text:?}",
                    p.piece, p.kind
                )));
            }
        }
        Ok(())
    }

    /// The BPE merges HF's converter derives, best first.
    pub fn bpe_merges(&self) -> Vec<(String, String)> {
        let ids: std::collections::HashMap<&str, usize> = self
            .pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (p.piece.as_str(), i))
            .collect();
        // (score of the merged piece, left id, right id); the converter gives <unk>, <s>, </s>
        // score 0, and a zero score never makes a merge (`if piece_score:`).
        let mut merges: Vec<(f32, usize, usize)> = Vec::new();
        for (id, p) in self.pieces.iter().enumerate() {
            let score = if id < 3 { 0.0 } else { p.score };
            if score == 0.0 {
                continue;
            }
            for (k, _) in p.piece.char_indices().skip(1) {
                let (l, r) = p.piece.split_at(k);
                if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                    merges.push((score, li, ri));
                }
            }
        }
        merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        merges
            .into_iter()
            .map(|(_, l, r)| (self.pieces[l].piece.clone(), self.pieces[r].piece.clone()))
            .collect()
    }

    fn to_bpe(&self) -> Result<BPE> {
        let vocab: Vocab = self
            .pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (p.piece.clone(), i as u32))
            .collect();
        BPE::builder()
            .vocab_and_merges(vocab, self.bpe_merges())
            .unk_token("<unk>".into())
            .fuse_unk(true)
            .byte_fallback(true)
            .build()
            .map_err(|e| bad(format!("building the BPE model: {e}")))
    }
}

fn parse_piece(b: &[u8], index: usize) -> Result<SpPiece> {
    let mut r = Reader { buf: b, pos: 0 };
    let mut piece = SpPiece {
        piece: String::new(),
        score: 0.0,
        kind: PieceType::Normal,
    };
    while let Some((f, v)) = r.next()? {
        match (f, v) {
            (1, Field::Bytes(s)) => piece.piece = string(s, &format!("piece {index}"))?,
            (2, Field::Fixed32(x)) => piece.score = f32::from_bits(x),
            (3, Field::Varint(t)) => {
                piece.kind = match t {
                    1 => PieceType::Normal,
                    2 => PieceType::Unknown,
                    3 => PieceType::Control,
                    4 => PieceType::UserDefined,
                    5 => PieceType::Unused,
                    6 => PieceType::Byte,
                    _ => return Err(bad(format!("piece {index} has unknown type {t}"))),
                }
            }
            _ => {}
        }
    }
    Ok(piece)
}

/// Reads `added_tokens.json` (`{"[PAD]": 32000, "[IMG]": 32001, …}`).
fn read_added_tokens(path: &Path) -> Result<Vec<(u32, String)>> {
    let text = Error::read_file(path)?;
    let map: std::collections::BTreeMap<String, u32> = serde_json::from_slice(&text).map_err(|source| Error::Json {
        what: path.display().to_string(),
        source,
    })?;
    Ok(map.into_iter().map(|(k, v)| (v, k)).collect())
}

impl Emu2Tokenizer {
    /// Loads a SentencePiece `tokenizer.model`, converted to BPE in Rust (no Python), plus the
    /// `added_tokens.json` next to it when given. The added tokens, if any, must be Emu2's at
    /// their upstream ids; missing ones are added in upstream order.
    pub fn from_sentencepiece(model: impl AsRef<Path>, added_tokens: Option<&Path>, variant: Variant) -> Result<Self> {
        let path = model.as_ref();
        let named = |e: Error| match e {
            Error::Tokenizer(m) => Error::Tokenizer(format!("{}: {m}", path.display())),
            e => e,
        };
        let sp = SentencePieceModel::from_file(path)?;
        sp.check_llama().map_err(named)?;
        let added = match added_tokens {
            Some(p) => read_added_tokens(p)?,
            None => Vec::new(),
        };
        Self::from_bpe(sp.to_bpe().map_err(named)?, &added, variant)
    }
}
