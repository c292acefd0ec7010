//! Answers constrained while decoding: a choice, a regex, a JSON schema or any JSON object,
//! enforced with llguidance over the model's own tokenizer, and the decisions a caller can act
//! on before the answer is finished.
//!
//! - [`Grammars`] is built once per engine: the token trie of the tokenizer and llguidance's
//!   parser factory, with a small cache of compiled grammars (a monitor sends the same schema
//!   every window).
//! - [`Constrained`] is one request's state: the matcher, the bytes generated so far, and the
//!   decisions already reported. [`MaskWorker`] runs it on a helper thread so that the mask of
//!   the next step is computed while the model runs its forward pass.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, mpsc},
};

use llguidance::{
    Matcher, ParserFactory, TokenParser,
    api::TopLevelGrammar,
    toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv},
};

/// The shape an answer must have.
#[derive(Debug, Clone, PartialEq)]
pub enum AnswerSpec {
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A string the regex matches as a whole.
    Regex(String),
    /// JSON valid against this schema (the subset llguidance compiles; OpenAI's strict mode
    /// is inside it).
    JsonSchema(serde_json::Value),
    /// Any JSON object.
    JsonObject,
}

/// Most choices in a list.
pub const MAX_CHOICES: usize = 1024;

impl AnswerSpec {
    /// A stable key for the grammar cache.
    fn key(&self) -> String {
        match self {
            AnswerSpec::Choice(c) => format!("choice:{}", serde_json::Value::from(c.clone())),
            AnswerSpec::Regex(r) => format!("regex:{r}"),
            AnswerSpec::JsonSchema(s) => format!("schema:{s}"),
            AnswerSpec::JsonObject => "object".into(),
        }
    }

    /// The llguidance grammar. JSON is compact unless the schema sets its own `x-guidance`
    /// options: a model then cannot spend its tokens on whitespace.
    fn grammar(&self) -> Result<TopLevelGrammar, String> {
        let compact = serde_json::json!({"whitespace_flexible": false});
        Ok(match self {
            AnswerSpec::Choice(choices) => {
                if choices.is_empty() {
                    return Err("a choice needs at least one option".into());
                }
                if choices.len() > MAX_CHOICES {
                    return Err(format!("a choice has at most {MAX_CHOICES} options, got {}", choices.len()));
                }
                if let Some(i) = choices.iter().position(|c| c.is_empty()) {
                    return Err(format!("choice option {i} is empty"));
                }
                // Lark string literals take JSON's quoting.
                let options: Vec<String> =
                    choices.iter().map(|c| serde_json::Value::from(c.as_str()).to_string()).collect();
                TopLevelGrammar::from_lark(format!("start: {}", options.join(" | ")))
            }
            AnswerSpec::Regex(rx) => {
                if rx.is_empty() {
                    return Err("the regex is empty".into());
                }
                TopLevelGrammar::from_regex(rx)
            }
            AnswerSpec::JsonSchema(schema) => {
                let mut schema = schema.clone();
                if let Some(o) = schema.as_object_mut() {
                    o.entry("x-guidance").or_insert(compact);
                } else if !schema.is_boolean() {
                    return Err("a JSON schema must be an object".into());
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            AnswerSpec::JsonObject => {
                TopLevelGrammar::from_json_schema(serde_json::json!({"type": "object", "x-guidance": compact}))
            }
        })
    }
}

/// The tokenizer as llguidance sees it: every token's bytes (special tokens behind a marker
/// byte, ids the tokenizer lacks as empty, never allowed) and the tokenizer itself for strings.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |s| {
            self.tokenizer.encode(s, false).map(|e| e.get_ids().to_vec()).unwrap_or_default()
        })
    }
}

/// Compiled grammars of one model; see the module docs.
pub struct Grammars {
    factory: ParserFactory,
    compiled: Mutex<HashMap<String, TokenParser>>,
}

/// Compiled grammars kept; the cache starts over when full.
const CACHE: usize = 64;

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").field("vocab", &self.factory.tok_env().tok_trie().vocab_size()).finish()
    }
}

impl Grammars {
    /// Builds the token trie from `tokenizer.json`'s text, for a model with `vocab` output
    /// logits; `eos` are the tokens that end an answer.
    pub fn new(
        tokenizer_json: &str,
        tokenizer: tokenizers::Tokenizer,
        vocab: usize,
        eos: &[u32],
    ) -> Result<Grammars, String> {
        let json: serde_json::Value =
            serde_json::from_str(tokenizer_json).map_err(|e| format!("tokenizer.json: {e}"))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| format!("{e}"))?;
        if words.len() > vocab {
            return Err(format!("the tokenizer has {} tokens but the model only {vocab} logits", words.len()));
        }
        words.resize(vocab, Vec::new());
        let &first = eos.first().ok_or("the model has no end-of-sequence token")?;
        let trie = TokTrie::from(&TokRxInfo::new(vocab as u32, first), &words).with_eos_tokens(eos);
        let env: TokEnv = Arc::new(Vocabulary { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| format!("{e}"))?;
        factory.quiet();
        Ok(Grammars { factory, compiled: Mutex::new(HashMap::new()) })
    }

    fn parser(&self, spec: &AnswerSpec) -> Result<TokenParser, String> {
        let key = spec.key();
        if let Some(p) = self.compiled.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(p.deep_clone());
        }
        let parser = self.factory.create_parser(spec.grammar()?).map_err(|e| format!("{e}"))?;
        let mut cache = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE {
            cache.clear();
        }
        cache.insert(key, parser.deep_clone());
        Ok(parser)
    }

    /// Compiles `spec` (kept for later requests), or says what is wrong with it.
    pub fn check(&self, spec: &AnswerSpec) -> Result<(), String> {
        self.parser(spec).map(drop)
    }

    /// One request's state.
    pub fn start(&self, spec: &AnswerSpec, stop_when_decided: bool) -> Result<Constrained, String> {
        let matcher = Matcher::new(Ok(self.parser(spec)?));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        Ok(Constrained {
            matcher,
            trie: self.factory.tok_env().clone(),
            spec: spec.clone(),
            bytes: Vec::new(),
            reported: BTreeSet::new(),
            stop_when_decided,
            complete: false,
        })
    }
}

/// [`Grammars`] built on first use (reading the tokenizer's vocabulary is not free, and most
/// requests are not constrained).
pub struct LazyGrammars {
    tokenizer_json: std::path::PathBuf,
    tokenizer: tokenizers::Tokenizer,
    vocab: usize,
    eos: Vec<u32>,
    built: std::sync::OnceLock<Result<Grammars, String>>,
}

impl std::fmt::Debug for LazyGrammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyGrammars").field("built", &self.built.get().is_some()).finish_non_exhaustive()
    }
}

impl LazyGrammars {
    /// Remembers what [`Grammars::new`] needs.
    pub fn new(
        tokenizer_json: std::path::PathBuf,
        tokenizer: tokenizers::Tokenizer,
        vocab: usize,
        eos: Vec<u32>,
    ) -> Self {
        LazyGrammars { tokenizer_json, tokenizer, vocab, eos, built: std::sync::OnceLock::new() }
    }

    /// The grammars, built now if this is the first use.
    pub fn get(&self) -> Result<&Grammars, String> {
        self.built
            .get_or_init(|| {
                let text = std::fs::read_to_string(&self.tokenizer_json)
                    .map_err(|e| format!("{}: {e}", self.tokenizer_json.display()))?;
                Grammars::new(&text, self.tokenizer.clone(), self.vocab, &self.eos)
            })
            .as_ref()
            .map_err(|e| format!("constrained answers are not available for this tokenizer: {e}"))
    }
}

/// A point at which part of the answer can no longer change.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// A JSON pointer into the answer (`/person`, `/cars/0`); empty for the whole answer.
    pub path: String,
    /// The value there.
    pub value: serde_json::Value,
    /// Text still to come that the grammar forces (a choice fixed after "ye" still needs "s").
    pub rest: String,
}

/// How a constrained answer ended.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerOutcome {
    /// The grammar was completed.
    pub complete: bool,
    /// The answer as JSON (a string for a choice or a regex); none when incomplete.
    pub value: Option<serde_json::Value>,
}

/// What one generated token did to a constrained answer.
#[derive(Debug, Default)]
pub struct Consumed {
    /// Newly decided parts.
    pub decisions: Vec<Decision>,
    /// The grammar is complete: nothing but the end may follow.
    pub complete: bool,
    /// The caller asked to stop once the whole answer was decided, and it is.
    pub stop: bool,
}

/// One request's constrained decoding; see the module docs.
pub struct Constrained {
    matcher: Matcher,
    trie: TokEnv,
    spec: AnswerSpec,
    bytes: Vec<u8>,
    reported: BTreeSet<String>,
    stop_when_decided: bool,
    complete: bool,
}

impl Constrained {
    /// The tokens allowed next.
    pub fn mask(&mut self) -> Result<SimpleVob, String> {
        self.matcher.compute_mask().map_err(|e| format!("{e}"))
    }

    /// Takes the sampled token (one the last mask allowed).
    pub fn consume(&mut self, token: u32) -> Result<Consumed, String> {
        let trie = self.trie.tok_trie();
        if trie.eos_tokens().contains(&token) {
            // The mask allowed the end, so the grammar accepts here.
            self.complete = self.matcher.is_accepting().unwrap_or(false);
        } else {
            self.matcher.consume_token(token).map_err(|e| format!("{e}"))?;
            if !trie.is_special_token(token) {
                self.bytes.extend_from_slice(trie.token(token));
            }
            // llguidance stops the matcher when nothing but the end can follow.
            self.complete = self.matcher.is_stopped();
        }
        let decisions = self.decisions();
        Ok(Consumed { decisions, complete: self.complete, stop: self.stop_when_decided && self.reported.contains("") })
    }

    /// Parts decided since the last token.
    fn decisions(&mut self) -> Vec<Decision> {
        let mut out = Vec::new();
        if let AnswerSpec::JsonSchema(_) | AnswerSpec::JsonObject = self.spec {
            for (path, start, end) in json_values(&self.bytes) {
                if self.reported.contains(&path) {
                    continue;
                }
                if let Ok(value) = serde_json::from_slice(&self.bytes[start..end]) {
                    self.reported.insert(path.clone());
                    out.push(Decision { path, value, rest: String::new() });
                }
            }
        }
        if self.reported.contains("") {
            return out;
        }
        let whole = match &self.spec {
            // A choice is fixed as soon as one option alone starts with the text (or, for an
            // option that begins another, at the end).
            AnswerSpec::Choice(_) if self.complete => {
                Some((serde_json::Value::from(String::from_utf8_lossy(&self.bytes).into_owned()), String::new()))
            }
            AnswerSpec::Choice(choices) => {
                let mut fitting = choices.iter().filter(|c| c.as_bytes().starts_with(&self.bytes));
                match (fitting.next(), fitting.next()) {
                    (Some(c), None) if !self.bytes.is_empty() => {
                        Some((serde_json::Value::from(c.as_str()), c[self.bytes.len()..].to_owned()))
                    }
                    _ => None,
                }
            }
            AnswerSpec::Regex(_) if self.complete => {
                Some((serde_json::Value::from(String::from_utf8_lossy(&self.bytes).into_owned()), String::new()))
            }
            AnswerSpec::JsonSchema(_) | AnswerSpec::JsonObject if self.complete => {
                serde_json::from_slice(&self.bytes).ok().map(|v| (v, String::new()))
            }
            _ => None,
        };
        if let Some((value, rest)) = whole {
            self.reported.insert(String::new());
            out.push(Decision { path: String::new(), value, rest });
        }
        out
    }

    /// How the answer ended. `decided` is the whole answer's decision when generation stopped
    /// there on request; otherwise an answer cut before the grammar was complete (max_tokens, a
    /// stop string) is incomplete and has no value.
    pub fn outcome(&self, decided: Option<&Decision>) -> AnswerOutcome {
        if let Some(d) = decided {
            return AnswerOutcome { complete: true, value: Some(d.value.clone()) };
        }
        if !self.complete {
            return AnswerOutcome { complete: false, value: None };
        }
        let value = match self.spec {
            AnswerSpec::Choice(_) | AnswerSpec::Regex(_) => {
                Some(serde_json::Value::from(String::from_utf8_lossy(&self.bytes).into_owned()))
            }
            AnswerSpec::JsonSchema(_) | AnswerSpec::JsonObject => serde_json::from_slice(&self.bytes).ok(),
        };
        AnswerOutcome { complete: value.is_some(), value }
    }
}

/// Sets the logits of tokens `mask` forbids to minus infinity.
pub(crate) fn apply(mask: &SimpleVob, logits: &mut [f32]) {
    mask.iter_unset_entries(|t| {
        if let Some(l) = logits.get_mut(t) {
            *l = f32::NEG_INFINITY;
        }
    });
}

enum Reply {
    Mask(Result<SimpleVob, String>),
    Consumed(Result<Consumed, String>),
}

/// Runs a [`Constrained`] on its own thread. For each sampled token the engine gets back at
/// once what the token did (cheap), and then, while the model computes the next logits, the
/// worker computes the next mask (the expensive part). Dropping the worker ends and joins its
/// thread.
pub(crate) struct MaskWorker {
    tokens: Option<mpsc::SyncSender<u32>>,
    replies: mpsc::Receiver<Reply>,
    thread: Option<std::thread::JoinHandle<Constrained>>,
}

impl MaskWorker {
    /// Starts the thread, which computes the first mask right away.
    pub(crate) fn start(mut c: Constrained) -> std::io::Result<MaskWorker> {
        let (tokens, rx) = mpsc::sync_channel::<u32>(1);
        let (tx, replies) = mpsc::sync_channel(2);
        let thread = std::thread::Builder::new().name("lookout-mask".into()).spawn(move || {
            if tx.send(Reply::Mask(c.mask())).is_err() {
                return c;
            }
            for token in rx {
                let consumed = c.consume(token);
                let go_on = matches!(&consumed, Ok(s) if !s.complete && !s.stop);
                if tx.send(Reply::Consumed(consumed)).is_err() || !go_on {
                    break;
                }
                if tx.send(Reply::Mask(c.mask())).is_err() {
                    break;
                }
            }
            c
        })?;
        Ok(MaskWorker { tokens: Some(tokens), replies, thread: Some(thread) })
    }

    /// The mask for the next token.
    pub(crate) fn mask(&self) -> Result<SimpleVob, String> {
        match self.replies.recv() {
            Ok(Reply::Mask(m)) => m,
            Ok(Reply::Consumed(_)) => Err("the mask thread is out of step".into()),
            Err(_) => Err("the mask thread ended".into()),
        }
    }

    /// Hands over a sampled token and returns what it did.
    pub(crate) fn consume(&self, token: u32) -> Result<Consumed, String> {
        if let Some(t) = &self.tokens {
            t.send(token).map_err(|_| "the mask thread ended".to_owned())?;
        }
        match self.replies.recv() {
            Ok(Reply::Consumed(c)) => c,
            Ok(Reply::Mask(_)) => Err("the mask thread is out of step".into()),
            Err(_) => Err("the mask thread ended".into()),
        }
    }

    /// Stops the thread and gives the state back.
    pub(crate) fn finish(mut self) -> Option<Constrained> {
        self.stop()
    }

    fn stop(&mut self) -> Option<Constrained> {
        self.tokens = None;
        // Unblock a send of a mask nobody will read.
        while self.replies.try_recv().is_ok() {}
        let thread = self.thread.take()?;
        // The thread may be inside a mask computation; its send then fails or fits the buffer.
        thread.join().ok()
    }
}

impl Drop for MaskWorker {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The values complete so far in a possibly unfinished JSON text, as (JSON pointer, start,
/// end) — every value inside the root, not the root itself. A number counts as complete
/// once something follows it.
pub(crate) fn json_values(b: &[u8]) -> Vec<(String, usize, usize)> {
    let mut s = Scan { b, i: 0, out: Vec::new() };
    let _ = s.value(None);
    s.out
}

struct Scan<'a> {
    b: &'a [u8],
    i: usize,
    out: Vec<(String, usize, usize)>,
}

impl Scan<'_> {
    fn ws(&mut self) {
        while self.i < self.b.len() && self.b[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    /// One value; `None` when the text ends inside it (or is not JSON).
    fn value(&mut self, path: Option<&str>) -> Option<()> {
        self.ws();
        let start = self.i;
        match self.peek()? {
            b'{' => self.object(path.unwrap_or(""))?,
            b'[' => self.array(path.unwrap_or(""))?,
            b'"' => {
                self.string()?;
            }
            b't' => self.literal(b"true")?,
            b'f' => self.literal(b"false")?,
            b'n' => self.literal(b"null")?,
            _ => {
                while matches!(self.peek(), Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')) {
                    self.i += 1;
                }
                if self.i == start || self.i >= self.b.len() {
                    return None;
                }
            }
        }
        if let Some(p) = path {
            self.out.push((p.to_owned(), start, self.i));
        }
        Some(())
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Some(())
        } else {
            None
        }
    }

    fn string(&mut self) -> Option<String> {
        let start = self.i;
        self.i += 1;
        loop {
            match self.peek()? {
                b'\\' => self.i += 2,
                b'"' => {
                    self.i += 1;
                    return serde_json::from_slice(self.b.get(start..self.i)?).ok();
                }
                _ => self.i += 1,
            }
        }
    }

    fn object(&mut self, path: &str) -> Option<()> {
        self.i += 1;
        loop {
            self.ws();
            match self.peek()? {
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                b',' => self.i += 1,
                b'"' => {
                    let key = self.string()?;
                    self.ws();
                    if self.peek()? != b':' {
                        return None;
                    }
                    self.i += 1;
                    let key = key.replace('~', "~0").replace('/', "~1");
                    self.value(Some(&format!("{path}/{key}")))?;
                }
                _ => return None,
            }
        }
    }

    fn array(&mut self, path: &str) -> Option<()> {
        self.i += 1;
        let mut n = 0;
        loop {
            self.ws();
            match self.peek()? {
                b']' => {
                    self.i += 1;
                    return Some(());
                }
                b',' => self.i += 1,
                _ => {
                    self.value(Some(&format!("{path}/{n}")))?;
                    n += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_values_are_reported_as_they_complete() {
        let full = br#"{"person": true, "count": 12, "cars": [{"color": "red"}, "x"], "note": "a \"q\""}"#;
        let paths = |n: usize| json_values(&full[..n]).into_iter().map(|(p, _, _)| p).collect::<Vec<_>>();
        assert!(paths(10).is_empty(), "{:?}", paths(10));
        assert_eq!(paths(15), vec!["/person"]);
        // 12 is not known to be whole until the comma.
        assert_eq!(paths(28), vec!["/person"]);
        assert_eq!(paths(29), vec!["/person", "/count"]);
        let all = json_values(full);
        let got: Vec<(&str, serde_json::Value)> =
            all.iter().map(|(p, s, e)| (p.as_str(), serde_json::from_slice(&full[*s..*e]).unwrap())).collect();
        assert_eq!(
            got,
            vec![
                ("/person", serde_json::json!(true)),
                ("/count", serde_json::json!(12)),
                ("/cars/0/color", serde_json::json!("red")),
                ("/cars/0", serde_json::json!({"color": "red"})),
                ("/cars/1", serde_json::json!("x")),
                ("/cars", serde_json::json!([{"color": "red"}, "x"])),
                ("/note", serde_json::json!("a \"q\"")),
            ]
        );
    }
}
