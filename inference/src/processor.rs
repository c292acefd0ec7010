//! From chat messages and sampled videos to model input: the chat template (minijinja), video
//! placeholder expansion with timestamps (transformers 5.24 layout), tokenization and 3-D
//! position ids.

use std::sync::Arc;

use serde::Serialize;

use crate::Error;
use crate::config::Config;
use crate::files::ModelFiles;
use crate::positions::{PromptPositions, TokenKind, rope_index};

/// One part of a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    /// Text.
    Text(String),
    /// A video; the clips are passed alongside, in the order their parts appear.
    Video,
}

/// A message's content: a plain string or a list of parts.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Text and media parts.
    Parts(Vec<Part>),
}

/// A chat message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// What it says.
    pub content: Content,
}

impl Message {
    /// A message with plain text content.
    pub fn text(role: &str, text: &str) -> Self {
        Message { role: role.into(), content: Content::Text(text.into()) }
    }

    /// A user message with one video followed by text (the common case).
    pub fn user_video(text: &str) -> Self {
        Message { role: "user".into(), content: Content::Parts(vec![Part::Video, Part::Text(text.into())]) }
    }
}

#[derive(Serialize)]
struct TemplateMessage {
    role: String,
    content: serde_json::Value,
}

impl From<&Message> for TemplateMessage {
    fn from(m: &Message) -> Self {
        let content = match &m.content {
            Content::Text(t) => serde_json::Value::String(t.clone()),
            Content::Parts(parts) => serde_json::Value::Array(
                parts
                    .iter()
                    .map(|p| match p {
                        Part::Text(t) => serde_json::json!({"type": "text", "text": t}),
                        Part::Video => serde_json::json!({"type": "video", "video": "video"}),
                    })
                    .collect(),
            ),
        };
        TemplateMessage { role: m.role.clone(), content }
    }
}

/// What the processor needs to know of each video.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoMeta {
    /// `[grid_t, grid_h, grid_w]` in patches.
    pub grid_thw: [usize; 3],
    /// One timestamp (seconds) per temporal group.
    pub timestamps: Vec<f64>,
}

/// A tokenized prompt ready for prefill.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Which ids are placeholders.
    pub kinds: Vec<TokenKind>,
    /// 3-D positions and the decode delta.
    pub positions: PromptPositions,
    /// The expanded prompt text.
    pub text: String,
}

/// Special tokens the processor relies on, read from the model's files.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecialTokens {
    /// `<|video_pad|>` id and text.
    pub video_pad: (u32, String),
    /// `<|image_pad|>` id and text.
    pub image_pad: (u32, String),
    /// `<|vision_start|>` id and text.
    pub vision_start: (u32, String),
    /// `<|vision_end|>` id and text.
    pub vision_end: (u32, String),
}

/// Chat template, tokenizer and placeholder logic of one model.
pub struct Processor {
    tokenizer: tokenizers::Tokenizer,
    env: minijinja::Environment<'static>,
    special: SpecialTokens,
    template_vars: serde_json::Map<String, serde_json::Value>,
    merge: usize,
}

impl std::fmt::Debug for Processor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processor").field("special", &self.special).finish_non_exhaustive()
    }
}

fn raise_exception(msg: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
}

impl Processor {
    /// Builds the processor from a checkpoint's files.
    pub fn new(files: &ModelFiles, cfg: &Config) -> Result<Self, Error> {
        let tokenizer = tokenizers::Tokenizer::from_file(&files.tokenizer)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", files.tokenizer.display())))?;
        let token = |id: u32, what: &str| -> Result<(u32, String), Error> {
            tokenizer
                .id_to_token(id)
                .map(|t| (id, t))
                .ok_or_else(|| Error::Tokenizer(format!("{what} id {id} from config.json is not in the tokenizer")))
        };
        let special = SpecialTokens {
            video_pad: token(cfg.video_token_id, "video_token_id")?,
            image_pad: token(cfg.image_token_id, "image_token_id")?,
            vision_start: token(cfg.vision_start_token_id, "vision_start_token_id")?,
            vision_end: token(cfg.vision_end_token_id, "vision_end_token_id")?,
        };
        let mut env = minijinja::Environment::new();
        // transformers renders chat templates with trim_blocks and lstrip_blocks.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", files.chat_template.clone())
            .map_err(|e| Error::Template(format!("the chat template does not parse: {e}")))?;
        let mut template_vars = serde_json::Map::new();
        for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            let v = &files.tokenizer_config[key];
            let s = v.as_str().or_else(|| v["content"].as_str());
            if let Some(s) = s {
                template_vars.insert(key.into(), serde_json::Value::String(s.into()));
            }
        }
        Ok(Processor { tokenizer, env, special, template_vars, merge: cfg.vision_config.spatial_merge_size })
    }

    /// The special tokens in use.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// Renders the chat template (before placeholder expansion).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, Error> {
        let msgs: Vec<TemplateMessage> = messages.iter().map(TemplateMessage::from).collect();
        let mut ctx = self.template_vars.clone();
        ctx.insert("messages".into(), serde_json::to_value(msgs).map_err(|e| Error::Template(e.to_string()))?);
        ctx.insert("add_generation_prompt".into(), serde_json::Value::Bool(add_generation_prompt));
        let tpl = self.env.get_template("chat").map_err(|e| Error::Template(e.to_string()))?;
        tpl.render(minijinja::Value::from_serialize(&ctx))
            .map_err(|e| Error::Template(format!("rendering the chat template: {e}")))
    }

    /// The replacement for one video's placeholder: per temporal group
    /// `<{t:.1f} seconds>` + vision_start + pads + vision_end.
    fn video_expansion(&self, v: &VideoMeta) -> Result<String, Error> {
        let [t, h, w] = v.grid_thw;
        if v.timestamps.len() != t {
            return Err(Error::Input(format!("{} timestamps for {t} temporal groups", v.timestamps.len())));
        }
        if h % self.merge != 0 || w % self.merge != 0 {
            return Err(Error::Input(format!("grid {h}x{w} is not a multiple of the merge size")));
        }
        let per_group = h * w / (self.merge * self.merge);
        let pad = &self.special.video_pad.1;
        let mut s = String::with_capacity(t * (per_group * pad.len() + 64));
        for ts in &v.timestamps {
            s.push_str(&format!("<{ts:.1} seconds>"));
            s.push_str(&self.special.vision_start.1);
            for _ in 0..per_group {
                s.push_str(pad);
            }
            s.push_str(&self.special.vision_end.1);
        }
        Ok(s)
    }

    /// Renders, expands each video placeholder (transformers >= 5.10 layout: the template's own
    /// vision_start/vision_end stay around the expansion), tokenizes and computes positions.
    pub fn prepare(&self, messages: &[Message], videos: &[VideoMeta]) -> Result<Prompt, Error> {
        let rendered = self.render(messages, true)?;
        let pad = &self.special.video_pad.1;
        let pieces: Vec<&str> = rendered.split(pad.as_str()).collect();
        if pieces.len() - 1 != videos.len() {
            return Err(Error::Input(format!(
                "the prompt has {} video placeholders but {} videos were given",
                pieces.len() - 1,
                videos.len()
            )));
        }
        let mut text = String::from(pieces[0]);
        for (v, rest) in videos.iter().zip(&pieces[1..]) {
            text.push_str(&self.video_expansion(v)?);
            text.push_str(rest);
        }
        let enc = self.tokenizer.encode(text.as_str(), true).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let ids = enc.get_ids().to_vec();
        let kinds: Vec<TokenKind> = ids
            .iter()
            .map(|&id| {
                if id == self.special.video_pad.0 {
                    TokenKind::Video
                } else if id == self.special.image_pad.0 {
                    TokenKind::Image
                } else {
                    TokenKind::Text
                }
            })
            .collect();
        let grids: Vec<[usize; 3]> = videos.iter().map(|v| v.grid_thw).collect();
        let positions = rope_index(&kinds, &[], &grids, self.merge).map_err(Error::Input)?;
        Ok(Prompt { ids, kinds, positions, text })
    }

    /// Decodes ids to text, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, Error> {
        self.tokenizer.decode(ids, true).map_err(|e| Error::Tokenizer(e.to_string()))
    }
}

/// Streams text from generated ids without ever splitting a UTF-8 character: a piece is released
/// only once the decoded text no longer ends in a replacement character.
pub struct TokenStream {
    processor: Arc<Processor>,
    ids: Vec<u32>,
    prev: usize,
    current: usize,
}

impl TokenStream {
    /// A stream decoding with `processor`'s tokenizer.
    pub fn new(processor: Arc<Processor>) -> Self {
        TokenStream { processor, ids: Vec::new(), prev: 0, current: 0 }
    }

    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, Error> {
        let before = self.processor.decode(&self.ids[self.prev..self.current])?;
        self.ids.push(id);
        let now = self.processor.decode(&self.ids[self.prev..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.is_char_boundary(before.len()) {
            let piece = now[before.len()..].to_owned();
            self.prev = self.current;
            self.current = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// Whatever is still held back (an incomplete character at the very end), lossily.
    pub fn flush(&mut self) -> Result<Option<String>, Error> {
        let before = self.processor.decode(&self.ids[self.prev..self.current])?;
        let now = self.processor.decode(&self.ids[self.prev..])?;
        self.prev = self.ids.len();
        self.current = self.ids.len();
        if now.len() > before.len() && now.is_char_boundary(before.len()) {
            Ok(Some(now[before.len()..].to_owned()))
        } else {
            Ok(None)
        }
    }
}
