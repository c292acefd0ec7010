//! Stand-ins for unit tests of the pipeline's logic: a synthetic source (no ffmpeg, no
//! network) and an analyzer that answers without a model. Both run on tokio time, so tests can
//! pause the clock.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use inference::{EngineEvent, FinishReason, Timings, Usage};
use ingest::live::SourceEvent;
use ingest::ring::RingEnd;
use protocol::{ErrorCode, Source, SourceInfo};
use tokio::sync::mpsc;

use super::{Analyzer, Feed, Opened, Reservation, SourceError, Sources};

/// Synthetic sources, chosen by the upload id (and paced at the upload's `speed`):
/// - `clip:N:FPS`: N frames of 64x64 at FPS frames/s of stream time, then the end of stream;
/// - `live:N:FPS`: the same as a live source (its size comes with a `Started` event);
/// - `silent`: a live source that never sends a frame;
/// - `fail`: a source that cannot be opened.
#[derive(Default)]
pub(crate) struct SyntheticSources {
    /// Sources still running (their task holds the watch's shutdown receiver).
    pub(crate) running: Arc<AtomicUsize>,
}

struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn frame(seq: u64, t: f64) -> ingest::Frame {
    let v = (seq * 37 % 256) as u8;
    ingest::Frame { seq, pts: Duration::from_secs_f64(t), width: 64, height: 64, rgb: Arc::from(vec![v; 64 * 64 * 3]) }
}

impl Sources for SyntheticSources {
    fn open<'a>(
        &'a self,
        _name: &'a str,
        source: &'a Source,
        feed: Feed,
    ) -> BoxFuture<'a, Result<Opened, SourceError>> {
        Box::pin(async move {
            let Source::Upload { id, speed, .. } = source else {
                return Err(SourceError { code: ErrorCode::BadRequest, message: "synthetic uploads only".into() });
            };
            let parts: Vec<&str> = id.split(':').collect();
            let (live, n, fps) = match parts.as_slice() {
                ["clip", n, fps] => (false, n.parse::<u64>().unwrap(), fps.parse::<f64>().unwrap()),
                ["live", n, fps] => (true, n.parse().unwrap(), fps.parse().unwrap()),
                ["silent"] => (true, 0, 1.0),
                _ => return Err(SourceError { code: ErrorCode::Source, message: format!("cannot open {id}") }),
            };
            let step = Duration::from_secs_f64(1.0 / fps / speed.unwrap_or(1.0));
            let (tx, rx) = mpsc::channel(8);
            self.running.fetch_add(1, Ordering::SeqCst);
            let running = Running(self.running.clone());
            let Feed { ring, mut admit, stop, .. } = feed;
            tokio::spawn(async move {
                let _running = running;
                let _tx = tx.clone();
                if n == 0 {
                    stop.cancelled().await;
                    return;
                }
                for seq in 0..n {
                    let t = seq as f64 / fps;
                    if seq > 0 {
                        tokio::select! {
                            _ = stop.cancelled() => return ring.close(RingEnd::Stopped),
                            _ = tokio::time::sleep(step) => {}
                        }
                    }
                    if seq == 0 && live {
                        let started = SourceEvent::Started { width: 64, height: 64, codec: "synthetic".into(), fps };
                        let _ = tx.send(started).await;
                    }
                    ring.count_arrival();
                    if admit(Duration::from_secs_f64(t)) && !ring.push(frame(seq, t)) {
                        return;
                    }
                }
                ring.close(RingEnd::EndOfStream);
            });
            let info = (!live).then(|| SourceInfo { width: 64, height: 64, fps, codec: "synthetic".into() });
            Ok(Opened { info, events: Some(rx), hold: None })
        })
    }
}

/// Answers every window with `tokens` pieces, `every` apart, and remembers each prompt. With a
/// queue, at most that many requests are in hand at once (the rest wait for a place, first come
/// first served, as with the engine).
pub(crate) struct FakeAnalyzer {
    pub(crate) tokens: usize,
    pub(crate) every: Duration,
    pub(crate) prompts: Arc<Mutex<Vec<String>>>,
    places: Option<Arc<tokio::sync::Semaphore>>,
    /// Answers, one per request in turn (word by word), instead of `t0 t1 ...`.
    script: Option<Arc<(Vec<String>, AtomicUsize)>>,
}

impl FakeAnalyzer {
    pub(crate) fn new(tokens: usize, every: Duration) -> Arc<Self> {
        Arc::new(FakeAnalyzer { tokens, every, prompts: Arc::default(), places: None, script: None })
    }

    /// One that answers the windows with `answers` in turn (then from the first again).
    pub(crate) fn scripted(answers: &[&str], every: Duration) -> Arc<Self> {
        let script = Some(Arc::new((answers.iter().map(|a| (*a).to_owned()).collect(), AtomicUsize::new(0))));
        Arc::new(FakeAnalyzer { tokens: 0, every, prompts: Arc::default(), places: None, script })
    }

    /// One that serves `places` requests at a time.
    pub(crate) fn with_queue(tokens: usize, every: Duration, places: usize) -> Arc<Self> {
        let places = Some(Arc::new(tokio::sync::Semaphore::new(places)));
        Arc::new(FakeAnalyzer { tokens, every, prompts: Arc::default(), places, script: None })
    }
}

impl Analyzer for FakeAnalyzer {
    fn model(&self) -> String {
        "fake".into()
    }

    fn reserve(&self) -> BoxFuture<'_, Result<Reservation, inference::Error>> {
        let prompts = self.prompts.clone();
        let (n, every) = (self.tokens, self.every);
        let places = self.places.clone();
        let script = self.script.clone();
        Box::pin(async move {
            let place = match places {
                Some(p) => Some(p.acquire_owned().await.map_err(|_| inference::Error::Stopped)?),
                None => None,
            };
            Ok(Reservation::new(move |request| {
                // The next answer of the script goes to the next request actually made.
                let script = script.map(|s| s.0[s.1.fetch_add(1, Ordering::SeqCst) % s.0.len()].clone());
                Ok(answer(&prompts, n, every, request, place, script))
            }))
        })
    }

    fn check_answer(&self, _: &inference::answer::AnswerSpec) -> Result<(), String> {
        Ok(())
    }
}

/// The fake's answer to one request.
fn answer(
    prompts: &Mutex<Vec<String>>,
    n: usize,
    every: Duration,
    request: inference::Request,
    place: Option<tokio::sync::OwnedSemaphorePermit>,
    script: Option<String>,
) -> mpsc::UnboundedReceiver<EngineEvent> {
    {
        use inference::processor::{Content, Part};
        let prompt = match request.messages.first().map(|m| &m.content) {
            Some(Content::Parts(parts)) => parts
                .iter()
                .filter_map(|p| match p {
                    Part::Text(t) => Some(t.clone()),
                    Part::Video => None,
                })
                .collect(),
            Some(Content::Text(t)) => t.clone(),
            None => String::new(),
        };
        let frames = request.videos.first().map_or(0, |v| v.grid_thw[0] * 2);
        prompts.lock().unwrap().push(prompt);
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _place = place;
            let _ = tx.send(EngineEvent::Queued);
            let mut text = String::new();
            let pieces: Vec<String> = match &script {
                Some(s) => s.split_inclusive(' ').map(str::to_owned).collect(),
                None => (0..n).map(|i| format!("t{i} ")).collect(),
            };
            let n = pieces.len();
            for piece in pieces {
                tokio::time::sleep(every).await;
                // A scripted crash: the engine goes away mid-answer, without an end.
                if piece.trim() == "!crash" {
                    return;
                }
                text.push_str(&piece);
                if tx.send(EngineEvent::Token { text: piece }).is_err() {
                    return; // cancelled
                }
            }
            let usage = Usage { prompt_tokens: frames, completion_tokens: n };
            let _ = tx.send(EngineEvent::Done {
                finish_reason: FinishReason::Length,
                text,
                token_ids: Vec::new(),
                usage,
                timings: Timings::default(),
                answer: None,
            });
        });
        rx
    }
}
