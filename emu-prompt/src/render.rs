//! Rendering a typed prompt into model text for each Emu2 model.
//!
//! * **Emu2** (base): plain interleaving, no template (few-shot in-context prompts,
//!   SPEC §3.6).
//! * **Emu2-Chat**: upstream's native template (`chat.py` `_prepare_chat_inputs`, demo
//!   `format_chat`, SPEC §3.5): the system message, ` [USER]: ` before the first turn,
//!   ` [ASSISTANT]: ` before an assistant turn, `</s>[USER]: ` before a later user turn, then
//!   ` [ASSISTANT]:` and, in grounding mode, `<grounding>` with the concise system message.
//! * **Emu2-Gen**: the items concatenated with no separator (`diffusion.py`), `<grounding>` in
//!   front when any object is present, each object as `<phrase>…</phrase><object>` + its box
//!   mask image + `</object>` + its subject image (the demo's list, SPEC §5.1), and a trailing
//!   `[IMG]` from which the 64 visual embeddings are regressed (SPEC §4.2).
//!
//! Every image becomes `[IMG]` + n_query × `<image>` + `[/IMG]`; a video becomes `[VIDEO]` and
//! per frame `[IMG]` + v_query × `[gIMG]` + `[/IMG]` (SPEC §3.4, §6).

use crate::error::{Error, Result};
use crate::mask::{BoxMask, CANVAS};
use crate::prompt::{Item, Prompt, Role};
use crate::special::SpecialToken;
use crate::tokenizer::Piece;

/// Emu2-Chat's default system message.
pub const SYSTEM: &str = "You are a helpful assistant, dedicated to delivering comprehensive and meticulous responses.";
/// Emu2-Chat's system message in grounding mode.
pub const GROUND_SYSTEM: &str = "You are a helpful assistant, dedicated to provide concise and efficient answers.";

/// Which model the prompt is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelKind {
    /// BAAI/Emu2, the pretrained base model.
    Emu2,
    /// BAAI/Emu2-Chat.
    Emu2Chat,
    /// BAAI/Emu2-Gen (its multimodal encoder).
    Emu2Gen,
}

/// How to render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderOptions {
    /// The model.
    pub kind: ModelKind,
    /// `<image>` slots per image: the config's `vision_config.n_query` (64; 256 for Emu2-Chat).
    pub n_query: usize,
    /// `[gIMG]` slots per video frame: `vision_config.v_query` (64).
    pub v_query: usize,
    /// Emu2-Chat grounding mode (concise system message, `<grounding>` after ` [ASSISTANT]:`).
    pub grounding: bool,
    /// Replaces Emu2-Chat's system message (upstream's depends on `grounding`).
    pub system: Option<String>,
}

impl RenderOptions {
    /// Upstream defaults for `kind`.
    pub fn new(kind: ModelKind) -> Self {
        RenderOptions {
            kind,
            n_query: if kind == ModelKind::Emu2Chat { 256 } else { 64 },
            v_query: 64,
            grounding: false,
            system: None,
        }
    }

    /// Sets Emu2-Chat grounding mode.
    pub fn grounding(mut self, on: bool) -> Self {
        self.grounding = on;
        self
    }
}

/// What fills one `<image>` block, in slot order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VisualInput {
    /// An image of the prompt (or an object's subject image), by path.
    Image(String),
    /// The mask image of a grounded object's box (see [`BoxMask::to_rgb`]).
    BoxMask(BoxMask),
}

/// A rendered prompt: the pieces to tokenize and the pictures that fill its slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// Template text, user text and special tokens, in order.
    pub pieces: Vec<Piece<'static>>,
    /// The pictures for the `[IMG]` blocks of `<image>` slots, in order (n_query slots each).
    pub images: Vec<VisualInput>,
    /// The video frames for the `[IMG]` blocks of `[gIMG]` slots, in order (v_query slots each).
    pub frames: Vec<String>,
}

impl Rendered {
    /// The model text with special tokens written out: the string upstream tokenizes.
    pub fn text(&self) -> String {
        let mut s = String::new();
        for p in &self.pieces {
            match p {
                Piece::Special(t) => s.push_str(&t.text()),
                Piece::Text(t) => s.push_str(t),
            }
        }
        s
    }
}

struct Builder<'o> {
    opts: &'o RenderOptions,
    out: Rendered,
}

impl Builder<'_> {
    fn text(&mut self, s: &str) {
        if !s.is_empty() {
            self.out.pieces.push(Piece::text(s));
        }
    }

    fn special(&mut self, t: SpecialToken) {
        self.out.pieces.push(Piece::Special(t));
    }

    fn image(&mut self, v: VisualInput) {
        self.special(SpecialToken::Img);
        for _ in 0..self.opts.n_query {
            self.special(SpecialToken::Image);
        }
        self.special(SpecialToken::ImgEnd);
        self.out.images.push(v);
    }

    fn items(&mut self, items: &[Item]) -> Result<()> {
        for item in items {
            match item {
                Item::Text(s) => self.text(s),
                Item::Image(path) => self.image(VisualInput::Image(path.clone())),
                Item::Video(v) => {
                    if self.opts.kind == ModelKind::Emu2Gen {
                        return Err(Error::Prompt("Emu2-Gen takes no video".into()));
                    }
                    if v.frames.is_empty() {
                        return Err(Error::Prompt("a video needs at least one frame".into()));
                    }
                    self.special(SpecialToken::Video);
                    for f in &v.frames {
                        self.special(SpecialToken::Img);
                        for _ in 0..self.opts.v_query {
                            self.special(SpecialToken::GImg);
                        }
                        self.special(SpecialToken::ImgEnd);
                        self.out.frames.push(f.clone());
                    }
                }
                Item::Object(o) => {
                    if self.opts.kind != ModelKind::Emu2Gen {
                        return Err(Error::Prompt(
                            "boxes are an Emu2-Gen input; Emu2 and Emu2-Chat take none (Emu2-Chat answers with boxes in grounding mode)".into(),
                        ));
                    }
                    let mask = BoxMask::from_demo(o.bbox);
                    if mask.left == mask.right || mask.top == mask.bottom {
                        // Upstream would draw a line or nothing: never what was meant.
                        let [a, b, c, d] = o.bbox;
                        return Err(Error::Prompt(format!(
                            "object box={a},{b},{c},{d} has no area on the {CANVAS}x{CANVAS} canvas \
                             (it is degenerate or lies outside 0..{CANVAS}); give X1,Y1,X2,Y2 with X1 != X2 and Y1 != Y2 inside it"
                        )));
                    }
                    if let Some(phrase) = &o.phrase {
                        self.special(SpecialToken::Phrase);
                        self.text(phrase);
                        self.special(SpecialToken::PhraseEnd);
                    }
                    self.special(SpecialToken::Object);
                    self.image(VisualInput::BoxMask(mask));
                    self.special(SpecialToken::ObjectEnd);
                    if let Some(subject) = &o.subject {
                        self.image(VisualInput::Image(subject.clone()));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Renders `prompt` for `opts.kind`.
pub fn render(prompt: &Prompt, opts: &RenderOptions) -> Result<Rendered> {
    if opts.n_query == 0 || opts.v_query == 0 {
        return Err(Error::InvalidArgument("n_query and v_query must be at least 1".into()));
    }
    let mut b = Builder {
        opts,
        out: Rendered {
            pieces: Vec::new(),
            images: Vec::new(),
            frames: Vec::new(),
        },
    };
    match opts.kind {
        ModelKind::Emu2Chat => {
            check_chat_roles(prompt)?;
            let system = match &opts.system {
                Some(s) => s.as_str(),
                None if opts.grounding => GROUND_SYSTEM,
                None => SYSTEM,
            };
            b.text(system);
            for (k, turn) in prompt.turns.iter().enumerate() {
                match (k, turn.role) {
                    (0, _) => b.text(" "),
                    (_, Role::Assistant) => {
                        b.text(" ");
                        b.special(SpecialToken::Assistant);
                        b.text(": ");
                        b.items(&turn.items)?;
                        continue;
                    }
                    (_, Role::User) => b.special(SpecialToken::Eos),
                }
                b.special(SpecialToken::User);
                b.text(": ");
                b.items(&turn.items)?;
            }
            b.text(" ");
            b.special(SpecialToken::Assistant);
            b.text(":");
            if opts.grounding {
                b.special(SpecialToken::Grounding);
            }
        }
        ModelKind::Emu2 | ModelKind::Emu2Gen => {
            if prompt.turns.len() != 1 || prompt.turns[0].role != Role::User {
                return Err(Error::Prompt(format!(
                    "{:?} prompts are one user turn; chat turns are for Emu2-Chat",
                    opts.kind
                )));
            }
            if opts.grounding {
                return Err(Error::Prompt("grounding mode is an Emu2-Chat option".into()));
            }
            let items = &prompt.turns[0].items;
            if opts.kind == ModelKind::Emu2Gen && items.iter().any(|i| matches!(i, Item::Object(_))) {
                b.special(SpecialToken::Grounding);
            }
            b.items(items)?;
            if opts.kind == ModelKind::Emu2Gen {
                b.special(SpecialToken::Img);
            }
        }
    }
    Ok(b.out)
}

fn check_chat_roles(prompt: &Prompt) -> Result<()> {
    if prompt.turns.is_empty() {
        return Err(Error::Prompt("a conversation needs at least one user turn".into()));
    }
    for (k, turn) in prompt.turns.iter().enumerate() {
        let want = if k % 2 == 0 { Role::User } else { Role::Assistant };
        if turn.role != want {
            return Err(Error::Prompt(format!(
                "turn {} is {:?}; turns alternate user/assistant starting with user",
                k + 1,
                turn.role
            )));
        }
    }
    if prompt.turns.len().is_multiple_of(2) {
        return Err(Error::Prompt(
            "a conversation must end with a user turn (the model answers next)".into(),
        ));
    }
    Ok(())
}
