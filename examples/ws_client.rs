//! Uploads a clip to a running `lookout serve`, replays it as a live stream over the WebSocket
//! protocol and prints the streamed tokens as they arrive.
//!
//! Run with
//! `cargo run -p examples --example ws_client -- 127.0.0.1:8000 fixtures/preprocess/clips/h264_25fps_480x270.mkv "What happens?"`
//!
//! ```text
//! ready: s1, model fixtures/models/tiny-tied, h264 480x270 @ 25 fps
//! [window 0: 0.00-1.52 s, 4 frames] (first token 60 ms after the window) ...streamed text...
//!   (stop, 6 tokens, ttft 41 ms)
//! ended: end of stream
//! ```
#![allow(clippy::print_stdout, clippy::print_stderr)]

#[path = "shared/mod.rs"]
mod shared;

use futures_util::SinkExt;
use protocol::{ClientMessage, GenerationSettings, Source, WindowSettings};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(server), Some(clip)) = (args.next(), args.next()) else {
        eprintln!("usage: ws_client HOST:PORT CLIP [PROMPT]");
        std::process::exit(2);
    };
    let prompt = args.next().unwrap_or_else(|| "Describe what happens.".into());
    let key = std::env::var("LOOKOUT_API_KEY").ok();

    // Upload (multipart, one part named "file").
    let bytes = std::fs::read(&clip)?;
    let boundary = "lookoutexampleboundary";
    let mut body = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"clip\"\r\n\r\n")
        .into_bytes();
    body.extend_from_slice(&bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let url = format!("http://{server}/v1/uploads");
    let auth = key.clone();
    let uploaded: serde_json::Value = tokio::task::spawn_blocking(move || {
        let mut req = ureq::post(&url).set("Content-Type", &format!("multipart/form-data; boundary={boundary}"));
        if let Some(k) = auth {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        req.send_bytes(&body).map_err(|e| e.to_string())?.into_json::<serde_json::Value>().map_err(|e| e.to_string())
    })
    .await??;
    let id = uploaded["id"].as_str().ok_or("the server returned no upload id")?.to_owned();

    let query = key.map(|k| format!("?api_key={k}")).unwrap_or_default();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{server}/v1/ws{query}")).await?;
    let start = ClientMessage::Start {
        source: Source::Upload { id, speed: Some(1.0), looped: Some(false) },
        prompt,
        window: Some(WindowSettings {
            seconds: Some(2.0),
            stride_seconds: Some(2.0),
            fps: Some(2.0),
            ..Default::default()
        }),
        generation: Some(GenerationSettings { max_tokens: Some(48), temperature: Some(0.0), ..Default::default() }),
    };
    ws.send(Message::Text(serde_json::to_string(&start)?.into())).await?;
    shared::print_session(&mut ws).await?;
    Ok(())
}
