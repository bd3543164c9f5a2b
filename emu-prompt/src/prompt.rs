//! The typed prompt: an ordered sequence of text, images, videos and grounded objects, in one
//! or more chat turns.
//!
//! The same structure is the JSON format (serde):
//!
//! ```json
//! {"turns": [{"role": "user", "items": [
//!     {"text": "An oil painting of three dogs,"},
//!     {"image": "dog.jpg"},
//!     {"video": {"frames": ["f0.jpg", "f1.jpg"]}},
//!     {"object": {"phrase": "the first dog", "box": [22, 14, 224, 224], "subject": "dog1.jpg"}}
//! ]}]}
//! ```
//!
//! Emu2 (base) and Emu2-Gen prompts are one user turn; Emu2-Chat conversations alternate user
//! and assistant turns and end with a user turn.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A whole prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prompt {
    /// The turns, in order. A prompt for Emu2 or Emu2-Gen has exactly one (user) turn.
    pub turns: Vec<Turn>,
}

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    /// Who speaks.
    pub role: Role,
    /// What is said, in order.
    pub items: Vec<Item>,
}

/// The speaker of a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The user (`[USER]`).
    User,
    /// The model (`[ASSISTANT]`).
    Assistant,
}

/// One element of a turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Item {
    /// Text, used verbatim. It is always tokenized as text: markup such as `[IMG]` or `</s>`
    /// inside it does not become special tokens.
    Text(String),
    /// An image, by path (or any name the caller resolves).
    Image(String),
    /// A video as its already-sampled frames (see [`crate::video::sample_frame_indices`]).
    Video(Video),
    /// A grounded object (Emu2-Gen): an optional phrase, a box, an optional subject image.
    Object(GroundedObject),
}

/// The frames of a video, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Video {
    /// Frame images, by path.
    pub frames: Vec<String>,
}

/// An object placed by a bounding box, for Emu2-Gen's grounded generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroundedObject {
    /// What the box contains (`<phrase>…</phrase>`); optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phrase: Option<String>,
    /// `[x1, y1, x2, y2]` in pixels of the 448×448 mask canvas. Upstream's demo clamps the
    /// coordinates to `[0, 448]` and sorts them, so any order and overshoot is accepted.
    #[serde(rename = "box")]
    pub bbox: [i64; 4],
    /// An image of the subject to put in the box; optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

impl Prompt {
    /// A one-turn (user) prompt.
    pub fn new(items: Vec<Item>) -> Self {
        Prompt {
            turns: vec![Turn {
                role: Role::User,
                items,
            }],
        }
    }

    /// Parses the JSON form.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|source| Error::Json {
            what: "prompt JSON".into(),
            source,
        })
    }

    /// The JSON form.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Every item of every turn, in order.
    pub fn items(&self) -> impl Iterator<Item = &Item> {
        self.turns.iter().flat_map(|t| t.items.iter())
    }
}
