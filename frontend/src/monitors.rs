//! The monitors view: a grid of live cards (one per monitor, each following its monitor over a
//! WebSocket), a form to create or edit one, and a monitor's page with its history.
//!
//! - [`MonitorsView`] owns the list (polled from `GET /v1/monitors`) and the form.
//! - [`MonitorCard`] subscribes to its monitor: the current window's tokens as they stream, the
//!   last answer, a live thumbnail, the state badge and counters; pause, resume, edit, delete.
//! - [`MonitorPage`] shows the history as a timeline of thumbnails and answers, with search and
//!   paging to older events.

use protocol::{
    AlertCondition, AlertRule, AnswerFormat, ClientMessage, Confirm, Event, EventPage, GenerationSettings, Incident,
    IncidentList, Monitor, MonitorList, MonitorPatch, MonitorRequest, NotifyTarget, ServerMessage, Source, WatchState,
    WebhookTarget, WindowSettings,
};
use web_sys::HtmlInputElement;
use yew::prelude::*;

use crate::common::Problem;
use crate::form::number;
use crate::net;

fn with_key(path: &str, key: &str) -> String {
    if key.is_empty() {
        path.to_owned()
    } else {
        let sep = if path.contains('?') { '&' } else { '?' };
        format!("{path}{sep}api_key={}", js_sys::encode_uri_component(key))
    }
}

fn state_label(s: WatchState) -> (&'static str, &'static str) {
    match s {
        WatchState::Starting => ("badge loading", "starting"),
        WatchState::Running => ("badge ready", "running"),
        WatchState::Reconnecting => ("badge loading", "reconnecting"),
        WatchState::Paused => ("badge paused", "paused"),
        WatchState::Failed => ("badge failed", "failed"),
        WatchState::Ended => ("badge paused", "ended"),
    }
}

/// The create/edit form, as typed.
#[derive(Clone, PartialEq, Debug)]
struct MonitorForm {
    /// The monitor being edited (`None`: a new one).
    editing: Option<String>,
    name: String,
    kind: String,
    rtsp_url: String,
    prompt: String,
    window_s: String,
    fps: String,
    max_tokens: String,
    /// The answer's options, comma-separated (empty: free text).
    choices: String,
    /// What alerts: the option (with choices) or a regex the text contains (free text); empty: no alert.
    alert_when: String,
    /// N of M windows confirm it.
    confirm_n: String,
    confirm_m: String,
    webhook_url: String,
    /// The stored webhook's secret as the API shows it (`***`): sent back, it keeps the secret.
    webhook_secret: Option<String>,
}

impl Default for MonitorForm {
    fn default() -> Self {
        MonitorForm {
            editing: None,
            name: String::new(),
            kind: "rtsp".into(),
            rtsp_url: String::new(),
            prompt: "Describe what is happening.".into(),
            window_s: "4".into(),
            fps: "2".into(),
            max_tokens: "64".into(),
            choices: String::new(),
            alert_when: String::new(),
            confirm_n: "1".into(),
            confirm_m: "1".into(),
            webhook_url: String::new(),
            webhook_secret: None,
        }
    }
}

impl MonitorForm {
    fn of(m: &Monitor) -> Self {
        MonitorForm {
            editing: Some(m.id.clone()),
            name: m.name.clone(),
            kind: match m.source {
                Source::Upload { .. } => "upload".into(),
                _ => "rtsp".into(),
            },
            rtsp_url: String::new(),
            prompt: m.prompt.clone(),
            window_s: m.window.seconds.map_or("4".into(), |v| v.to_string()),
            fps: m.window.fps.map_or("2".into(), |v| v.to_string()),
            max_tokens: m.generation.max_tokens.map_or("64".into(), |v| v.to_string()),
            choices: match &m.generation.answer {
                Some(AnswerFormat::Choice(c)) => c.join(", "),
                _ => String::new(),
            },
            alert_when: m
                .alert
                .as_ref()
                .and_then(|a| {
                    a.when
                        .matches
                        .clone()
                        .or_else(|| a.when.equals.as_ref().and_then(|v| v.as_str().map(str::to_owned)))
                })
                .unwrap_or_default(),
            confirm_n: m.alert.as_ref().and_then(|a| a.confirm).map_or("1".into(), |c| c.windows.to_string()),
            confirm_m: m.alert.as_ref().and_then(|a| a.confirm).map_or("1".into(), |c| c.of.to_string()),
            webhook_url: webhook(m).map(|w| w.url.clone()).unwrap_or_default(),
            webhook_secret: webhook(m).and_then(|w| w.secret.clone()),
        }
    }

    fn choices(&self) -> Vec<String> {
        self.choices.split(',').map(|c| c.trim().to_owned()).filter(|c| !c.is_empty()).collect()
    }

    /// The alert rule the form describes (none when "Alert when" is empty).
    fn alert(&self) -> Result<Option<AlertRule>, String> {
        let when = self.alert_when.trim();
        if when.is_empty() {
            return Ok(None);
        }
        let choices = self.choices();
        let condition = if choices.is_empty() {
            AlertCondition { matches: Some(when.to_owned()), ..Default::default() }
        } else {
            AlertCondition { equals: Some(serde_json::Value::from(when)), ..Default::default() }
        };
        let (n, m): (u32, u32) = (number(&self.confirm_n, "Confirm")?, number(&self.confirm_m, "of")?);
        let url = self.webhook_url.trim();
        let notify = if url.is_empty() {
            Vec::new()
        } else {
            vec![NotifyTarget::Webhook(WebhookTarget { url: url.to_owned(), secret: self.webhook_secret.clone() })]
        };
        Ok(Some(AlertRule {
            when: condition,
            confirm: Some(Confirm { windows: n, of: m }),
            clear_after: None,
            cooldown_s: None,
            notify,
        }))
    }

    fn window(&self) -> Result<WindowSettings, String> {
        Ok(WindowSettings {
            seconds: Some(number(&self.window_s, "Window")?),
            fps: Some(number(&self.fps, "FPS")?),
            ..Default::default()
        })
    }

    fn generation(&self) -> Result<GenerationSettings, String> {
        let choices = self.choices();
        Ok(GenerationSettings {
            max_tokens: Some(number(&self.max_tokens, "Max tokens")?),
            answer: (!choices.is_empty()).then_some(AnswerFormat::Choice(choices)),
            ..Default::default()
        })
    }
}

fn webhook(m: &Monitor) -> Option<&WebhookTarget> {
    m.alert.as_ref()?.notify.iter().map(|NotifyTarget::Webhook(w)| w).next()
}

/// The monitors view's properties.
#[derive(Properties, PartialEq)]
pub(crate) struct Props {
    /// The API key (empty: none).
    pub(crate) api_key: AttrValue,
}

pub(crate) enum Msg {
    Poll,
    Listed(Result<MonitorList, String>),
    New,
    Edit(Box<Monitor>),
    CloseForm,
    Field(&'static str, String),
    Save,
    Uploaded(Result<String, String>),
    Saved(Box<Result<Monitor, String>>),
    SetEnabled(String, bool),
    Delete(String),
    Done(Result<(), String>),
    Open(String),
    CloseHistory,
    Incidents(Result<IncidentList, String>),
}

/// The monitors view.
pub(crate) struct MonitorsView {
    list: Result<Vec<Monitor>, String>,
    form: Option<MonitorForm>,
    saving: bool,
    error: Option<Problem>,
    open: Option<String>,
    file_input: NodeRef,
    _upload: Option<net::Upload>,
    /// The newest incidents.
    incidents: Vec<Incident>,
}

impl MonitorsView {
    fn key(ctx: &Context<Self>) -> String {
        ctx.props().api_key.to_string()
    }

    fn fail(&mut self, message: String) {
        self.error = Some(Problem { message, hint: "Fix what the message says, then save again." });
    }

    fn create(&mut self, ctx: &Context<Self>, form: &MonitorForm, source: Source) {
        let (window, generation, alert) = match (form.window(), form.generation(), form.alert()) {
            (Ok(w), Ok(g), Ok(a)) => (w, g, a),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return self.fail(e),
        };
        let req = MonitorRequest {
            name: form.name.trim().to_owned(),
            source,
            prompt: form.prompt.clone(),
            window: Some(window),
            generation: Some(generation),
            enabled: None,
            retention: None,
            answer: None,
            alert,
        };
        let key = Self::key(ctx);
        self.saving = true;
        ctx.link()
            .send_future(async move { Msg::Saved(Box::new(net::send_json("POST", "/v1/monitors", &key, &req).await)) });
    }
}

impl MonitorsView {
    fn incidents_view(&self, key: &str) -> Html {
        if self.incidents.is_empty() {
            return html! {};
        }
        let names: std::collections::HashMap<&str, &str> = self
            .list
            .as_ref()
            .map(|l| l.iter().map(|m| (m.id.as_str(), m.name.as_str())).collect())
            .unwrap_or_default();
        let rows = self.incidents.iter().map(|i| {
            let open = i.state == protocol::IncidentState::Open;
            let frame = i.frames.first().map(|f| with_key(f, key));
            let clip = i.clip.as_ref().map(|c| with_key(c, key));
            let text = i.windows.first().map(|w| w.text.clone()).unwrap_or_default();
            html! {
                <div class="incident" data-incident={i.id.clone()}>
                    if let Some(src) = clip {
                        <video class="evidence-clip" controls=true muted=true autoplay=true loop=true playsinline=true
                            poster={frame.clone().unwrap_or_default()} src={src} />
                    } else if let Some(src) = frame {
                        <img class="evidence" alt="the key frame of the window that opened it" src={src} />
                    }
                    <div>
                        <strong>{names.get(i.monitor.as_str()).copied().unwrap_or(i.monitor.as_str())}</strong>
                        <span class={if open { "badge failed" } else { "badge paused" }}>{if open { "open" } else { "closed" }}</span>
                        <p class="meta">{format!("opened {}{} · {} window(s)", i.opened_at,
                            i.closed_at.as_ref().map(|c| format!(", closed {c}")).unwrap_or_default(), i.windows.len())}</p>
                        <p class="last">{text}</p>
                    </div>
                </div>
            }
        });
        html! {
            <section class="incidents card" id="incidents">
                <h2>{"Incidents"}</h2>
                {for rows}
            </section>
        }
    }
}

impl Component for MonitorsView {
    type Message = Msg;
    type Properties = Props;

    fn create(ctx: &Context<Self>) -> Self {
        ctx.link().send_message(Msg::Poll);
        MonitorsView {
            list: Ok(Vec::new()),
            form: None,
            saving: false,
            error: None,
            open: None,
            file_input: NodeRef::default(),
            _upload: None,
            incidents: Vec::new(),
        }
    }

    fn update(&mut self, ctx: &Context<Self>, msg: Self::Message) -> bool {
        let key = Self::key(ctx);
        match msg {
            Msg::Poll => {
                ctx.link().send_future(async move { Msg::Listed(net::get_json("/v1/monitors", &key).await) });
                false
            }
            Msg::Listed(r) => {
                self.list = r.map(|l| l.monitors);
                let k = key.clone();
                ctx.link()
                    .send_future(async move { Msg::Incidents(net::get_json("/v1/incidents?limit=10", &k).await) });
                ctx.link().send_future(async {
                    net::sleep(2000).await;
                    Msg::Poll
                });
                true
            }
            Msg::New => {
                self.form = Some(MonitorForm::default());
                true
            }
            Msg::Edit(m) => {
                self.form = Some(MonitorForm::of(&m));
                true
            }
            Msg::CloseForm => {
                self.form = None;
                true
            }
            Msg::Field(name, v) => {
                if let Some(f) = &mut self.form {
                    match name {
                        "name" => f.name = v,
                        "kind" => f.kind = v,
                        "rtsp_url" => f.rtsp_url = v,
                        "prompt" => f.prompt = v,
                        "window" => f.window_s = v,
                        "fps" => f.fps = v,
                        "choices" => f.choices = v,
                        "alert_when" => f.alert_when = v,
                        "confirm_n" => f.confirm_n = v,
                        "confirm_m" => f.confirm_m = v,
                        "webhook_url" => {
                            if v != f.webhook_url {
                                f.webhook_secret = None;
                            }
                            f.webhook_url = v;
                        }
                        _ => f.max_tokens = v,
                    }
                }
                true
            }
            Msg::Save => {
                let Some(form) = self.form.clone() else { return false };
                self.error = None;
                if let Some(id) = &form.editing {
                    let (window, generation, alert) = match (form.window(), form.generation(), form.alert()) {
                        (Ok(w), Ok(g), Ok(a)) => (w, g, a),
                        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                            self.fail(e);
                            return true;
                        }
                    };
                    let patch = MonitorPatch {
                        name: Some(form.name.trim().to_owned()),
                        prompt: Some(form.prompt.clone()),
                        window: Some(window),
                        generation: Some(generation),
                        alert: Some(alert),
                        ..Default::default()
                    };
                    let path = format!("/v1/monitors/{id}");
                    self.saving = true;
                    ctx.link().send_future(async move {
                        Msg::Saved(Box::new(net::send_json("PATCH", &path, &key, &patch).await))
                    });
                } else if form.kind == "upload" {
                    let file =
                        self.file_input.cast::<HtmlInputElement>().and_then(|i| i.files()).and_then(|f| f.get(0));
                    let Some(file) = file else {
                        self.fail("Choose a video file: it loops as a standing camera.".into());
                        return true;
                    };
                    self.saving = true;
                    match net::upload(&file, &key, Callback::noop(), ctx.link().callback(Msg::Uploaded)) {
                        Ok(u) => self._upload = Some(u),
                        Err(e) => {
                            self.saving = false;
                            self.fail(e);
                        }
                    }
                } else {
                    let url = form.rtsp_url.trim().to_owned();
                    self.create(ctx, &form, Source::Rtsp { url, transport: None });
                }
                true
            }
            Msg::Uploaded(r) => {
                self._upload = None;
                match (r, self.form.clone()) {
                    (Ok(id), Some(form)) => {
                        self.create(ctx, &form, Source::Upload { id, speed: Some(1.0), looped: Some(true) })
                    }
                    (Err(e), _) => {
                        self.saving = false;
                        self.fail(e);
                    }
                    (Ok(_), None) => self.saving = false,
                }
                true
            }
            Msg::Saved(r) => {
                self.saving = false;
                match *r {
                    Ok(_) => {
                        self.form = None;
                        ctx.link().send_future(async move { Msg::Listed(net::get_json("/v1/monitors", &key).await) });
                    }
                    Err(e) => self.fail(e),
                }
                true
            }
            Msg::SetEnabled(id, enabled) => {
                let patch = MonitorPatch { enabled: Some(enabled), ..Default::default() };
                let path = format!("/v1/monitors/{id}");
                ctx.link().send_future(async move {
                    Msg::Done(net::send_json::<_, Monitor>("PATCH", &path, &key, &patch).await.map(drop))
                });
                false
            }
            Msg::Delete(id) => {
                if self.open.as_deref() == Some(id.as_str()) {
                    self.open = None;
                }
                let path = format!("/v1/monitors/{id}");
                ctx.link().send_future(async move { Msg::Done(net::delete(&path, &key).await) });
                true
            }
            Msg::Done(r) => {
                if let Err(e) = r {
                    self.fail(e);
                }
                ctx.link().send_future(async move { Msg::Listed(net::get_json("/v1/monitors", &key).await) });
                true
            }
            Msg::Open(id) => {
                self.open = Some(id);
                true
            }
            Msg::CloseHistory => {
                self.open = None;
                true
            }
            Msg::Incidents(r) => {
                // A failure shows in the list's own error; keep the last incidents meanwhile.
                if let Ok(l) = r {
                    self.incidents = l.incidents;
                }
                true
            }
        }
    }

    fn view(&self, ctx: &Context<Self>) -> Html {
        let link = ctx.link();
        let key = ctx.props().api_key.clone();
        let error = self.error.as_ref().map(|p| {
            html! { <div class="error" id="monitor-error" role="alert"><strong>{&p.message}</strong><span>{p.hint}</span></div> }
        });
        let field = |name: &'static str| {
            link.callback(move |e: InputEvent| Msg::Field(name, e.target_unchecked_into::<HtmlInputElement>().value()))
        };
        let form = self.form.as_ref().map(|f| {
            let new = f.editing.is_none();
            html! {
                <div class="card monitor-form" id="monitor-form">
                    <h2>{if new { "New monitor" } else { "Edit monitor" }}</h2>
                    <label>{"Name"}<input id="monitor-name" type="text" value={f.name.clone()} oninput={field("name")} /></label>
                    if new {
                        <label>{"Source"}
                            <select id="monitor-source-kind" onchange={link.callback(|e: web_sys::Event| Msg::Field("kind", e.target_unchecked_into::<web_sys::HtmlSelectElement>().value()))}>
                                <option value="rtsp" selected={f.kind == "rtsp"}>{"RTSP camera"}</option>
                                <option value="upload" selected={f.kind == "upload"}>{"A clip, looped as a camera"}</option>
                            </select>
                        </label>
                        if f.kind == "rtsp" {
                            <label>{"Camera URL"}<input id="monitor-rtsp-url" type="text" placeholder="rtsp://user:password@camera:554/stream"
                                value={f.rtsp_url.clone()} oninput={field("rtsp_url")} /></label>
                        } else {
                            <input id="monitor-file" type="file" accept="video/*" ref={self.file_input.clone()} />
                        }
                    }
                    <label>{"Prompt"}<textarea id="monitor-prompt" rows="2" value={f.prompt.clone()}
                        oninput={link.callback(|e: InputEvent| Msg::Field("prompt", e.target_unchecked_into::<web_sys::HtmlTextAreaElement>().value()))} /></label>
                    <div class="grid3">
                        <label class="num">{"Window (s)"}<input id="monitor-window" type="text" value={f.window_s.clone()} oninput={field("window")} /></label>
                        <label class="num">{"FPS"}<input id="monitor-fps" type="text" value={f.fps.clone()} oninput={field("fps")} /></label>
                        <label class="num">{"Max tokens"}<input id="monitor-max-tokens" type="text" value={f.max_tokens.clone()} oninput={field("max_tokens")} /></label>
                    </div>
                    <fieldset class="rule">
                        <legend>{"Answer and alert"}</legend>
                        <label>{"Answer options (comma-separated; empty for free text)"}
                            <input id="monitor-choices" type="text" placeholder="yes, no" value={f.choices.clone()} oninput={field("choices")} /></label>
                        <label>{if f.choices().is_empty() { "Alert when the answer contains (a regex; empty: no alert)" } else { "Alert when the answer is (one of the options; empty: no alert)" }}
                            <input id="monitor-alert-when" type="text" placeholder={if f.choices().is_empty() { "(?i)person" } else { "yes" }}
                                value={f.alert_when.clone()} oninput={field("alert_when")} /></label>
                        <div class="grid3">
                            <label class="num">{"Confirm in"}<input id="monitor-confirm-n" type="text" value={f.confirm_n.clone()} oninput={field("confirm_n")} /></label>
                            <label class="num">{"of the last windows"}<input id="monitor-confirm-m" type="text" value={f.confirm_m.clone()} oninput={field("confirm_m")} /></label>
                        </div>
                        <label>{"Webhook (optional)"}<input id="monitor-webhook" type="text" placeholder="http://homeassistant.local:8123/api/webhook/..."
                            value={f.webhook_url.clone()} oninput={field("webhook_url")} /></label>
                    </fieldset>
                    <div class="controls">
                        <button id="monitor-save" class="primary" disabled={self.saving} onclick={link.callback(|_| Msg::Save)}>{if self.saving { "Saving…" } else { "Save" }}</button>
                        <button onclick={link.callback(|_| Msg::CloseForm)}>{"Cancel"}</button>
                    </div>
                </div>
            }
        });
        let cards = match &self.list {
            Ok(list) if list.is_empty() => {
                html! { <p class="help" id="no-monitors">{"No monitors yet: a monitor watches a camera around the clock and keeps what it saw."}</p> }
            }
            Ok(list) => list
                .iter()
                .map(|m| {
                    let (id, edit, enabled) = (m.id.clone(), Box::new(m.clone()), !m.enabled);
                    let (open_id, delete_id, toggle_id) = (id.clone(), id.clone(), id.clone());
                    html! {
                        <MonitorCard key={id.clone()} monitor={m.clone()} api_key={key.clone()}
                            on_open={link.callback(move |_| Msg::Open(open_id.clone()))}
                            on_edit={link.callback(move |_| Msg::Edit(edit.clone()))}
                            on_toggle={link.callback(move |_| Msg::SetEnabled(toggle_id.clone(), enabled))}
                            on_delete={link.callback(move |_| Msg::Delete(delete_id.clone()))} />
                    }
                })
                .collect::<Html>(),
            Err(e) => html! { <p class="error">{format!("cannot list the monitors: {e}")}</p> },
        };
        let page = self.open.as_ref().and_then(|id| {
            let m = self.list.as_ref().ok()?.iter().find(|m| &m.id == id)?.clone();
            let page_key = m.id.clone();
            Some(html! { <MonitorPage key={page_key} monitor={m} api_key={key.clone()} on_close={link.callback(|_| Msg::CloseHistory)} /> })
        });
        html! {
            <div class="monitors">
                {for error}
                <div class="toolbar">
                    <button id="new-monitor" class="primary" onclick={link.callback(|_| Msg::New)}>{"New monitor"}</button>
                </div>
                {for form}
                <div class="monitor-grid" id="monitor-grid">{cards}</div>
                {self.incidents_view(&key)}
                {for page}
            </div>
        }
    }
}

/// A card's properties.
#[derive(Properties, PartialEq)]
pub(crate) struct CardProps {
    monitor: Monitor,
    api_key: AttrValue,
    on_open: Callback<()>,
    on_edit: Callback<()>,
    on_toggle: Callback<()>,
    on_delete: Callback<()>,
}

pub(crate) enum CardMsg {
    Server(ServerMessage),
    Closed,
    Tick,
}

/// One monitor, live.
pub(crate) struct MonitorCard {
    _socket: Option<net::Socket>,
    /// The window being answered: its id and text so far.
    current: Option<(u64, String)>,
    /// The last finished answer seen live.
    last: Option<String>,
    notice: Option<String>,
    tick: u32,
    /// The open incident, as the alert messages tell it (from the listing at first).
    incident: Option<String>,
}

impl Component for MonitorCard {
    type Message = CardMsg;
    type Properties = CardProps;

    fn create(ctx: &Context<Self>) -> Self {
        let p = ctx.props();
        let subscribe = ClientMessage::Subscribe { watch: None, monitor: Some(p.monitor.id.clone()) };
        let socket = net::Socket::open(
            &p.api_key,
            &subscribe,
            ctx.link().callback(CardMsg::Server),
            ctx.link().callback(|_: String| CardMsg::Closed),
        )
        .ok();
        ctx.link().send_message(CardMsg::Tick);
        let incident = p.monitor.open_incident.clone();
        MonitorCard { _socket: socket, current: None, last: None, notice: None, tick: 0, incident }
    }

    fn update(&mut self, ctx: &Context<Self>, msg: Self::Message) -> bool {
        match msg {
            CardMsg::Server(m) => match m {
                ServerMessage::Window { id, .. } => self.current = Some((id, String::new())),
                ServerMessage::Token { window, text } => match &mut self.current {
                    Some((id, so_far)) if *id == window => so_far.push_str(&text),
                    _ => self.current = Some((window, text)),
                },
                ServerMessage::WindowDone { text, .. } => {
                    self.current = None;
                    self.last = Some(text);
                }
                ServerMessage::Error { message, .. } => self.notice = Some(message),
                ServerMessage::Reconnecting { error, .. } => self.notice = Some(format!("reconnecting: {error}")),
                ServerMessage::Resumed { .. } | ServerMessage::Ready { .. } => self.notice = None,
                ServerMessage::Ended { message, .. } => self.notice = Some(message),
                ServerMessage::Alert { incident, state, .. } => {
                    self.incident = (state == protocol::AlertState::Firing).then_some(incident);
                }
                _ => return false,
            },
            CardMsg::Closed => self._socket = None,
            CardMsg::Tick => {
                self.tick = self.tick.wrapping_add(1);
                ctx.link().send_future(async {
                    net::sleep(2000).await;
                    CardMsg::Tick
                });
            }
        }
        true
    }

    fn view(&self, ctx: &Context<Self>) -> Html {
        let p = ctx.props();
        let m = &p.monitor;
        let (class, label) = state_label(m.state);
        let last = self.last.clone().or_else(|| m.last_event.as_ref().map(|e| e.text.clone()));
        let thumb = with_key(&format!("/v1/monitors/{}/frame.jpg?n={}", m.id, self.tick), &p.api_key);
        let (on_open, on_edit, on_toggle, on_delete) =
            (p.on_open.clone(), p.on_edit.clone(), p.on_toggle.clone(), p.on_delete.clone());
        html! {
            <div class="card monitor-card" data-monitor={m.id.clone()}>
                <div class="card-head">
                    <strong class="name">{&m.name}</strong>
                    if let Some(i) = &self.incident {
                        <span class="alert-badge bad" data-incident={i.clone()} title="an incident is open">{"ALERT"}</span>
                    }
                    <span class={format!("{class} state")}>{label}</span>
                </div>
                if m.state == WatchState::Running || m.state == WatchState::Reconnecting {
                    <img class="live" alt="the newest frame the monitor analysed" src={thumb} />
                } else {
                    <div class="live placeholder">{m.reason.clone().unwrap_or_else(|| label.to_owned())}</div>
                }
                <p class="tokens">{self.current.as_ref().map(|c| c.1.clone()).unwrap_or_default()}</p>
                <p class="last"><span class="meta">{"last answer: "}</span>{last.unwrap_or_else(|| "none yet".into())}</p>
                if let Some(n) = &self.notice { <p class="meta notice-line">{n}</p> }
                <div class="meta counters">{format!("{} windows · {} skipped · {} events · {} failures",
                    m.counters.windows, m.counters.skipped, m.counters.events, m.counters.failures)}</div>
                <div class="controls">
                    <button class="open" onclick={move |_| on_open.emit(())}>{"History"}</button>
                    <button class="edit" onclick={move |_| on_edit.emit(())}>{"Edit"}</button>
                    <button class="pause" onclick={move |_| on_toggle.emit(())}>{if m.enabled { "Pause" } else { "Resume" }}</button>
                    <button class="delete" onclick={move |_| on_delete.emit(())}>{"Delete"}</button>
                </div>
            </div>
        }
    }
}

/// A monitor page's properties.
#[derive(Properties, PartialEq)]
pub(crate) struct PageProps {
    monitor: Monitor,
    api_key: AttrValue,
    on_close: Callback<()>,
}

pub(crate) enum PageMsg {
    Query(String),
    Search,
    Older,
    Loaded(bool, Result<EventPage, String>),
}

/// A monitor's history: newest first, searchable, paged.
pub(crate) struct MonitorPage {
    query: String,
    events: Vec<Event>,
    next: Option<String>,
    error: Option<String>,
    loading: bool,
}

impl MonitorPage {
    fn load(&mut self, ctx: &Context<Self>, older: bool) {
        let p = ctx.props();
        let mut path = format!("/v1/monitors/{}/events?limit=20", p.monitor.id);
        if !self.query.trim().is_empty() {
            path.push_str(&format!("&q={}", js_sys::encode_uri_component(self.query.trim())));
        }
        if older && let Some(n) = &self.next {
            path.push_str(&format!("&before={n}"));
        }
        let key = p.api_key.to_string();
        self.loading = true;
        ctx.link().send_future(async move { PageMsg::Loaded(older, net::get_json(&path, &key).await) });
    }
}

impl Component for MonitorPage {
    type Message = PageMsg;
    type Properties = PageProps;

    fn create(ctx: &Context<Self>) -> Self {
        let mut page =
            MonitorPage { query: String::new(), events: Vec::new(), next: None, error: None, loading: false };
        page.load(ctx, false);
        page
    }

    fn update(&mut self, ctx: &Context<Self>, msg: Self::Message) -> bool {
        match msg {
            PageMsg::Query(q) => self.query = q,
            PageMsg::Search => self.load(ctx, false),
            PageMsg::Older => self.load(ctx, true),
            PageMsg::Loaded(older, r) => {
                self.loading = false;
                match r {
                    Ok(page) => {
                        if !older {
                            self.events.clear();
                        }
                        self.events.extend(page.events);
                        self.next = page.next;
                        self.error = None;
                    }
                    Err(e) => self.error = Some(e),
                }
            }
        }
        true
    }

    fn view(&self, ctx: &Context<Self>) -> Html {
        let p = ctx.props();
        let link = ctx.link();
        let on_close = p.on_close.clone();
        let events = self.events.iter().map(|e| {
            let thumb = e.thumbnail.as_ref().map(|t| with_key(t, &p.api_key));
            html! {
                <li class="event" data-event={e.id.to_string()}>
                    if let Some(t) = thumb { <img class="thumb" alt="the window's last frame" loading="lazy" src={t} /> }
                    <div>
                        <div class="meta">{format!("{} · {:.1}–{:.1} s · {}", e.started_at, e.start_s, e.end_s, e.finish_reason)}</div>
                        <div class="text">{&e.text}</div>
                        <div class="meta">{format!("prompt: {}", e.prompt)}</div>
                    </div>
                </li>
            }
        });
        html! {
            <section class="history card" id="history">
                <div class="card-head">
                    <h2>{format!("History of {}", p.monitor.name)}</h2>
                    <a href={with_key(&format!("/v1/monitors/{}/events.jsonl", p.monitor.id), &p.api_key)} id="history-export">{"export (JSON lines)"}</a>
                    <button onclick={move |_| on_close.emit(())}>{"Close"}</button>
                </div>
                <div class="controls">
                    <input id="history-search" type="text" placeholder="words the answer contains" value={self.query.clone()}
                        oninput={link.callback(|e: InputEvent| PageMsg::Query(e.target_unchecked_into::<HtmlInputElement>().value()))}
                        onkeydown={link.batch_callback(|e: KeyboardEvent| (e.key() == "Enter").then_some(PageMsg::Search))} />
                    <button id="history-go" onclick={link.callback(|_| PageMsg::Search)}>{"Search"}</button>
                </div>
                if let Some(e) = &self.error { <p class="error">{e}</p> }
                <ol class="events" id="history-events">{for events}</ol>
                if self.events.is_empty() && !self.loading { <p class="help" id="history-empty">{"No events match."}</p> }
                if self.next.is_some() {
                    <button id="history-older" disabled={self.loading} onclick={link.callback(|_| PageMsg::Older)}>{"Older"}</button>
                }
            </section>
        }
    }
}
