//! Ad-hoc analysis: choose a source (the browser camera published over WHIP, another WHIP
//! publisher, an RTSP camera, a file upload, or a URL), a prompt and settings; then watch the live
//! view, the tokens streaming into the current window's card, the timeline of windows and the
//! ingest status. The component's `Phase` says where a session is (idle, preparing the source,
//! connecting, running).

use protocol::{
    ClientMessage, ErrorCode, RtspTransport, ServerMessage, Source, SourceInfo, Timings, Usage, WhipResource,
};
use web_sys::{HtmlInputElement, HtmlVideoElement};
use yew::prelude::*;

use crate::common::{Problem, hint};
use crate::form::{Field, Form};
use crate::net;

/// Where the video comes from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Tab {
    Camera,
    Whip,
    Rtsp,
    Upload,
    Url,
}

impl Tab {
    fn label(self) -> &'static str {
        match self {
            Tab::Camera => "Camera",
            Tab::Whip => "WebRTC",
            Tab::Rtsp => "RTSP",
            Tab::Upload => "Upload",
            Tab::Url => "URL",
        }
    }
}

/// One window on the timeline.
#[derive(Clone, PartialEq, Debug)]
struct WindowCard {
    id: u64,
    start_s: f64,
    end_s: f64,
    frames: usize,
    text: String,
    done: Option<(String, Usage, Timings)>,
}

#[derive(Clone, PartialEq, Debug, Default)]
struct Status {
    ingest_fps: f64,
    frames_dropped: u64,
    lag_ms: f64,
    skipped: u64,
    notice: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Idle,
    Preparing,
    Connecting,
    Running,
}

pub(crate) enum Msg {
    Tab(Tab),
    Edit(Field, String),
    ToggleUdp,
    FileChosen,
    Start,
    Stop,
    Restart,
    SendPrompt,
    Progress(f64),
    Uploaded(Result<String, String>),
    Camera(Result<net::Published, String>),
    Server(ServerMessage),
    Closed(String),
    DismissError,
    PlayClip,
    PreviewTick,
    ListStreams,
    Streams(Result<Vec<WhipResource>, String>),
    ChooseStream(String),
    Noop,
}

/// The analysis view's properties.
#[derive(Properties, PartialEq)]
pub(crate) struct Props {
    /// The API key entered at the top of the page (empty: none).
    pub(crate) api_key: AttrValue,
}

/// The analysis view.
pub(crate) struct Analyse {
    tab: Tab,
    form: Form,
    file: Option<web_sys::File>,
    file_url: Option<String>,
    phase: Phase,
    restart: bool,
    progress: Option<f64>,
    upload: Option<net::Upload>,
    camera: Option<net::Published>,
    socket: Option<net::Socket>,
    session: Option<(String, String, SourceInfo)>,
    windows: Vec<WindowCard>,
    status: Status,
    error: Option<Problem>,
    ended: Option<String>,
    video_slot: NodeRef,
    video_el: Option<HtmlVideoElement>,
    file_input: NodeRef,
    /// Bumped every second while a session runs: reloads the server-side preview.
    preview_tick: u32,
    /// Streams published over WHIP (by OBS, GStreamer, another browser), and the chosen one.
    streams: Result<Vec<WhipResource>, String>,
    stream: Option<String>,
}

impl Analyse {
    fn fail(&mut self, message: String, hint: &'static str) {
        self.error = Some(Problem { message, hint });
    }

    fn start_message(&self, source: Source) -> Result<ClientMessage, String> {
        if self.form.prompt.trim().is_empty() {
            return Err("Write a prompt first.".into());
        }
        Ok(ClientMessage::Start {
            source,
            prompt: self.form.prompt.clone(),
            window: Some(self.form.window()?),
            generation: Some(self.form.generation()?),
        })
    }

    fn open_session(&mut self, ctx: &Context<Self>, source: Source) {
        let start = match self.start_message(source) {
            Ok(s) => s,
            Err(e) => {
                self.phase = Phase::Idle;
                return self.fail(e, "Fix the highlighted setting.");
            }
        };
        let on_message = ctx.link().callback(Msg::Server);
        let on_close = ctx.link().callback(Msg::Closed);
        match net::Socket::open(&self.form.api_key, &start, on_message, on_close) {
            Ok(s) => {
                self.socket = Some(s);
                self.phase = Phase::Connecting;
            }
            Err(e) => {
                self.phase = Phase::Idle;
                self.fail(e, "Check that the server is running.");
            }
        }
    }

    /// Shows the server's newest frame instead of the local video (sources the browser cannot play).
    fn server_view(&self) -> bool {
        matches!(self.tab, Tab::Rtsp | Tab::Url | Tab::Whip)
    }

    /// The preview element. It lives outside the component's DOM (index.html) and is moved into
    /// the slot after each render, so that a re-render never replaces a playing video. The handle
    /// is kept: while no slot is shown the element is detached and cannot be found by id.
    fn video(&self) -> Option<HtmlVideoElement> {
        self.video_el.clone()
    }

    fn release_camera(&mut self, ctx: &Context<Self>) {
        if let Some(cam) = self.camera.take() {
            let key = self.form.api_key.clone();
            ctx.link().send_future(async move {
                cam.end(&key).await;
                Msg::Noop
            });
        }
    }

    fn begin(&mut self, ctx: &Context<Self>) {
        self.error = None;
        self.ended = None;
        self.windows.clear();
        self.status = Status::default();
        self.session = None;
        match self.tab {
            Tab::Camera => {
                self.phase = Phase::Preparing;
                let key = self.form.api_key.clone();
                ctx.link().send_future(async move { Msg::Camera(net::publish_camera(&key).await) });
            }
            Tab::Whip => {
                let Some(resource) = self.stream.clone() else {
                    return self.fail(
                        "No WebRTC stream is chosen.".into(),
                        "Publish one to this server's WHIP endpoint (/v1/whip, e.g. from OBS), then Refresh.",
                    );
                };
                self.open_session(ctx, Source::Webrtc { resource });
            }
            Tab::Rtsp => {
                let url = self.form.rtsp_url.trim().to_owned();
                if !url.starts_with("rtsp://") {
                    return self.fail(
                        "Enter the camera's RTSP address.".into(),
                        "It looks like rtsp://user:password@camera-address:554/stream",
                    );
                }
                let transport = self.form.rtsp_udp.then_some(RtspTransport::Udp);
                self.open_session(ctx, Source::Rtsp { url, transport });
            }
            Tab::Upload => {
                let Some(file) = self.file.clone() else {
                    return self.fail("Choose a video file first.".into(), "Any common format: MP4, MKV, MOV, WebM.");
                };
                self.phase = Phase::Preparing;
                self.progress = Some(0.0);
                let on_progress = ctx.link().callback(Msg::Progress);
                let on_done = ctx.link().callback(Msg::Uploaded);
                match net::upload(&file, &self.form.api_key, on_progress, on_done) {
                    Ok(u) => self.upload = Some(u),
                    Err(e) => {
                        self.phase = Phase::Idle;
                        self.fail(e, "Try again.");
                    }
                }
            }
            Tab::Url => {
                let url = self.form.url.trim().to_owned();
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return self
                        .fail("Enter the clip's http(s) address.".into(), "The server downloads it and replays it.");
                }
                self.open_session(ctx, Source::Url { url, speed: None, looped: None });
            }
        }
    }
}

impl Component for Analyse {
    type Message = Msg;
    type Properties = Props;

    fn create(ctx: &Context<Self>) -> Self {
        Analyse {
            tab: Tab::Upload,
            form: Form { api_key: ctx.props().api_key.to_string(), ..Form::default() },
            file: None,
            file_url: None,
            phase: Phase::Idle,
            restart: false,
            progress: None,
            upload: None,
            camera: None,
            socket: None,
            session: None,
            windows: Vec::new(),
            status: Status::default(),
            error: None,
            ended: None,
            video_slot: NodeRef::default(),
            video_el: web_sys::window()
                .and_then(|w| w.document())
                .and_then(|d| d.get_element_by_id("preview"))
                .and_then(|v| wasm_bindgen::JsCast::dyn_into::<HtmlVideoElement>(v).ok()),
            preview_tick: 0,
            streams: Ok(Vec::new()),
            stream: None,
            file_input: NodeRef::default(),
        }
    }

    fn changed(&mut self, ctx: &Context<Self>, _old: &Self::Properties) -> bool {
        self.form.api_key = ctx.props().api_key.to_string();
        true
    }

    fn update(&mut self, ctx: &Context<Self>, msg: Self::Message) -> bool {
        match msg {
            Msg::Tab(t) => {
                if self.phase == Phase::Idle {
                    self.tab = t;
                    if t == Tab::Whip {
                        ctx.link().send_message(Msg::ListStreams);
                    }
                    if let Some(v) = self.video() {
                        v.set_src_object(None);
                        let src = if t == Tab::Upload { self.file_url.as_deref() } else { None };
                        v.set_src(src.unwrap_or(""));
                    }
                }
                true
            }
            Msg::Edit(field, v) => {
                self.form.set(field, v);
                true
            }
            Msg::ToggleUdp => {
                self.form.rtsp_udp = !self.form.rtsp_udp;
                true
            }
            Msg::FileChosen => {
                let input = self.file_input.cast::<HtmlInputElement>();
                self.file = input.and_then(|i| i.files()).and_then(|f| f.get(0));
                if let Some(old) = self.file_url.take() {
                    let _ = web_sys::Url::revoke_object_url(&old);
                }
                self.file_url = self.file.as_ref().and_then(|f| web_sys::Url::create_object_url_with_blob(f).ok());
                if let Some(v) = self.video() {
                    v.set_src_object(None);
                    v.set_src(self.file_url.as_deref().unwrap_or(""));
                }
                true
            }
            Msg::Start => {
                if self.phase == Phase::Idle {
                    self.begin(ctx);
                }
                true
            }
            Msg::Stop => {
                if let Some(s) = &self.socket {
                    s.send(&ClientMessage::Stop {});
                } else {
                    self.upload = None;
                    self.progress = None;
                    self.phase = Phase::Idle;
                }
                true
            }
            Msg::Restart => {
                if let Some(s) = &self.socket {
                    self.restart = true;
                    s.send(&ClientMessage::Stop {});
                } else if self.phase == Phase::Idle {
                    self.begin(ctx);
                }
                true
            }
            Msg::SendPrompt => {
                if let Some(s) = &self.socket {
                    s.send(&ClientMessage::Prompt { text: self.form.prompt.clone() });
                    self.status.notice = Some("New prompt: it applies from the next window.".into());
                }
                true
            }
            Msg::Progress(p) => {
                self.progress = Some(p);
                true
            }
            Msg::Uploaded(r) => {
                self.upload = None;
                match r {
                    Ok(id) => {
                        self.progress = Some(1.0);
                        self.open_session(ctx, Source::Upload { id, speed: Some(1.0), looped: Some(false) });
                    }
                    Err(e) => {
                        self.progress = None;
                        self.phase = Phase::Idle;
                        self.fail(e, "Check the file (a video of a format the server reads) and its size.");
                    }
                }
                true
            }
            Msg::Camera(r) => {
                match r {
                    Ok(cam) => {
                        if let Some(v) = self.video() {
                            v.set_src_object(Some(&cam.stream));
                            v.set_muted(true);
                            let _ = v.play();
                        }
                        let resource = cam.resource();
                        self.camera = Some(cam);
                        self.open_session(ctx, Source::Webrtc { resource });
                    }
                    Err(e) => {
                        self.phase = Phase::Idle;
                        self.fail(
                            e,
                            "Allow camera access in the browser, and check that no other app holds the camera.",
                        );
                    }
                }
                true
            }
            Msg::Server(m) => {
                match m {
                    ServerMessage::Ready { session, model, source } => {
                        self.phase = Phase::Running;
                        self.session = Some((session, model, source));
                        if self.server_view() {
                            // The browser cannot play these: show the server's newest frame.
                            ctx.link().send_message(Msg::PreviewTick);
                        }
                        if self.tab == Tab::Upload {
                            // The clip plays in step with its replay (real time from now), once
                            // this render is done.
                            ctx.link().send_message(Msg::PlayClip);
                        }
                    }
                    ServerMessage::Window { id, start_s, end_s, frames, .. } => {
                        self.windows.push(WindowCard { id, start_s, end_s, frames, text: String::new(), done: None });
                    }
                    ServerMessage::Token { window, text } => {
                        if let Some(w) = self.windows.iter_mut().rev().find(|w| w.id == window) {
                            w.text.push_str(&text);
                        }
                    }
                    ServerMessage::WindowDone { window, text, finish_reason, usage, timings, .. } => {
                        if let Some(w) = self.windows.iter_mut().rev().find(|w| w.id == window) {
                            w.text = text;
                            w.done = Some((finish_reason, usage, timings));
                        }
                    }
                    // The window's text shows a constrained answer as it streams.
                    // Ad-hoc sessions have no alert rules.
                    ServerMessage::Decided { .. } | ServerMessage::Alert { .. } => {}
                    ServerMessage::Skipped { windows, .. } => self.status.skipped += windows,
                    ServerMessage::Status { ingest_fps, frames_dropped, lag_ms } => {
                        self.status.ingest_fps = ingest_fps;
                        self.status.frames_dropped = frames_dropped;
                        self.status.lag_ms = lag_ms;
                    }
                    ServerMessage::Reconnecting { attempt, error, retry_in_ms } => {
                        self.status.notice =
                            Some(format!("Source lost ({error}); reconnecting, attempt {attempt} in {retry_in_ms} ms"));
                    }
                    ServerMessage::Resumed { from_s, to_s } => {
                        self.status.notice = Some(format!("Source back; no video from {from_s:.1} s to {to_s:.1} s"));
                    }
                    ServerMessage::Error { code, message, fatal } => {
                        if fatal || code != ErrorCode::Model {
                            self.fail(message, hint(code));
                        } else {
                            self.status.notice = Some(message);
                        }
                    }
                    ServerMessage::Subscribed { .. } => self.phase = Phase::Running,
                    ServerMessage::Lagged { missed } => {
                        self.status.notice = Some(format!("This page fell behind; {missed} events were skipped"));
                    }
                    ServerMessage::Ended { message, .. } => {
                        self.ended = Some(message);
                        self.socket = None;
                        self.phase = Phase::Idle;
                        self.release_camera(ctx);
                        if let Some(v) = self.video() {
                            let _ = v.pause();
                        }
                        if std::mem::take(&mut self.restart) {
                            self.begin(ctx);
                        }
                    }
                }
                true
            }
            Msg::Noop => false,
            Msg::ListStreams => {
                let key = self.form.api_key.clone();
                ctx.link().send_future(async move { Msg::Streams(net::get_json("/v1/whip", &key).await) });
                false
            }
            Msg::Streams(r) => {
                if let Ok(list) = &r {
                    let still_there = self.stream.as_ref().is_some_and(|s| list.iter().any(|r| &r.id == s));
                    if !still_there {
                        self.stream = list.iter().find(|r| !r.watched).map(|r| r.id.clone());
                    }
                }
                self.streams = r;
                true
            }
            Msg::ChooseStream(id) => {
                self.stream = Some(id);
                true
            }
            Msg::PreviewTick => {
                if self.phase != Phase::Running {
                    return false;
                }
                self.preview_tick = self.preview_tick.wrapping_add(1);
                ctx.link().send_future(async {
                    net::sleep(1000).await;
                    Msg::PreviewTick
                });
                true
            }
            Msg::PlayClip => {
                if let Some(v) = self.video() {
                    v.set_muted(true);
                    v.set_current_time(0.0);
                    let p = v.play();
                    ctx.link().send_future(async move {
                        if let Ok(p) = p {
                            let _ = wasm_bindgen_futures::JsFuture::from(p).await;
                        }
                        Msg::Noop
                    });
                }
                false
            }
            Msg::Closed(reason) => {
                if self.socket.take().is_some() {
                    if self.phase != Phase::Idle && self.ended.is_none() {
                        self.fail(
                            format!("The connection to the server was lost: {reason}"),
                            "Check the server, then start again.",
                        );
                    }
                    self.phase = Phase::Idle;
                    self.release_camera(ctx);
                }
                true
            }
            Msg::DismissError => {
                self.error = None;
                true
            }
        }
    }

    fn rendered(&mut self, _ctx: &Context<Self>, _first: bool) {
        if let (Some(slot), Some(v)) = (self.video_slot.get(), self.video()) {
            let v: &web_sys::Node = v.as_ref();
            if v.parent_node().as_ref() != Some(&slot) {
                let _ = slot.append_child(v);
            }
        }
    }

    fn view(&self, ctx: &Context<Self>) -> Html {
        let link = ctx.link();
        let idle = self.phase == Phase::Idle;
        let edit = |field: Field| {
            link.callback(move |e: InputEvent| {
                let v = e.target_unchecked_into::<HtmlInputElement>().value();
                Msg::Edit(field, v)
            })
        };
        let tabs = [Tab::Camera, Tab::Whip, Tab::Rtsp, Tab::Upload, Tab::Url].into_iter().map(|t| {
            let class = if t == self.tab { "tab active" } else { "tab" };
            html! {
                <button class={class} id={format!("tab-{}", t.label().to_lowercase())} disabled={!idle && t != self.tab}
                    onclick={link.callback(move |_| Msg::Tab(t))}>{t.label()}</button>
            }
        });
        let source_panel = match self.tab {
            Tab::Camera => html! {
                <p class="help">{"Publishes this browser's camera to the server over WebRTC (WHIP) and analyses it live."}</p>
            },
            Tab::Whip => {
                let chosen = self.stream.clone().unwrap_or_default();
                let options = match &self.streams {
                    Ok(list) if list.is_empty() => html! { <option value="">{"no stream published yet"}</option> },
                    Ok(list) => list
                        .iter()
                        .map(|r| {
                            let label = format!(
                                "{} · {} · {}{}",
                                r.id,
                                r.codec.as_deref().unwrap_or("no video yet"),
                                if r.connected { "connected" } else { "connecting" },
                                if r.watched { " · watched" } else { "" }
                            );
                            html! { <option value={r.id.clone()} selected={r.id == chosen}>{label}</option> }
                        })
                        .collect::<Html>(),
                    Err(e) => html! { <option value="">{format!("cannot list streams: {e}")}</option> },
                };
                html! {
                    <>
                        <p class="help">{"Analyse a stream published to "}<code>{"/v1/whip"}</code>{" by OBS, GStreamer or another browser."}</p>
                        <label>{"Stream"}
                            <select id="whip-stream" onchange={link.callback(|e: Event| Msg::ChooseStream(e.target_unchecked_into::<web_sys::HtmlSelectElement>().value()))}>
                                {options}
                            </select>
                        </label>
                        <button id="whip-refresh" onclick={link.callback(|_| Msg::ListStreams)}>{"Refresh"}</button>
                    </>
                }
            }
            Tab::Rtsp => html! {
                <>
                    <label>{"Camera URL"}
                        <input id="rtsp-url" type="text" placeholder="rtsp://user:password@camera:554/stream"
                            value={self.form.rtsp_url.clone()} oninput={edit(Field::RtspUrl)} />
                    </label>
                    <label class="check"><input type="checkbox" id="rtsp-udp" checked={self.form.rtsp_udp}
                        onclick={link.callback(|_| Msg::ToggleUdp)} />{"UDP transport (LAN only; TCP otherwise)"}</label>
                </>
            },
            Tab::Upload => html! {
                <>
                    <input id="file" type="file" accept="video/*" ref={self.file_input.clone()}
                        onchange={link.callback(|_| Msg::FileChosen)} />
                    if let Some(p) = self.progress {
                        <div class="progress"><div class="bar" id="upload-progress" style={format!("width: {:.0}%", p * 100.0)}></div>
                        <span>{format!("uploaded {:.0}%", p * 100.0)}</span></div>
                    }
                </>
            },
            Tab::Url => html! {
                <label>{"Clip URL"}
                    <input id="clip-url" type="text" placeholder="https://example.org/clip.mp4"
                        value={self.form.url.clone()} oninput={edit(Field::Url)} />
                </label>
            },
        };
        let num = |label: &str, id: &str, field: Field, value: &str| {
            html! {
                <label class="num">{label}
                    <input id={id.to_owned()} type="text" inputmode="decimal" value={value.to_owned()} oninput={edit(field)} disabled={!idle} />
                </label>
            }
        };
        let f = &self.form;
        let settings = html! {
            <details class="settings" open=true>
                <summary>{"Settings"}</summary>
                <div class="grid">
                    {num("Window (s)", "window-s", Field::WindowS, &f.window_s)}
                    {num("Stride (s)", "stride-s", Field::StrideS, &f.stride_s)}
                    {num("FPS", "fps", Field::Fps, &f.fps)}
                    {num("Min pixels", "min-pixels", Field::MinPixels, &f.min_pixels)}
                    {num("Max pixels", "max-pixels", Field::MaxPixels, &f.max_pixels)}
                    {num("Max tokens", "max-tokens", Field::MaxTokens, &f.max_tokens)}
                    {num("Temperature", "temperature", Field::Temperature, &f.temperature)}
                </div>
            </details>
        };
        let running = self.socket.is_some();
        let controls = html! {
            <div class="controls">
                <button id="start" class="primary" disabled={!idle} onclick={link.callback(|_| Msg::Start)}>{"Start"}</button>
                <button id="stop" disabled={idle} onclick={link.callback(|_| Msg::Stop)}>{"Stop"}</button>
                <button id="restart" disabled={!running} onclick={link.callback(|_| Msg::Restart)}>{"Restart"}</button>
                <button id="send-prompt" disabled={!running} onclick={link.callback(|_| Msg::SendPrompt)}>{"Update prompt"}</button>
            </div>
        };
        let phase = match self.phase {
            Phase::Idle => self.ended.as_ref().map_or("idle".to_owned(), |r| format!("ended: {r}")),
            Phase::Preparing => "preparing the source…".into(),
            Phase::Connecting => "opening the source…".into(),
            Phase::Running => "live".into(),
        };
        let error = self.error.as_ref().map(|p| {
            html! {
                <div class="error" id="error" role="alert">
                    <strong>{&p.message}</strong><span>{p.hint}</span>
                    <button class="dismiss" onclick={link.callback(|_| Msg::DismissError)}>{"×"}</button>
                </div>
            }
        });
        let current = self.windows.last().map(|w| {
            html! {
                <div class="card current" id="current-window">
                    <div class="meta">{format!("window {} · {:.1}–{:.1} s · {} frames", w.id, w.start_s, w.end_s, w.frames)}
                        if w.done.is_none() { <span class="typing">{" · streaming"}</span> }</div>
                    <p class="tokens" id="tokens">{&w.text}</p>
                </div>
            }
        });
        let timeline = self.windows.iter().rev().map(|w| {
            let timing = w.done.as_ref().map(|(reason, usage, t)| {
                format!(
                    "{} tokens · {reason} · vision {:.0} ms · first token {:.0} ms · {:.1} tok/s",
                    usage.completion_tokens, t.vision_ms, t.ttft_ms, t.decode_tok_s
                )
            });
            html! {
                <li class="window" data-window={w.id.to_string()}>
                    <div class="range">{format!("{:.1}–{:.1} s", w.start_s, w.end_s)}</div>
                    <div class="text">{&w.text}</div>
                    <div class="timing">{timing.unwrap_or_else(|| "streaming…".into())}</div>
                </li>
            }
        });
        let source_line = self.session.as_ref().map(|(id, model, s)| {
            format!(
                "{id} · {} {}×{}{} · {model}",
                s.codec,
                s.width,
                s.height,
                if s.fps > 0.0 { format!(" @ {:.2} fps", s.fps) } else { String::new() }
            )
        });
        let st = &self.status;
        html! {
            <div class="analyse">
                {for error}
                <main>
                    <section class="left">
                        <div class="tabs">{for tabs}</div>
                        <div class="source">{source_panel}</div>
                        <label>{"Prompt"}
                            <textarea id="prompt" rows="3" value={self.form.prompt.clone()}
                                oninput={link.callback(|e: InputEvent| Msg::Edit(Field::Prompt, e.target_unchecked_into::<web_sys::HtmlTextAreaElement>().value()))} />
                        </label>
                        {controls}
                        {settings}
                    </section>
                    <section class="right">
                                if let (true, Some((id, _, _))) = (self.server_view(), &self.session) {
                            <img id="server-preview" class="server-preview" alt="the newest frame the server analysed"
                                src={format!("/v1/sessions/{id}/frame.jpg?n={}{}", self.preview_tick,
                                    if self.form.api_key.is_empty() { String::new() } else { format!("&api_key={}", self.form.api_key) })} />
                        } else {
                            <div class="video-slot" ref={self.video_slot.clone()}></div>
                        }
                        <div class="statusbar" id="status">
                            <span id="phase">{phase}</span>
                            if let Some(s) = source_line { <span id="source-info">{s}</span> }
                            <span id="ingest">{format!("ingest {:.1} fps", st.ingest_fps)}</span>
                            <span id="drops">{format!("dropped {} frames", st.frames_dropped)}</span>
                            <span id="lag">{format!("lag {:.0} ms", st.lag_ms)}</span>
                            if st.skipped > 0 { <span id="skipped">{format!("skipped {} windows", st.skipped)}</span> }
                        </div>
                        if let Some(n) = &st.notice { <div class="notice" id="notice">{n}</div> }
                        {for current}
                    </section>
                </main>
                <section class="timeline">
                    <h2>{"Timeline"}</h2>
                    <ol id="timeline">{for timeline}</ol>
                </section>
            </div>
        }
    }
}
