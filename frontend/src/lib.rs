//! The Lookout web UI (Yew, wasm32), served by `lookout serve` at `/`.
//!
//! The root component ([`App`]) shows the header (the model's health, the API key) and one of
//! two views, each its own component with its own state:
//! - [`analyse::Analyse`]: ad-hoc analysis of a camera, an RTSP stream, an upload or a URL;
//! - [`monitors::MonitorsView`]: the monitors as a grid of live cards, a form to create or edit
//!   one, and a monitor's page with its searchable history.
//!
//! Every message on the wire is a `protocol` type; no JSON shape is written by hand here.
#![forbid(unsafe_code)]
// Yew's `html!` expands to code these lints dislike.
#![allow(clippy::let_unit_value)]

mod analyse;
mod common;
mod form;
mod monitors;
mod net;

use protocol::{Health, HealthStatus};
use wasm_bindgen::prelude::*;
use web_sys::HtmlInputElement;
use yew::prelude::*;

/// Which view the page shows.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum View {
    Analyse,
    Monitors,
}

enum Msg {
    PollHealth,
    Health(Result<Health, String>),
    Show(View),
    ApiKey(String),
}

/// The page: header and the chosen view.
struct App {
    health: Option<Health>,
    health_error: Option<String>,
    view: View,
    api_key: AttrValue,
}

impl Component for App {
    type Message = Msg;
    type Properties = ();

    fn create(ctx: &Context<Self>) -> Self {
        ctx.link().send_message(Msg::PollHealth);
        let view = match web_sys::window().and_then(|w| w.location().hash().ok()).as_deref() {
            Some("#monitors") => View::Monitors,
            _ => View::Analyse,
        };
        App { health: None, health_error: None, view, api_key: AttrValue::default() }
    }

    fn update(&mut self, ctx: &Context<Self>, msg: Self::Message) -> bool {
        match msg {
            Msg::PollHealth => {
                ctx.link().send_future(async { Msg::Health(net::get_json::<Health>("/v1/health", "").await) });
                false
            }
            Msg::Health(r) => {
                let again = match &r {
                    Ok(h) => h.status == HealthStatus::Loading,
                    Err(_) => true,
                };
                match r {
                    Ok(h) => {
                        self.health = Some(h);
                        self.health_error = None;
                    }
                    Err(e) => self.health_error = Some(e),
                }
                if again {
                    ctx.link().send_future(async {
                        net::sleep(1500).await;
                        Msg::PollHealth
                    });
                }
                true
            }
            Msg::Show(v) => {
                self.view = v;
                if let Some(w) = web_sys::window() {
                    let _ = w.location().set_hash(if v == View::Monitors { "monitors" } else { "" });
                }
                true
            }
            Msg::ApiKey(k) => {
                self.api_key = k.into();
                true
            }
        }
    }

    fn view(&self, ctx: &Context<Self>) -> Html {
        let link = ctx.link();
        let health = match (&self.health, &self.health_error) {
            (Some(h), _) => {
                let (class, label) = match h.status {
                    HealthStatus::Loading => ("badge loading", "model loading…"),
                    HealthStatus::Ready => ("badge ready", "ready"),
                    HealthStatus::Failed => ("badge failed", "model failed"),
                };
                html! {
                    <div class="health">
                        <span class={class} id="health">{label}</span>
                        <span class="model" id="model">{&h.model}</span>
                        <span class="device" id="device">{&h.device}</span>
                        if let Some(e) = &h.error { <span class="health-error">{e}</span> }
                    </div>
                }
            }
            (None, Some(e)) => {
                html! { <div class="health"><span class="badge failed" id="health">{"offline"}</span><span>{e}</span></div> }
            }
            (None, None) => {
                html! { <div class="health"><span class="badge loading" id="health">{"connecting…"}</span></div> }
            }
        };
        let nav = |v: View, id: &'static str, label: &'static str| {
            let class = if self.view == v { "nav active" } else { "nav" };
            html! { <button class={class} id={id} onclick={link.callback(move |_| Msg::Show(v))}>{label}</button> }
        };
        html! {
            <div class="app">
                <header>
                    <h1>{"Lookout"}</h1>
                    <nav>
                        {nav(View::Analyse, "nav-analyse", "Analyse")}
                        {nav(View::Monitors, "nav-monitors", "Monitors")}
                    </nav>
                    {health}
                    <label class="key">{"API key"}
                        <input id="api-key" type="password" value={self.api_key.clone()}
                            oninput={link.callback(|e: InputEvent| Msg::ApiKey(e.target_unchecked_into::<HtmlInputElement>().value()))} />
                    </label>
                </header>
                {match self.view {
                    View::Analyse => html! { <analyse::Analyse api_key={self.api_key.clone()} /> },
                    View::Monitors => html! { <monitors::MonitorsView api_key={self.api_key.clone()} /> },
                }}
            </div>
        }
    }
}

/// Mounts the app (called by the generated JS when the module loads).
#[wasm_bindgen(start)]
pub fn run() {
    let root = web_sys::window().and_then(|w| w.document()).and_then(|d| d.get_element_by_id("app"));
    match root {
        Some(root) => yew::Renderer::<App>::with_root(root).render(),
        None => yew::Renderer::<App>::new().render(),
    };
}
