//! The web UI, embedded at build time (see build.rs): `/` and `/app/*`.

use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

const INDEX: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ui/index.html"));
const STYLE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ui/style.css"));
const JS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ui/frontend.js"));
const WASM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ui/frontend_bg.wasm"));

fn asset(body: &'static [u8], content_type: &'static str) -> Response {
    // Embedded with the binary: a new binary may bring new assets, so browsers revalidate.
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// `GET /`.
pub(crate) async fn index() -> Response {
    asset(INDEX, "text/html; charset=utf-8")
}

/// `GET /app/{file}`.
pub(crate) async fn file(Path(name): Path<String>) -> Response {
    match name.as_str() {
        "style.css" => asset(STYLE, "text/css; charset=utf-8"),
        "frontend.js" if !JS.is_empty() => asset(JS, "text/javascript; charset=utf-8"),
        "frontend_bg.wasm" if !WASM.is_empty() => asset(WASM, "application/wasm"),
        _ => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}
