//! `POST /v1/uploads`: multipart upload streamed to disk, size-limited, then probed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{Multipart, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use protocol::ErrorCode;
use tokio::io::AsyncWriteExt;

use super::{ApiFailure, AppState};

/// A fresh, unguessable-enough upload id (time, process and a counter, hashed).
pub(crate) fn new_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// The stored file of an upload id, if the id is well-formed.
pub(crate) fn upload_path(data_dir: &Path, id: &str) -> Option<PathBuf> {
    let ok = !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    ok.then(|| data_dir.join("uploads").join(id))
}

pub(crate) async fn upload(
    State(state): State<Arc<AppState>>,
    mut multipart: Multipart,
) -> Result<impl IntoResponse, ApiFailure> {
    let limit = state.config.max_upload_bytes;
    let id = new_id();
    let dir = state.config.data_dir.join("uploads");
    let part_path = dir.join(format!("{id}.part"));
    let mut written = 0u64;
    let mut found = false;
    while let Some(field) =
        multipart.next_field().await.map_err(|e| ApiFailure::bad_request(format!("bad multipart body: {e}")))?
    {
        if field.name() != Some("file") {
            continue;
        }
        found = true;
        written = receive_file(field, &part_path, limit).await?;
        break;
    }
    if !found {
        return Err(ApiFailure::bad_request("the multipart body needs a part named \"file\""));
    }
    // Probing demuxes the whole file: a blocking job, off the async runtime.
    let probe_path = part_path.clone();
    let probed = tokio::task::spawn_blocking(move || ingest::probe(&probe_path))
        .await
        .map_err(|e| ApiFailure::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, e.to_string()))?;
    let info = match probed {
        Ok(info) => info,
        Err(e) => {
            let _ = tokio::fs::remove_file(&part_path).await;
            return Err(ApiFailure::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorCode::BadRequest,
                format!("not a playable video: {}", super::media_error(e, &part_path)),
            ));
        }
    };
    // A window needs one temporal pair: a still image or a one-frame clip can never be
    // analysed, here or by the REST and chat APIs (which answer 422 for it too).
    if info.frame_count < 2 {
        let _ = tokio::fs::remove_file(&part_path).await;
        return Err(ApiFailure::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::BadRequest,
            format!(
                "the clip has {} frame(s) ({} {}x{}); analysis needs a video of at least 2 frames",
                info.frame_count, info.codec, info.width, info.height
            ),
        ));
    }
    state.metrics.uploads.fetch_add(1, Ordering::Relaxed);
    let final_path = dir.join(&id);
    tokio::fs::rename(&part_path, &final_path)
        .await
        .map_err(|e| ApiFailure::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, e.to_string()))?;
    Ok((
        StatusCode::CREATED,
        axum::Json(serde_json::json!({
            "id": id, "bytes": written, "codec": info.codec, "width": info.width, "height": info.height,
            "fps": info.fps, "frames": info.frame_count, "duration_s": info.duration_s,
        })),
    ))
}

/// How much of an oversized upload is read and discarded before answering 413.
const DRAIN_LIMIT: u64 = 16 << 20;

/// Streams one multipart field to `path`, refusing more than `limit` bytes (the partial file is
/// removed on any failure). Returns the size.
pub(crate) async fn receive_file(
    mut field: axum::extract::multipart::Field<'_>,
    path: &Path,
    limit: u64,
) -> Result<u64, ApiFailure> {
    let internal = |e: std::io::Error| {
        ApiFailure::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal, format!("cannot store the upload: {e}"))
    };
    let mut file = tokio::fs::File::create(path).await.map_err(internal)?;
    let mut written = 0u64;
    loop {
        let chunk = match field.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => break,
            Err(e) => {
                let _ = tokio::fs::remove_file(path).await;
                return Err(ApiFailure::bad_request(format!("the upload broke off: {e}")));
            }
        };
        written += chunk.len() as u64;
        if written > limit {
            drop(file);
            let _ = tokio::fs::remove_file(path).await;
            // Read (and drop) a bounded remainder so the client, still sending, gets the 413
            // instead of a reset connection; past that the connection is simply closed.
            let mut drained = 0u64;
            while drained < DRAIN_LIMIT {
                match field.chunk().await {
                    Ok(Some(c)) => drained += c.len() as u64,
                    _ => break,
                }
            }
            return Err(ApiFailure::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::BadRequest,
                format!("the upload is larger than the limit of {limit} bytes"),
            ));
        }
        if let Err(e) = file.write_all(&chunk).await {
            let _ = tokio::fs::remove_file(path).await;
            return Err(internal(e));
        }
    }
    file.flush().await.map_err(internal)?;
    Ok(written)
}
