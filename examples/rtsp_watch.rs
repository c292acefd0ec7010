//! Watches an RTSP camera through a running `lookout serve` and prints the streamed tokens.
//!
//! Run with
//! `cargo run -p examples --example rtsp_watch -- 127.0.0.1:8000 rtsp://user:pass@camera/stream1 "Is anyone at the door?"`
//!
//! Add `--udp` to receive RTP over UDP (LAN only). `LOOKOUT_API_KEY` is sent when set. Ctrl-C ends.
//!
//! ```text
//! ready: s1, model Qwen/Qwen3-VL-2B-Instruct, h264 1280x720 @ 30 fps
//! [window 0: 0.00-3.50 s, 8 frames] (first token 180 ms after the window) A person walks to the door...
//!   (stop, 23 tokens, ttft 170 ms)
//! source lost (the camera ended the stream); retry 1 in 250 ms
//! source back; no frames from 41.20 to 43.05 s
//! ```
#![allow(clippy::print_stdout, clippy::print_stderr)]

#[path = "shared/mod.rs"]
mod shared;

use futures_util::SinkExt;
use protocol::{ClientMessage, GenerationSettings, RtspTransport, Source, WindowSettings};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let udp = args.iter().any(|a| a == "--udp");
    let mut positional = args.into_iter().filter(|a| a != "--udp");
    let (Some(server), Some(camera)) = (positional.next(), positional.next()) else {
        eprintln!("usage: rtsp_watch HOST:PORT rtsp://[user:pass@]camera/path [PROMPT] [--udp]");
        std::process::exit(2);
    };
    let prompt = positional.next().unwrap_or_else(|| "Describe what happens.".into());
    let query = std::env::var("LOOKOUT_API_KEY").map(|k| format!("?api_key={k}")).unwrap_or_default();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{server}/v1/ws{query}")).await?;
    let start = ClientMessage::Start {
        source: Source::Rtsp { url: camera, transport: udp.then_some(RtspTransport::Udp) },
        prompt,
        window: Some(WindowSettings {
            seconds: Some(4.0),
            stride_seconds: Some(4.0),
            fps: Some(2.0),
            ..Default::default()
        }),
        generation: Some(GenerationSettings { max_tokens: Some(64), temperature: Some(0.0), ..Default::default() }),
    };
    ws.send(Message::Text(serde_json::to_string(&start)?.into())).await?;
    tokio::select! {
        r = shared::print_session(&mut ws) => r?,
        _ = tokio::signal::ctrl_c() => {
            ws.send(Message::Text(serde_json::to_string(&ClientMessage::Stop {})?.into())).await?;
            shared::print_session(&mut ws).await?;
        }
    }
    Ok(())
}
