//! Printing a session's events, shared by the examples.

use std::io::Write;

use futures_util::StreamExt;
use protocol::ServerMessage;
use tokio_tungstenite::tungstenite::Message;

/// A client WebSocket.
pub(crate) type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Prints every event of a session as it arrives (tokens inline) until it ends.
pub(crate) async fn print_session(ws: &mut Ws) -> Result<(), Box<dyn std::error::Error>> {
    let mut out = std::io::stdout();
    let mut window_at = None;
    while let Some(msg) = ws.next().await {
        let Message::Text(text) = msg? else { continue };
        match serde_json::from_str::<ServerMessage>(&text)? {
            ServerMessage::Ready { session, model, source } => {
                println!(
                    "ready: {session}, model {model}, {} {}x{} @ {} fps",
                    source.codec, source.width, source.height, source.fps
                )
            }
            ServerMessage::Window { id, start_s, end_s, frames, .. } => {
                window_at = Some(std::time::Instant::now());
                print!("[window {id}: {start_s:.2}-{end_s:.2} s, {frames} frames] ")
            }
            ServerMessage::Token { text, .. } => {
                if let Some(at) = window_at.take() {
                    print!("(first token {:.0} ms after the window) ", at.elapsed().as_secs_f64() * 1000.0);
                }
                print!("{text}")
            }
            ServerMessage::WindowDone { finish_reason, usage, timings, .. } => {
                println!("\n  ({finish_reason}, {} tokens, ttft {:.0} ms)", usage.completion_tokens, timings.ttft_ms)
            }
            ServerMessage::Decided { path, value, .. } => {
                print!(" [decided {}: {value}] ", if path.is_empty() { "answer" } else { path.as_str() })
            }
            ServerMessage::Skipped { windows, reason } => println!("skipped {windows} windows: {reason}"),
            ServerMessage::Status { ingest_fps, frames_dropped, lag_ms } => {
                eprintln!("status: ingest {ingest_fps:.1} frames/s, {frames_dropped} dropped, lag {lag_ms:.0} ms")
            }
            ServerMessage::Reconnecting { attempt, error, retry_in_ms } => {
                eprintln!("source lost ({error}); retry {attempt} in {retry_in_ms} ms")
            }
            ServerMessage::Resumed { from_s, to_s } => {
                eprintln!("source back; no frames from {from_s:.2} to {to_s:.2} s")
            }
            ServerMessage::Error { code, message, fatal } => eprintln!("error ({code:?}, fatal {fatal}): {message}"),
            ServerMessage::Ended { reason, message } => {
                println!("ended ({reason}): {message}");
                break;
            }
            ServerMessage::Subscribed { watch, prompt, .. } => println!("following watch {watch}: {prompt}"),
            ServerMessage::Lagged { missed } => eprintln!("fell behind: {missed} events skipped"),
            ServerMessage::Alert { monitor, incident, state, window, text } => {
                println!("\n  ALERT {state:?} on {monitor} (incident {incident}, window {window}): {text}")
            }
        }
        out.flush()?;
    }
    Ok(())
}
