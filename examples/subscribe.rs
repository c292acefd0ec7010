//! Follows a monitor (or a running watch) through a running `lookout serve` and prints its
//! windows and tokens as they stream; a monitor is followed across its watch's restarts.
//!
//! Run with
//! `cargo run -p examples --example subscribe -- 127.0.0.1:8000 monitor m0123abcd`
//! or `... -- 127.0.0.1:8000 watch s3`. `LOOKOUT_API_KEY` is sent when set. Ctrl-C ends.
//!
//! ```text
//! following watch s7 (monitor m0123abcd): Is anyone at the door?
//! [window 12: 48.00-51.50 s, 8 frames] (first token 95 ms after the window) No one.
//!   (stop, 3 tokens, ttft 90 ms)
//! ```
#![allow(clippy::print_stdout, clippy::print_stderr)]

#[path = "shared/mod.rs"]
mod shared;

use futures_util::SinkExt;
use protocol::ClientMessage;
use tokio_tungstenite::tungstenite::Message;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(server), Some(kind), Some(id)) = (args.first(), args.get(1), args.get(2)) else {
        eprintln!("usage: subscribe HOST:PORT monitor|watch ID");
        std::process::exit(2);
    };
    let subscribe = match kind.as_str() {
        "monitor" => ClientMessage::Subscribe { watch: None, monitor: Some(id.clone()) },
        "watch" => ClientMessage::Subscribe { watch: Some(id.clone()), monitor: None },
        other => {
            eprintln!("subscribe to a monitor or a watch, not {other:?}");
            std::process::exit(2);
        }
    };
    let query = std::env::var("LOOKOUT_API_KEY").map(|k| format!("?api_key={k}")).unwrap_or_default();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{server}/v1/ws{query}")).await?;
    ws.send(Message::Text(serde_json::to_string(&subscribe)?.into())).await?;
    tokio::select! {
        r = shared::print_session(&mut ws) => r?,
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
