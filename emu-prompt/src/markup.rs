//! A plain-text markup for writing prompts on the command line.
//!
//! Text is text. Braces introduce an element:
//!
//! | markup | meaning |
//! |---|---|
//! | `{image PATH}` | an image |
//! | `{video PATH PATH …}` | a video, by its (already sampled) frames |
//! | `{object box=X1,Y1,X2,Y2 phrase=TEXT subject=PATH}` | a grounded object for Emu2-Gen; `phrase` and `subject` are optional, the box is in pixels of the 448×448 mask canvas |
//! | `{text TEXT}` | text given as a value (for text a plain run cannot express, see below) |
//! | `{user}`, `{assistant}` | start an Emu2-Chat turn |
//! | `{{`, `}}` | a literal `{`, `}` |
//!
//! A value is a bare word (no whitespace, `{`, `}`, `"` or `=`) or a double-quoted string in
//! which `\"`, `\\`, `\n` and `\t` are escapes. Inside an element, whitespace separates values.
//!
//! Without turn markers the whole markup is one user turn and every character of text counts,
//! whitespace included. With turn markers, the whitespace around each marker is layout and not
//! part of a turn, so a conversation can be written one turn per line; text before the first
//! marker (if any) is a user turn. `{text " leading space"}` keeps such whitespace when it is
//! wanted. Example:
//!
//! ```text
//! {user} {image dog.jpg}What animal is this?
//! {assistant} A dog.
//! {user} What colour is it?
//! ```
//!
//! [`to_markup`] writes a [`Prompt`] back; `parse(to_markup(p)) == p` for every prompt with at
//! least one turn (a prompt without turns is written as the empty string, which reads back as
//! one empty user turn).
//! Errors carry the byte offset, line and column (1-based, in characters) and say what was
//! expected.

use crate::error::{Error, Result};
use crate::prompt::{GroundedObject, Item, Prompt, Role, Turn, Video};

/// Parses markup into a prompt.
pub fn parse(src: &str) -> Result<Prompt> {
    Parser { src, pos: 0 }.markup()
}

struct Parser<'a> {
    src: &'a str,
    pos: usize,
}

enum Token {
    Text(String),
    Item(Item),
    Turn(Role),
}

impl Parser<'_> {
    fn err<T>(&self, at: usize, message: impl Into<String>) -> Result<T> {
        let before = &self.src[..at];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Err(Error::Markup {
            offset: at,
            line,
            column,
            message: message.into(),
        })
    }

    fn peek(&self) -> Option<char> {
        self.src[self.pos..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn markup(&mut self) -> Result<Prompt> {
        let mut tokens: Vec<Token> = Vec::new();
        let mut text = String::new();
        while let Some(c) = self.peek() {
            match c {
                '{' if self.src[self.pos..].starts_with("{{") => {
                    self.pos += 2;
                    text.push('{');
                }
                '}' if self.src[self.pos..].starts_with("}}") => {
                    self.pos += 2;
                    text.push('}');
                }
                '}' => return self.err(self.pos, "unmatched '}' (write '}}' for a literal brace)"),
                '{' => {
                    if !text.is_empty() {
                        tokens.push(Token::Text(std::mem::take(&mut text)));
                    }
                    tokens.push(self.element()?);
                }
                _ => {
                    self.bump();
                    text.push(c);
                }
            }
        }
        if !text.is_empty() {
            tokens.push(Token::Text(text));
        }
        Ok(assemble(tokens))
    }

    fn skip_ws(&mut self) -> bool {
        let start = self.pos;
        while self.peek().is_some_and(char::is_whitespace) {
            self.bump();
        }
        self.pos > start
    }

    fn element(&mut self) -> Result<Token> {
        let open = self.pos;
        self.bump(); // '{'
        self.skip_ws();
        let name_at = self.pos;
        let name = self.bare_word();
        if name.is_empty() {
            return self.err(
                name_at,
                "expected an element name: image, video, object, text, user or assistant",
            );
        }
        let mut args: Vec<(usize, Option<String>, String)> = Vec::new();
        loop {
            let had_ws = self.skip_ws();
            match self.peek() {
                None => return self.err(open, format!("unclosed '{{{name}': expected '}}'")),
                Some('}') => {
                    self.bump();
                    break;
                }
                Some(_) if !had_ws => return self.err(self.pos, "expected whitespace or '}'"),
                Some(_) => {
                    let at = self.pos;
                    let first = self.value()?;
                    if self.peek() == Some('=') {
                        self.bump();
                        if !matches!(self.peek(), Some(c) if !c.is_whitespace() && c != '}') {
                            return self.err(self.pos, format!("expected a value after '{first}='"));
                        }
                        let v = self.value()?;
                        args.push((at, Some(first), v));
                    } else {
                        args.push((at, None, first));
                    }
                }
            }
        }
        let positional = |p: &Self, n: Option<usize>| -> Result<Vec<String>> {
            if let Some((at, Some(k), _)) = args.iter().find(|a| a.1.is_some()) {
                return p.err(*at, format!("'{name}' takes no '{k}=' argument"));
            }
            let vals: Vec<String> = args.iter().map(|a| a.2.clone()).collect();
            match n {
                Some(n) if vals.len() != n => {
                    p.err(name_at, format!("'{name}' takes {n} value(s), found {}", vals.len()))
                }
                None if vals.is_empty() => p.err(name_at, format!("'{name}' needs at least one value")),
                _ => Ok(vals),
            }
        };
        Ok(match name.as_str() {
            "image" => Token::Item(Item::Image(positional(self, Some(1))?.remove(0))),
            "text" => Token::Item(Item::Text(positional(self, Some(1))?.remove(0))),
            "video" => Token::Item(Item::Video(Video {
                frames: positional(self, None)?,
            })),
            "user" | "assistant" => {
                if let Some((at, _, _)) = args.first() {
                    return self.err(*at, format!("'{name}' takes no values: expected '}}'"));
                }
                Token::Turn(if name == "user" { Role::User } else { Role::Assistant })
            }
            "object" => Token::Item(Item::Object(self.object(name_at, &args)?)),
            _ => {
                return self.err(
                    name_at,
                    format!("unknown element '{name}': expected image, video, object, text, user or assistant"),
                )
            }
        })
    }

    fn object(&self, name_at: usize, args: &[(usize, Option<String>, String)]) -> Result<GroundedObject> {
        let mut phrase = None;
        let mut subject = None;
        let mut bbox = None;
        for (at, key, val) in args {
            let Some(key) = key else {
                return self.err(*at, "expected box=, phrase= or subject= in 'object'");
            };
            let slot_taken = match key.as_str() {
                "phrase" => phrase.replace(val.clone()).is_some(),
                "subject" => subject.replace(val.clone()).is_some(),
                "box" => bbox.replace(self.parse_box(*at + 4, val)?).is_some(),
                _ => return self.err(*at, format!("unknown key '{key}': expected box, phrase or subject")),
            };
            if slot_taken {
                return self.err(*at, format!("'{key}' given twice"));
            }
        }
        let Some(bbox) = bbox else {
            return self.err(name_at, "'object' needs box=X1,Y1,X2,Y2");
        };
        Ok(GroundedObject { phrase, bbox, subject })
    }

    fn parse_box(&self, at: usize, val: &str) -> Result<[i64; 4]> {
        let parts: Vec<&str> = val.split(',').collect();
        if parts.len() != 4 {
            return self.err(
                at,
                format!("expected four comma-separated integers X1,Y1,X2,Y2, found {val:?}"),
            );
        }
        let mut out = [0i64; 4];
        for (k, p) in parts.iter().enumerate() {
            out[k] = match p.trim().parse::<i64>() {
                Ok(v) => v,
                Err(_) => return self.err(at, format!("box coordinate {} is {p:?}: expected an integer", k + 1)),
            };
        }
        Ok(out)
    }

    fn bare_word(&mut self) -> String {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| !c.is_whitespace() && !matches!(c, '{' | '}' | '"' | '='))
        {
            self.bump();
        }
        self.src[start..self.pos].to_string()
    }

    fn value(&mut self) -> Result<String> {
        if self.peek() != Some('"') {
            let at = self.pos;
            let w = self.bare_word();
            if w.is_empty() {
                return self.err(at, "expected a value (a bare word or a \"quoted string\")");
            }
            return Ok(w);
        }
        let open = self.pos;
        self.bump();
        let mut out = String::new();
        loop {
            match self.bump() {
                None => return self.err(open, "unterminated quoted string: expected '\"'"),
                Some('"') => break,
                Some('\\') => {
                    let at = self.pos - 1;
                    match self.bump() {
                        Some('"') => out.push('"'),
                        Some('\\') => out.push('\\'),
                        Some('n') => out.push('\n'),
                        Some('t') => out.push('\t'),
                        _ => return self.err(at, "unknown escape: expected \\\", \\\\, \\n or \\t"),
                    }
                }
                Some(c) => out.push(c),
            }
        }
        if matches!(self.peek(), Some(c) if !c.is_whitespace() && c != '}' && c != '=') {
            return self.err(self.pos, "expected whitespace or '}' after a quoted string");
        }
        Ok(out)
    }
}

fn assemble(tokens: Vec<Token>) -> Prompt {
    let has_turns = tokens.iter().any(|t| matches!(t, Token::Turn(_)));
    if !has_turns {
        let items = tokens
            .into_iter()
            .filter_map(|t| match t {
                Token::Text(s) => Some(Item::Text(s)),
                Token::Item(i) => Some(i),
                Token::Turn(_) => None,
            })
            .collect();
        return Prompt::new(items);
    }
    // Whitespace next to a turn marker (or at either end) is layout.
    let n = tokens.len();
    let is_turn = |k: usize| k < n && matches!(tokens[k], Token::Turn(_));
    let mut turns: Vec<Turn> = Vec::new();
    for (k, tok) in tokens.iter().enumerate() {
        match tok {
            Token::Turn(role) => turns.push(Turn {
                role: *role,
                items: Vec::new(),
            }),
            Token::Text(s) => {
                let mut s = s.as_str();
                if k == 0 || is_turn(k - 1) {
                    s = s.trim_start_matches(char::is_whitespace);
                }
                if k + 1 == n || is_turn(k + 1) {
                    s = s.trim_end_matches(char::is_whitespace);
                }
                if s.is_empty() {
                    continue;
                }
                if turns.is_empty() {
                    turns.push(Turn {
                        role: Role::User,
                        items: Vec::new(),
                    });
                }
                if let Some(t) = turns.last_mut() {
                    t.items.push(Item::Text(s.to_string()));
                }
            }
            Token::Item(item) => {
                if turns.is_empty() {
                    turns.push(Turn {
                        role: Role::User,
                        items: Vec::new(),
                    });
                }
                if let Some(t) = turns.last_mut() {
                    t.items.push(item.clone());
                }
            }
        }
    }
    Prompt { turns }
}

/// Writes a prompt as markup; [`parse`] reads it back to the same prompt.
pub fn to_markup(prompt: &Prompt) -> String {
    let markers = !(prompt.turns.len() == 1 && prompt.turns[0].role == Role::User);
    let mut out = String::new();
    for (k, turn) in prompt.turns.iter().enumerate() {
        if markers {
            if k > 0 {
                out.push('\n');
            }
            out.push_str(match turn.role {
                Role::User => "{user} ",
                Role::Assistant => "{assistant} ",
            });
        }
        let n = turn.items.len();
        for (i, item) in turn.items.iter().enumerate() {
            match item {
                Item::Text(s) => {
                    let after_text = i > 0 && matches!(turn.items[i - 1], Item::Text(_));
                    let edge_ws = markers
                        && ((i == 0 && s.starts_with(char::is_whitespace))
                            || (i + 1 == n && s.ends_with(char::is_whitespace)));
                    if s.is_empty() || after_text || edge_ws || (markers && s.chars().all(char::is_whitespace)) {
                        out.push_str("{text ");
                        out.push_str(&value(s));
                        out.push('}');
                    } else {
                        for c in s.chars() {
                            match c {
                                '{' => out.push_str("{{"),
                                '}' => out.push_str("}}"),
                                c => out.push(c),
                            }
                        }
                    }
                }
                Item::Image(p) => {
                    out.push_str("{image ");
                    out.push_str(&value(p));
                    out.push('}');
                }
                Item::Video(v) => {
                    out.push_str("{video");
                    for f in &v.frames {
                        out.push(' ');
                        out.push_str(&value(f));
                    }
                    out.push('}');
                }
                Item::Object(o) => {
                    let [a, b, c, d] = o.bbox;
                    out.push_str(&format!("{{object box={a},{b},{c},{d}"));
                    if let Some(p) = &o.phrase {
                        out.push_str(" phrase=");
                        out.push_str(&value(p));
                    }
                    if let Some(s) = &o.subject {
                        out.push_str(" subject=");
                        out.push_str(&value(s));
                    }
                    out.push('}');
                }
            }
        }
    }
    out
}

fn value(s: &str) -> String {
    let bare = !s.is_empty()
        && s.chars()
            .all(|c| !c.is_whitespace() && !matches!(c, '{' | '}' | '"' | '=' | '\\'));
    if bare {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
