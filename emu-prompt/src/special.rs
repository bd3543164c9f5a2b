//! Emu2's special tokens and their ids.
//!
//! Upstream (`Emu2/emu/lm.py`) adds, in one `add_special_tokens` call on top of the 32000-piece
//! LLaMA vocabulary: `[PAD]`, then `[IMG] [/IMG] <image> [gIMG] [/gIMG] [EOC] [VIDEO]`, then
//! `<grounding> <phrase> </phrase> <object> </object> </delimiter_of_multi_objects/> <REC>`, then
//! `<patch_index_0000>` … `<patch_index_0256>`, and for Emu2-Chat `[USER] [ASSISTANT]`. The ids
//! follow from that order (SPEC §3.2).

use std::borrow::Cow;

/// Which checkpoint family the vocabulary belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// Emu2 and the Emu2-Gen multimodal encoder: 32272 tokens.
    Base,
    /// Emu2-Chat: 32274 tokens (adds `[USER]`, `[ASSISTANT]`).
    Chat,
}

impl Variant {
    /// Total vocabulary size including the added tokens.
    pub fn vocab_size(self) -> usize {
        match self {
            Variant::Base => 32272,
            Variant::Chat => 32274,
        }
    }
}

/// Size of the LLaMA SentencePiece vocabulary the Emu2 tokens are added to.
pub const LLAMA_VOCAB: u32 = 32000;
/// Number of `<patch_index_NNNN>` tokens (0000 to 0256).
pub const PATCH_INDEX_COUNT: u16 = 257;

/// One special token: LLaMA's own three, or one of the tokens Emu2 adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpecialToken {
    /// `<unk>` (0).
    Unk,
    /// `<s>` (1).
    Bos,
    /// `</s>` (2).
    Eos,
    /// `[PAD]` (32000).
    Pad,
    /// `[IMG]`, begin of image (32001).
    Img,
    /// `[/IMG]`, end of image (32002).
    ImgEnd,
    /// `<image>`, one visual-token slot (32003).
    Image,
    /// `[gIMG]`, one video-frame token slot (32004).
    GImg,
    /// `[/gIMG]` (32005).
    GImgEnd,
    /// `[EOC]` (32006).
    Eoc,
    /// `[VIDEO]`, start of a video (32007).
    Video,
    /// `<grounding>` (32008).
    Grounding,
    /// `<phrase>` (32009).
    Phrase,
    /// `</phrase>` (32010).
    PhraseEnd,
    /// `<object>` (32011).
    Object,
    /// `</object>` (32012).
    ObjectEnd,
    /// `</delimiter_of_multi_objects/>` (32013).
    Delimiter,
    /// `<REC>` (32014).
    Rec,
    /// `<patch_index_NNNN>`, N in 0..=256 (32015 + N).
    PatchIndex(u16),
    /// `[USER]` (32272, Emu2-Chat only).
    User,
    /// `[ASSISTANT]` (32273, Emu2-Chat only).
    Assistant,
}

const FIXED_ADDED: [(SpecialToken, &str); 15] = [
    (SpecialToken::Pad, "[PAD]"),
    (SpecialToken::Img, "[IMG]"),
    (SpecialToken::ImgEnd, "[/IMG]"),
    (SpecialToken::Image, "<image>"),
    (SpecialToken::GImg, "[gIMG]"),
    (SpecialToken::GImgEnd, "[/gIMG]"),
    (SpecialToken::Eoc, "[EOC]"),
    (SpecialToken::Video, "[VIDEO]"),
    (SpecialToken::Grounding, "<grounding>"),
    (SpecialToken::Phrase, "<phrase>"),
    (SpecialToken::PhraseEnd, "</phrase>"),
    (SpecialToken::Object, "<object>"),
    (SpecialToken::ObjectEnd, "</object>"),
    (SpecialToken::Delimiter, "</delimiter_of_multi_objects/>"),
    (SpecialToken::Rec, "<REC>"),
];

impl SpecialToken {
    /// The token's id in the Emu2 vocabulary.
    pub fn id(self) -> u32 {
        match self {
            SpecialToken::Unk => 0,
            SpecialToken::Bos => 1,
            SpecialToken::Eos => 2,
            SpecialToken::PatchIndex(n) => LLAMA_VOCAB + FIXED_ADDED.len() as u32 + n as u32,
            SpecialToken::User => 32272,
            SpecialToken::Assistant => 32273,
            other => {
                let pos = FIXED_ADDED.iter().position(|(t, _)| *t == other).unwrap_or_default();
                LLAMA_VOCAB + pos as u32
            }
        }
    }

    /// The token's text as it appears in upstream prompts.
    pub fn text(self) -> Cow<'static, str> {
        match self {
            SpecialToken::Unk => "<unk>".into(),
            SpecialToken::Bos => "<s>".into(),
            SpecialToken::Eos => "</s>".into(),
            SpecialToken::PatchIndex(n) => format!("<patch_index_{n:04}>").into(),
            SpecialToken::User => "[USER]".into(),
            SpecialToken::Assistant => "[ASSISTANT]".into(),
            other => FIXED_ADDED
                .iter()
                .find(|(t, _)| *t == other)
                .map(|(_, s)| *s)
                .unwrap_or_default()
                .into(),
        }
    }

    /// The token with this id, if it is a special token of `variant`.
    pub fn from_id(id: u32, variant: Variant) -> Option<SpecialToken> {
        match id {
            0 => Some(SpecialToken::Unk),
            1 => Some(SpecialToken::Bos),
            2 => Some(SpecialToken::Eos),
            32272 if variant == Variant::Chat => Some(SpecialToken::User),
            32273 if variant == Variant::Chat => Some(SpecialToken::Assistant),
            _ => {
                let k = id.checked_sub(LLAMA_VOCAB)? as usize;
                if k < FIXED_ADDED.len() {
                    Some(FIXED_ADDED[k].0)
                } else {
                    let n = k - FIXED_ADDED.len();
                    (n < PATCH_INDEX_COUNT as usize).then_some(SpecialToken::PatchIndex(n as u16))
                }
            }
        }
    }

    /// The tokens added on top of LLaMA's 32000 pieces, in upstream order (ids 32000, 32001, …).
    pub fn added(variant: Variant) -> Vec<SpecialToken> {
        let mut v: Vec<SpecialToken> = FIXED_ADDED.iter().map(|(t, _)| *t).collect();
        v.extend((0..PATCH_INDEX_COUNT).map(SpecialToken::PatchIndex));
        if variant == Variant::Chat {
            v.extend([SpecialToken::User, SpecialToken::Assistant]);
        }
        v
    }

    /// Every token the slow tokenizer never splits: LLaMA's three plus the added ones.
    pub fn all(variant: Variant) -> Vec<SpecialToken> {
        let mut v = vec![SpecialToken::Unk, SpecialToken::Bos, SpecialToken::Eos];
        v.extend(Self::added(variant));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_upstream_order() {
        for variant in [Variant::Base, Variant::Chat] {
            let added = SpecialToken::added(variant);
            assert_eq!(added.len() + LLAMA_VOCAB as usize, variant.vocab_size());
            for (k, t) in added.iter().enumerate() {
                assert_eq!(t.id(), LLAMA_VOCAB + k as u32, "{t:?}");
                assert_eq!(SpecialToken::from_id(t.id(), variant), Some(*t));
            }
        }
        assert_eq!(SpecialToken::Image.id(), 32003);
        assert_eq!(SpecialToken::Video.id(), 32007);
        assert_eq!(SpecialToken::Rec.id(), 32014);
        assert_eq!(SpecialToken::PatchIndex(0).id(), 32015);
        assert_eq!(SpecialToken::PatchIndex(256).id(), 32271);
        assert_eq!(SpecialToken::PatchIndex(7).text(), "<patch_index_0007>");
        assert_eq!(SpecialToken::from_id(32272, Variant::Base), None);
        assert_eq!(SpecialToken::from_id(32272, Variant::Chat), Some(SpecialToken::User));
        assert_eq!(SpecialToken::from_id(100, Variant::Chat), None);
    }
}
