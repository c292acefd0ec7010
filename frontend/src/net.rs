//! Browser plumbing: fetch, uploads with progress (XHR), the WebSocket session, and publishing
//! the browser camera over WHIP.

use serde::de::DeserializeOwned;
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use web_sys::{
    Headers, MediaStream, MediaStreamConstraints, RequestInit, Response, RtcIceGatheringState, RtcPeerConnection,
    RtcRtpTransceiverDirection, RtcRtpTransceiverInit, RtcSdpType, RtcSessionDescriptionInit, WebSocket,
    XmlHttpRequest,
};
use yew::Callback;

fn js_err(e: JsValue) -> String {
    e.as_string()
        .or_else(|| e.dyn_ref::<js_sys::Error>().map(|e| String::from(e.message())))
        .unwrap_or_else(|| format!("{e:?}"))
}

fn window() -> Result<web_sys::Window, String> {
    web_sys::window().ok_or_else(|| "no window".to_owned())
}

/// Sleeps on the browser's timer.
pub(crate) async fn sleep(ms: i32) {
    let p = js_sys::Promise::new(&mut |resolve, _| {
        if let Some(w) = web_sys::window() {
            let _ = w.set_timeout_with_callback_and_timeout_and_arguments_0(&resolve, ms);
        }
    });
    let _ = JsFuture::from(p).await;
}

/// The server's error body, or the status line.
async fn failure(resp: &Response) -> String {
    let status = resp.status();
    let text = match resp.text() {
        Ok(p) => JsFuture::from(p).await.ok().and_then(|t| t.as_string()).unwrap_or_default(),
        Err(_) => String::new(),
    };
    match serde_json::from_str::<protocol::ApiError>(&text) {
        Ok(e) => e.error.message,
        Err(_) if !text.is_empty() => format!("HTTP {status}: {text}"),
        Err(_) => format!("HTTP {status}"),
    }
}

async fn fetch(method: &str, path: &str, key: &str, body: Option<(&str, &str)>) -> Result<Response, String> {
    let init = RequestInit::new();
    init.set_method(method);
    let headers = Headers::new().map_err(js_err)?;
    if !key.is_empty() {
        headers.append("Authorization", &format!("Bearer {key}")).map_err(js_err)?;
    }
    if let Some((ct, b)) = body {
        headers.append("Content-Type", ct).map_err(js_err)?;
        init.set_body(&JsValue::from_str(b));
    }
    init.set_headers(&headers);
    let resp = JsFuture::from(window()?.fetch_with_str_and_init(path, &init))
        .await
        .map_err(|e| format!("the server cannot be reached: {}", js_err(e)))?;
    resp.dyn_into::<Response>().map_err(js_err)
}

/// `GET` a JSON document.
pub(crate) async fn get_json<T: DeserializeOwned>(path: &str, key: &str) -> Result<T, String> {
    let resp = fetch("GET", path, key, None).await?;
    if !resp.ok() {
        return Err(failure(&resp).await);
    }
    let text = JsFuture::from(resp.text().map_err(js_err)?).await.map_err(js_err)?;
    serde_json::from_str(&text.as_string().unwrap_or_default()).map_err(|e| e.to_string())
}

/// Sends a JSON body (`POST`, `PATCH`) and reads the JSON answer.
pub(crate) async fn send_json<B: serde::Serialize, T: DeserializeOwned>(
    method: &str,
    path: &str,
    key: &str,
    body: &B,
) -> Result<T, String> {
    let text = serde_json::to_string(body).map_err(|e| e.to_string())?;
    let resp = fetch(method, path, key, Some(("application/json", &text))).await?;
    if !resp.ok() {
        return Err(failure(&resp).await);
    }
    let text = JsFuture::from(resp.text().map_err(js_err)?).await.map_err(js_err)?;
    serde_json::from_str(&text.as_string().unwrap_or_default()).map_err(|e| e.to_string())
}

/// `DELETE`s a resource.
pub(crate) async fn delete(path: &str, key: &str) -> Result<(), String> {
    let resp = fetch("DELETE", path, key, None).await?;
    if resp.ok() { Ok(()) } else { Err(failure(&resp).await) }
}

/// A published camera: its stream (for the preview), peer connection and WHIP resource.
#[derive(Clone)]
pub(crate) struct Published {
    pub(crate) stream: MediaStream,
    pub(crate) pc: RtcPeerConnection,
    pub(crate) location: String,
}

impl PartialEq for Published {
    fn eq(&self, other: &Self) -> bool {
        self.location == other.location
    }
}

impl Published {
    /// The resource id (the last part of its location).
    pub(crate) fn resource(&self) -> String {
        self.location.rsplit('/').next().unwrap_or_default().to_owned()
    }

    /// Ends the stream: DELETE the resource, close the connection, release the camera.
    pub(crate) async fn end(self, key: &str) {
        let _ = fetch("DELETE", &self.location, key, None).await;
        self.pc.close();
        let tracks = self.stream.get_tracks();
        for t in tracks.iter() {
            if let Ok(t) = t.dyn_into::<web_sys::MediaStreamTrack>() {
                t.stop();
            }
        }
    }
}

/// Opens the camera and publishes it over WHIP (`POST /v1/whip`, no trickle).
pub(crate) async fn publish_camera(key: &str) -> Result<Published, String> {
    let devices = window()?
        .navigator()
        .media_devices()
        .map_err(|_| "this browser has no camera access (it needs https or localhost)".to_owned())?;
    let constraints = MediaStreamConstraints::new();
    constraints.set_video_bool(true);
    constraints.set_audio_bool(false);
    let stream = JsFuture::from(devices.get_user_media_with_constraints(&constraints).map_err(js_err)?)
        .await
        .map_err(|e| format!("the camera could not be opened: {}", js_err(e)))?
        .dyn_into::<MediaStream>()
        .map_err(js_err)?;
    let pc = RtcPeerConnection::new().map_err(js_err)?;
    let init = RtcRtpTransceiverInit::new();
    init.set_direction(RtcRtpTransceiverDirection::Sendonly);
    init.set_streams(&js_sys::Array::of1(&stream));
    let track = stream
        .get_video_tracks()
        .get(0)
        .dyn_into::<web_sys::MediaStreamTrack>()
        .map_err(|_| "the camera gave no video track".to_owned())?;
    pc.add_transceiver_with_media_stream_track_and_init(&track, &init);
    let offer = JsFuture::from(pc.create_offer()).await.map_err(js_err)?;
    let offer: RtcSessionDescriptionInit = offer.unchecked_into();
    JsFuture::from(pc.set_local_description(&offer)).await.map_err(js_err)?;
    // Gather every candidate first (the endpoint does not trickle), at most 3 s.
    for _ in 0..60 {
        if pc.ice_gathering_state() == RtcIceGatheringState::Complete {
            break;
        }
        sleep(50).await;
    }
    let sdp = pc.local_description().map(|d| d.sdp()).ok_or("no local description")?;
    let resp = fetch("POST", "/v1/whip", key, Some(("application/sdp", &sdp))).await?;
    if resp.status() != 201 {
        pc.close();
        return Err(format!("publishing the camera failed: {}", failure(&resp).await));
    }
    let location = resp.headers().get("Location").ok().flatten().ok_or("the server gave no Location")?;
    let answer = JsFuture::from(resp.text().map_err(js_err)?).await.map_err(js_err)?.as_string().unwrap_or_default();
    let desc = RtcSessionDescriptionInit::new(RtcSdpType::Answer);
    desc.set_sdp(&answer);
    JsFuture::from(pc.set_remote_description(&desc)).await.map_err(js_err)?;
    Ok(Published { stream, pc, location })
}

/// An upload in flight; dropping it aborts it.
pub(crate) struct Upload {
    xhr: XmlHttpRequest,
    _progress: Closure<dyn FnMut(web_sys::ProgressEvent)>,
    _load: Closure<dyn FnMut(web_sys::ProgressEvent)>,
    _error: Closure<dyn FnMut(web_sys::ProgressEvent)>,
    done: std::rc::Rc<std::cell::Cell<bool>>,
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.done.get() {
            let _ = self.xhr.abort();
        }
    }
}

/// Uploads `file` to `POST /v1/uploads`, reporting progress (0..1) and then the upload id.
pub(crate) fn upload(
    file: &web_sys::File,
    key: &str,
    on_progress: Callback<f64>,
    on_done: Callback<Result<String, String>>,
) -> Result<Upload, String> {
    let xhr = XmlHttpRequest::new().map_err(js_err)?;
    xhr.open_with_async("POST", "/v1/uploads", true).map_err(js_err)?;
    if !key.is_empty() {
        xhr.set_request_header("Authorization", &format!("Bearer {key}")).map_err(js_err)?;
    }
    let progress = Closure::<dyn FnMut(web_sys::ProgressEvent)>::new(move |e: web_sys::ProgressEvent| {
        if e.length_computable() && e.total() > 0.0 {
            on_progress.emit(e.loaded() / e.total());
        }
    });
    let done = std::rc::Rc::new(std::cell::Cell::new(false));
    let (x, d, cb) = (xhr.clone(), done.clone(), on_done.clone());
    let load = Closure::<dyn FnMut(web_sys::ProgressEvent)>::new(move |_| {
        d.set(true);
        let text = x.response_text().ok().flatten().unwrap_or_default();
        let status = x.status().unwrap_or(0);
        let result = if status == 200 || status == 201 {
            serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["id"].as_str().map(str::to_owned))
                .ok_or_else(|| "the server gave no upload id".to_owned())
        } else {
            Err(serde_json::from_str::<protocol::ApiError>(&text)
                .map(|e| e.error.message)
                .unwrap_or_else(|_| format!("upload failed (HTTP {status})")))
        };
        cb.emit(result);
    });
    let d = done.clone();
    let error = Closure::<dyn FnMut(web_sys::ProgressEvent)>::new(move |_| {
        d.set(true);
        on_done.emit(Err("the upload failed: the server cannot be reached".into()));
    });
    let target = xhr.upload().map_err(js_err)?;
    target.set_onprogress(Some(progress.as_ref().unchecked_ref()));
    xhr.set_onload(Some(load.as_ref().unchecked_ref()));
    xhr.set_onerror(Some(error.as_ref().unchecked_ref()));
    let form = web_sys::FormData::new().map_err(js_err)?;
    form.append_with_blob_and_filename("file", file, &file.name()).map_err(js_err)?;
    xhr.send_with_opt_form_data(Some(&form)).map_err(js_err)?;
    Ok(Upload { xhr, _progress: progress, _load: load, _error: error, done })
}

/// A WebSocket session; dropping it closes the socket.
pub(crate) struct Socket {
    ws: WebSocket,
    _open: Closure<dyn FnMut(web_sys::Event)>,
    _message: Closure<dyn FnMut(web_sys::MessageEvent)>,
    _close: Closure<dyn FnMut(web_sys::CloseEvent)>,
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.ws.set_onclose(None);
        let _ = self.ws.close();
    }
}

impl Socket {
    /// Opens `/v1/ws`, sends `start` once open, and reports every server message and the close.
    pub(crate) fn open(
        key: &str,
        start: &protocol::ClientMessage,
        on_message: Callback<protocol::ServerMessage>,
        on_close: Callback<String>,
    ) -> Result<Socket, String> {
        let loc = window()?.location();
        let scheme = if loc.protocol().map_err(js_err)? == "https:" { "wss" } else { "ws" };
        let host = loc.host().map_err(js_err)?;
        let query =
            if key.is_empty() { String::new() } else { format!("?api_key={}", js_sys::encode_uri_component(key)) };
        let ws = WebSocket::new(&format!("{scheme}://{host}/v1/ws{query}")).map_err(js_err)?;
        let text = serde_json::to_string(start).map_err(|e| e.to_string())?;
        let w = ws.clone();
        let open = Closure::<dyn FnMut(web_sys::Event)>::new(move |_| {
            let _ = w.send_with_str(&text);
        });
        let message = Closure::<dyn FnMut(web_sys::MessageEvent)>::new(move |e: web_sys::MessageEvent| {
            if let Some(t) = e.data().as_string()
                && let Ok(m) = serde_json::from_str::<protocol::ServerMessage>(&t)
            {
                on_message.emit(m);
            }
        });
        let close = Closure::<dyn FnMut(web_sys::CloseEvent)>::new(move |e: web_sys::CloseEvent| {
            on_close.emit(if e.reason().is_empty() { format!("connection closed ({})", e.code()) } else { e.reason() });
        });
        ws.set_onopen(Some(open.as_ref().unchecked_ref()));
        ws.set_onmessage(Some(message.as_ref().unchecked_ref()));
        ws.set_onclose(Some(close.as_ref().unchecked_ref()));
        Ok(Socket { ws, _open: open, _message: message, _close: close })
    }

    /// Sends a client message.
    pub(crate) fn send(&self, m: &protocol::ClientMessage) {
        if let Ok(t) = serde_json::to_string(m) {
            let _ = self.ws.send_with_str(&t);
        }
    }
}
