//! Emu2 prompts, end to end up to token ids.
//!
//! * [`prompt`]: the typed prompt (text, images, videos, grounded objects, chat turns).
//! * [`markup`]: a plain-text markup for the command line and the same prompt as JSON.
//! * [`mod@render`]: model text for Emu2 (base), Emu2-Chat and Emu2-Gen, with image/video slots.
//! * [`tokenizer`]: the LLaMA tokenizer with Emu2's special tokens, token-for-token equal to
//!   upstream's slow `LlamaTokenizer` (or, as an option, to `LlamaTokenizerFast`).
//! * [`sentencepiece`]: loading `tokenizer.model` + `added_tokens.json` without Python.
//! * [`mask`]: grounding boxes drawn as the mask images Emu2-Gen takes.
//! * [`grounding`]: parsing Emu2-Chat's `[x1, y1, x2, y2]` answers back into pixel boxes.
//! * [`video`]: the demo's uniform frame sampling.
//!
//! ```no_run
//! use emu_prompt::{parse_markup, render, Emu2Tokenizer, ModelKind, RenderOptions, Variant};
//!
//! let prompt = parse_markup("{image dog.jpg}Describe the image in details:")?;
//! let rendered = render(&prompt, &RenderOptions::new(ModelKind::Emu2Chat))?;
//! let tok = Emu2Tokenizer::from_dir("Emu2-Chat", Variant::Chat)?;
//! let ids = tok.encode_pieces(&rendered.pieces)?; // <s> … [IMG] 256×<image> [/IMG] …
//! // rendered.images: what fills the <image> slots, in order.
//! # Ok::<(), emu_prompt::Error>(())
//! ```

pub mod error;
pub mod grounding;
pub mod markup;
pub mod mask;
pub mod prompt;
pub mod render;
pub mod sentencepiece;
pub mod special;
pub mod tokenizer;
pub mod video;

pub use error::{Error, Result};
pub use grounding::{parse_boxes, GroundedBox, Grounding};
pub use markup::{parse as parse_markup, to_markup};
pub use mask::BoxMask;
pub use prompt::{GroundedObject, Item, Prompt, Role, Turn, Video};
pub use render::{render, ModelKind, RenderOptions, Rendered, VisualInput};
pub use special::{SpecialToken, Variant};
pub use tokenizer::{Compat, Emu2Tokenizer, Piece};
