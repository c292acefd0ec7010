//! `lookout`: watch video with Qwen3-VL.
//!
//! Run `lookout --help` for the commands.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

// Tensor ops allocate and free large buffers constantly; glibc malloc returns them to the OS each
// time (a page fault storm), mimalloc keeps and reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use ws_gateway::clip::sample_file;
use ws_gateway::tensors::{TensorData, write_safetensors};

#[derive(Parser)]
#[command(name = "lookout", version, about = "Watch video with a vision-language model")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Preprocess a clip into the tensors Qwen3-VL consumes (reference parity with qwen-vl-utils).
    Sample(SampleArgs),
    /// Ask Qwen3-VL about a clip and stream the answer to stdout.
    Analyze(Box<AnalyzeArgs>),
    /// Run the service: WebSocket streaming sessions and the REST API.
    Serve(Box<ServeArgs>),
}

/// `lookout serve` settings. Each comes from the flag, else the `LOOKOUT_*` variable, else the
/// `--config` TOML file (same names, snake_case), else the default.
#[derive(Args, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ServeArgs {
    /// A TOML file with any of these settings.
    #[arg(long, env = "LOOKOUT_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// A local checkpoint directory or a Hub id.
    #[arg(long, env = "LOOKOUT_MODEL")]
    model: Option<String>,
    /// Address to listen on [default: 127.0.0.1].
    #[arg(long, env = "LOOKOUT_HOST")]
    host: Option<String>,
    /// Port to listen on, 0 picks a free one [default: 8000].
    #[arg(long, env = "LOOKOUT_PORT")]
    port: Option<u16>,
    /// Where uploads are kept [default: lookout-data].
    #[arg(long, env = "LOOKOUT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Require `Authorization: Bearer KEY` on every route but /v1/health.
    #[arg(long, env = "LOOKOUT_API_KEY")]
    api_key: Option<String>,
    /// Largest upload, MiB [default: 512].
    #[arg(long, env = "LOOKOUT_MAX_UPLOAD_MB")]
    max_upload_mb: Option<u64>,
    /// Concurrent analysis sessions (watches started over WebSockets) [default: 8].
    #[arg(long, env = "LOOKOUT_MAX_SESSIONS")]
    max_sessions: Option<usize>,
    /// Concurrent WebSocket connections, subscriptions included [default: 256].
    #[arg(long, env = "LOOKOUT_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Largest WebSocket message from a client, KiB [default: 64].
    #[arg(long, env = "LOOKOUT_MAX_WS_MESSAGE_KB")]
    max_ws_message_kb: Option<usize>,
    /// Requests that may wait for the engine [default: 8].
    #[arg(long, env = "LOOKOUT_ENGINE_QUEUE")]
    engine_queue: Option<usize>,
    /// Weight and activation dtype: f32, bf16 or f16 [default: f32].
    #[arg(long, env = "LOOKOUT_DTYPE")]
    dtype: Option<String>,
    /// cpu, cuda or cuda:N [default: cpu].
    #[arg(long, env = "LOOKOUT_DEVICE")]
    device: Option<String>,
    /// Let URL sources reach loopback, private and link-local addresses.
    #[arg(long, env = "LOOKOUT_ALLOW_PRIVATE_URLS", num_args = 0..=1, default_missing_value = "true")]
    allow_private_urls: Option<bool>,
    /// RTP transport for RTSP cameras: tcp or udp [default: tcp].
    #[arg(long, env = "LOOKOUT_RTSP_TRANSPORT")]
    rtsp_transport: Option<String>,
    /// Longest wait between RTSP reconnection attempts, seconds [default: 10].
    #[arg(long, env = "LOOKOUT_RTSP_MAX_BACKOFF_S")]
    rtsp_max_backoff_s: Option<f64>,
    /// Let camera URLs reach link-local addresses (169.254.0.0/16, fe80::/10) [default: off].
    #[arg(long, env = "LOOKOUT_RTSP_ALLOW_LINK_LOCAL", num_args = 0..=1, default_missing_value = "true")]
    rtsp_allow_link_local: Option<bool>,
    /// STUN/TURN servers for WebRTC, e.g. stun:stun.example.org:3478 or
    /// turn:user:pass@turn.example.org:3478 (repeat, or comma-separate) [default: none].
    #[arg(long = "ice-server", env = "LOOKOUT_ICE_SERVERS", value_delimiter = ',')]
    ice_servers: Option<Vec<String>>,
    /// Local UDP addresses for WebRTC media (0.0.0.0:0 = every interface) [default: 0.0.0.0:0].
    #[arg(long = "webrtc-udp-addr", env = "LOOKOUT_WEBRTC_UDP_ADDRS", value_delimiter = ',')]
    webrtc_udp_addrs: Option<Vec<String>>,
    /// Longest wait for a WebSocket's start or subscribe message, seconds [default: 30].
    #[arg(long, env = "LOOKOUT_WS_START_TIMEOUT_S")]
    ws_start_timeout_s: Option<f64>,
    /// Longest wait for a request's headers before the connection is closed, seconds [default: 10].
    #[arg(long, env = "LOOKOUT_HEADER_READ_TIMEOUT_S")]
    header_read_timeout_s: Option<f64>,
    /// Days of history a monitor keeps unless it says otherwise [default: 30].
    #[arg(long, env = "LOOKOUT_RETENTION_DAYS")]
    retention_days: Option<u32>,
    /// Events a monitor keeps at most unless it says otherwise [default: 100000].
    #[arg(long, env = "LOOKOUT_RETENTION_MAX_EVENTS")]
    retention_max_events: Option<u64>,
    /// Let alert webhooks reach loopback, private and link-local addresses (a Home Assistant on
    /// the LAN), without letting URL sources do so [default: off].
    #[arg(long, env = "LOOKOUT_ALLOW_PRIVATE_WEBHOOKS", num_args = 0..=1, default_missing_value = "true")]
    allow_private_webhooks: Option<bool>,
    /// Attempts per alert notification before it is marked failed [default: 8].
    #[arg(long, env = "LOOKOUT_WEBHOOK_ATTEMPTS")]
    webhook_attempts: Option<u32>,
    /// Wait after a notification's first failed attempt, seconds; doubled after each [default: 2].
    #[arg(long, env = "LOOKOUT_WEBHOOK_RETRY_S")]
    webhook_retry_s: Option<f64>,
    /// An MQTT broker for alerts and Home Assistant: mqtt://[user:password@]host[:port].
    #[arg(long, env = "LOOKOUT_MQTT_URL")]
    mqtt_url: Option<String>,
    /// MiB that clips of REST and chat requests may take in all, decoding and waiting for the
    /// model; a clip that needs more is refused (413) [default: 2048].
    #[arg(long, env = "LOOKOUT_MEDIA_BUDGET_MB")]
    media_budget_mb: Option<u64>,
    /// MiB of encoded frame pairs the engine keeps for overlapping windows (on the model's
    /// device); 0 encodes every window whole [default: 512].
    #[arg(long, env = "LOOKOUT_VISION_CACHE_MB")]
    vision_cache_mb: Option<u64>,
    /// MiB of KV cache the requests the engine serves at once may take together, each counted
    /// at its prompt plus max_tokens: a request waits until it fits, and one that could never
    /// fit is refused with what to change [default: a quarter of the memory available after
    /// loading on the CPU, the free GPU memory less a tenth on CUDA].
    #[arg(long, env = "LOOKOUT_KV_CACHE_MB")]
    kv_cache_mb: Option<u64>,
    /// Requests the engine decodes together in one batch at most [default: 16].
    #[arg(long, env = "LOOKOUT_MAX_BATCH")]
    max_batch: Option<usize>,
    /// Prompt tokens prefilled (or visual tokens encoded) in one step between decode steps: a
    /// long clip does not hold up live windows' tokens for longer than one chunk [default: 512].
    #[arg(long, env = "LOOKOUT_PREFILL_CHUNK")]
    prefill_chunk: Option<usize>,
    /// A PostgreSQL database that several nodes share: postgres://user:password@host/db. Without
    /// it, the node keeps its own SQLite database under --data-dir (then a directory every node
    /// shares, for uploads, thumbnails and evidence clips).
    #[arg(long, env = "LOOKOUT_DATABASE")]
    database: Option<String>,
    /// This node's id among those sharing the database [default: its address's host:port].
    #[arg(long, env = "LOOKOUT_NODE_ID")]
    node_id: Option<String>,
    /// Where the other nodes reach this node's API [default: http://HOST:PORT as listened on].
    #[arg(long, env = "LOOKOUT_NODE_ADDRESS")]
    node_address: Option<String>,
    /// Most monitors this node runs, with a shared database [default: 32].
    #[arg(long, env = "LOOKOUT_MAX_MONITORS")]
    max_monitors: Option<u32>,
    /// How long a node's hold on a monitor lasts without renewal, seconds: a node that dies has
    /// its monitors taken over within about this [default: 10].
    #[arg(long, env = "LOOKOUT_LEASE_S")]
    lease_s: Option<f64>,
}

impl ServeArgs {
    /// Flags and variables win over the file.
    fn merged(self) -> anyhow::Result<Self> {
        let Some(path) = &self.config else { return Ok(self) };
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let f: ServeArgs = toml::from_str(&text).map_err(|e| {
            // One line: where, and what toml says (its own text quotes the file over several lines).
            let at = e.span().map_or(String::new(), |s| {
                let before = text.get(..s.start).unwrap_or(&text);
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                format!(" at line {line}, column {column}")
            });
            anyhow::anyhow!("{}{at}: {}", path.display(), e.message().trim())
        })?;
        Ok(ServeArgs {
            config: self.config,
            model: self.model.or(f.model),
            host: self.host.or(f.host),
            port: self.port.or(f.port),
            data_dir: self.data_dir.or(f.data_dir),
            api_key: self.api_key.or(f.api_key),
            max_upload_mb: self.max_upload_mb.or(f.max_upload_mb),
            max_sessions: self.max_sessions.or(f.max_sessions),
            max_connections: self.max_connections.or(f.max_connections),
            max_ws_message_kb: self.max_ws_message_kb.or(f.max_ws_message_kb),
            engine_queue: self.engine_queue.or(f.engine_queue),
            dtype: self.dtype.or(f.dtype),
            device: self.device.or(f.device),
            allow_private_urls: self.allow_private_urls.or(f.allow_private_urls),
            rtsp_transport: self.rtsp_transport.or(f.rtsp_transport),
            rtsp_max_backoff_s: self.rtsp_max_backoff_s.or(f.rtsp_max_backoff_s),
            rtsp_allow_link_local: self.rtsp_allow_link_local.or(f.rtsp_allow_link_local),
            ice_servers: self.ice_servers.or(f.ice_servers),
            webrtc_udp_addrs: self.webrtc_udp_addrs.or(f.webrtc_udp_addrs),
            ws_start_timeout_s: self.ws_start_timeout_s.or(f.ws_start_timeout_s),
            header_read_timeout_s: self.header_read_timeout_s.or(f.header_read_timeout_s),
            retention_days: self.retention_days.or(f.retention_days),
            retention_max_events: self.retention_max_events.or(f.retention_max_events),
            allow_private_webhooks: self.allow_private_webhooks.or(f.allow_private_webhooks),
            webhook_attempts: self.webhook_attempts.or(f.webhook_attempts),
            webhook_retry_s: self.webhook_retry_s.or(f.webhook_retry_s),
            mqtt_url: self.mqtt_url.or(f.mqtt_url),
            media_budget_mb: self.media_budget_mb.or(f.media_budget_mb),
            vision_cache_mb: self.vision_cache_mb.or(f.vision_cache_mb),
            kv_cache_mb: self.kv_cache_mb.or(f.kv_cache_mb),
            max_batch: self.max_batch.or(f.max_batch),
            prefill_chunk: self.prefill_chunk.or(f.prefill_chunk),
            database: self.database.or(f.database),
            node_id: self.node_id.or(f.node_id),
            node_address: self.node_address.or(f.node_address),
            max_monitors: self.max_monitors.or(f.max_monitors),
            lease_s: self.lease_s.or(f.lease_s),
        })
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let args = args.merged()?;
    // Every other setting is checked first: a file with a bad value and no model is told about
    // the bad value.
    let model = args.model.clone();
    let host = args.host.unwrap_or_else(|| "127.0.0.1".into());
    let port = args.port.unwrap_or(8000);
    let mut live = ws_gateway::server::LiveConfig::default();
    if let Some(t) = &args.rtsp_transport {
        live.rtsp.transport = t.parse().map_err(anyhow::Error::msg)?;
    }
    live.rtsp.allow_link_local = args.rtsp_allow_link_local.unwrap_or(false);
    if let Some(s) = args.rtsp_max_backoff_s {
        anyhow::ensure!(s.is_finite() && s > 0.0 && s <= 3600.0, "rtsp_max_backoff_s must be in (0, 3600]");
        live.rtsp.backoff_max = std::time::Duration::from_secs_f64(s);
    }
    let mut webrtc = ws_gateway::server::WebrtcConfig::default();
    for s in args.ice_servers.iter().flatten().filter(|s| !s.is_empty()) {
        webrtc.ice_servers.push(s.parse().map_err(anyhow::Error::msg)?);
    }
    if let Some(a) = args.webrtc_udp_addrs.filter(|a| !a.is_empty()) {
        webrtc.udp_addrs = a;
    }
    let d = ws_gateway::server::ServeConfig::default();
    let ws_start_timeout = match args.ws_start_timeout_s {
        Some(s) => {
            anyhow::ensure!(s.is_finite() && s > 0.0 && s <= 3600.0, "ws_start_timeout_s must be in (0, 3600]");
            std::time::Duration::from_secs_f64(s)
        }
        None => d.ws_start_timeout,
    };
    let header_read_timeout = match args.header_read_timeout_s {
        Some(s) => {
            anyhow::ensure!(s.is_finite() && s > 0.0 && s <= 3600.0, "header_read_timeout_s must be in (0, 3600]");
            std::time::Duration::from_secs_f64(s)
        }
        None => d.header_read_timeout,
    };
    let mut alerts = ws_gateway::server::AlertConfig {
        allow_private_webhooks: args.allow_private_webhooks.unwrap_or(false),
        ..Default::default()
    };
    if let Some(n) = args.webhook_attempts {
        anyhow::ensure!((1..=100).contains(&n), "webhook_attempts must be 1 to 100");
        alerts.webhook_attempts = n;
    }
    if let Some(s) = args.webhook_retry_s {
        anyhow::ensure!(s.is_finite() && s > 0.0 && s <= 3600.0, "webhook_retry_s must be in (0, 3600]");
        alerts.webhook_retry = std::time::Duration::from_secs_f64(s);
    }
    if let Some(u) = args.mqtt_url.filter(|u| !u.is_empty()) {
        ws_gateway::server::check_mqtt_url(&u).map_err(anyhow::Error::msg)?;
        alerts.mqtt_url = Some(u);
    }
    let cluster = match args.database.filter(|u| !u.is_empty()) {
        Some(url) => {
            let parsed = url::Url::parse(&url).map_err(|e| {
                anyhow::anyhow!(
                    "database: {e} in {}; give postgres://user:password@host/db",
                    ws_gateway::server::redact_url(&url)
                )
            })?;
            anyhow::ensure!(
                matches!(parsed.scheme(), "postgres" | "postgresql"),
                "database: only PostgreSQL is supported (postgres://user:password@host/db), not {}://",
                parsed.scheme()
            );
            let mut node = ws_gateway::server::NodeSettings {
                id: args.node_id.filter(|i| !i.is_empty()),
                address: args.node_address.filter(|a| !a.is_empty()),
                ..Default::default()
            };
            if let Some(a) = &node.address {
                let p = url::Url::parse(a)
                    .map_err(|e| anyhow::anyhow!("node_address {a:?}: {e}; give http://host:port"))?;
                anyhow::ensure!(
                    p.scheme() == "http" && p.host().is_some(),
                    "node_address must be http://host:port, not {a:?}"
                );
            }
            if let Some(n) = args.max_monitors {
                anyhow::ensure!((1..=10_000).contains(&n), "max_monitors must be 1 to 10000");
                node.max_monitors = n;
            }
            if let Some(s) = args.lease_s {
                anyhow::ensure!(s.is_finite() && (0.3..=3600.0).contains(&s), "lease_s must be in [0.3, 3600]");
                node.lease = std::time::Duration::from_secs_f64(s);
            }
            Some(ws_gateway::server::SharedDatabase { url, node })
        }
        None => {
            anyhow::ensure!(
                args.node_id.is_none()
                    && args.node_address.is_none()
                    && args.max_monitors.is_none()
                    && args.lease_s.is_none(),
                "node_id, node_address, max_monitors and lease_s are for several nodes: give --database postgres://… too"
            );
            None
        }
    };
    let device = args.device.as_deref().unwrap_or("cpu").parse()?;
    let dtype = inference::parse_dtype(args.dtype.as_deref().unwrap_or("f32"))?;
    let model =
        model.ok_or_else(|| anyhow::anyhow!("no model: give --model, LOOKOUT_MODEL or `model` in the config file"))?;
    let config = ws_gateway::server::ServeConfig {
        model,
        device,
        dtype,
        data_dir: args.data_dir.unwrap_or_else(|| "lookout-data".into()),
        api_key: args.api_key.filter(|k| !k.is_empty()),
        max_upload_bytes: args.max_upload_mb.unwrap_or(512).saturating_mul(1 << 20),
        max_sessions: args.max_sessions.unwrap_or(d.max_sessions).max(1),
        max_connections: args.max_connections.unwrap_or(d.max_connections).max(1),
        ws_start_timeout,
        header_read_timeout,
        max_ws_message_bytes: args.max_ws_message_kb.unwrap_or(64).max(1) * 1024,
        engine_queue: args.engine_queue.unwrap_or(8).max(1),
        allow_private_urls: args.allow_private_urls.unwrap_or(false),
        live,
        retention: protocol::Retention {
            days: Some(args.retention_days.unwrap_or(d.retention.days.unwrap_or(30)).max(1)),
            max_events: Some(args.retention_max_events.unwrap_or(d.retention.max_events.unwrap_or(100_000)).max(1)),
        },
        retention_every: d.retention_every,
        webrtc,
        alerts,
        media_budget_mb: args.media_budget_mb.unwrap_or(d.media_budget_mb).max(1),
        vision_cache_mb: args.vision_cache_mb.unwrap_or(d.vision_cache_mb),
        kv_cache_mb: args.kv_cache_mb.or(d.kv_cache_mb).map(|mb| mb.max(1)),
        max_batch: args.max_batch.unwrap_or(d.max_batch).max(1),
        prefill_chunk: args.prefill_chunk.unwrap_or(d.prefill_chunk).max(1),
        cluster,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("lookout-io").build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((host.as_str(), port))
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {host}:{port}: {e}"))?;
        ws_gateway::server::serve_announced(config, listener, ws_gateway::server::shutdown_signal(), |addr| {
            eprintln!("lookout listening on http://{addr}");
        })
        .await
    })
}

#[derive(Args)]
struct AnalyzeArgs {
    /// A local checkpoint directory (Hugging Face layout) or a Hub id such as Qwen/Qwen3-VL-2B-Instruct.
    #[arg(long)]
    model: String,
    /// The video file.
    #[arg(long)]
    video: PathBuf,
    /// The question.
    #[arg(long)]
    prompt: String,
    /// An optional system message.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingFlags,
    #[command(flatten)]
    generation: GenerationFlags,
    /// Weight and activation dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Write input_ids, logits_last and generated_ids to this safetensors file.
    #[arg(long)]
    dump: Option<PathBuf>,
}

/// Generation flags; the model's generation_config.json supplies the defaults.
#[derive(Args, Debug, Clone)]
struct GenerationFlags {
    /// Most new tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Greedy decoding (overrides the sampling flags).
    #[arg(long)]
    greedy: bool,
    /// Sampling temperature (0 is greedy).
    #[arg(long)]
    temperature: Option<f64>,
    /// Keep the k most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling threshold.
    #[arg(long)]
    top_p: Option<f64>,
    /// Repetition penalty over prompt and output (1 is off).
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// Presence penalty over the output (0 is off).
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// Random seed.
    #[arg(long, default_value_t = 3407)]
    seed: u64,
    /// Stop before this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

impl GenerationFlags {
    fn params(&self, defaults: &inference::files::GenerationConfig, capture: bool) -> inference::GenerationParams {
        let sample = !self.greedy && defaults.do_sample.unwrap_or(false) || self.temperature.is_some_and(|t| t > 0.0);
        let sampling = if !sample || self.greedy {
            inference::sampling::SamplingParams {
                repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
                presence_penalty: self.presence_penalty,
                ..inference::sampling::SamplingParams::greedy()
            }
        } else {
            inference::sampling::SamplingParams {
                temperature: self.temperature.or(defaults.temperature).unwrap_or(1.0),
                top_k: self.top_k.or(defaults.top_k).unwrap_or(0),
                top_p: self.top_p.or(defaults.top_p).unwrap_or(1.0),
                repetition_penalty: self.repetition_penalty.or(defaults.repetition_penalty).unwrap_or(1.0),
                presence_penalty: self.presence_penalty,
                seed: self.seed,
            }
        };
        inference::GenerationParams {
            sampling,
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            capture,
            ignore_eos: false,
            answer: None,
            stop_when_decided: false,
        }
    }
}

/// Sampling flags, with the reference defaults when left out.
#[derive(Args, Debug, Clone)]
struct SamplingFlags {
    /// Frames per second to sample (default 2). Exclusive with --nframes.
    #[arg(long, conflicts_with = "nframes")]
    fps: Option<f64>,
    /// Exact number of frames to sample (rounded to even).
    #[arg(long)]
    nframes: Option<usize>,
    /// Fewest frames when sampling by rate (default 4).
    #[arg(long)]
    min_frames: Option<usize>,
    /// Most frames when sampling by rate (default 768).
    #[arg(long)]
    max_frames: Option<usize>,
    /// Fewest pixels per frame (default 131072).
    #[arg(long)]
    min_pixels: Option<u64>,
    /// Most pixels per frame (default: from the total budget, at most 786432).
    #[arg(long)]
    max_pixels: Option<u64>,
    /// Pixel budget over all frames (default 117964800).
    #[arg(long)]
    total_pixels: Option<u64>,
    /// Start of the range to sample, seconds.
    #[arg(long)]
    video_start: Option<f64>,
    /// End of the range to sample, seconds.
    #[arg(long)]
    video_end: Option<f64>,
    /// Decoder threads (1 keeps to one core; 0 lets libav choose).
    #[arg(long, default_value_t = 1)]
    decode_threads: usize,
}

impl SamplingFlags {
    fn options(&self) -> sampler::SampleOptions {
        sampler::SampleOptions {
            fps: self.fps,
            nframes: self.nframes,
            min_frames: self.min_frames,
            max_frames: self.max_frames,
            min_pixels: self.min_pixels,
            max_pixels: self.max_pixels,
            total_pixels: self.total_pixels,
            video_start: self.video_start,
            video_end: self.video_end,
        }
    }
}

#[derive(Args)]
struct SampleArgs {
    /// The video file.
    #[arg(long)]
    video: PathBuf,
    #[command(flatten)]
    sampling: SamplingFlags,
    /// Where to write `pixel_values_videos` and `video_grid_thw` (safetensors).
    #[arg(long)]
    out: PathBuf,
}

fn sample(args: SampleArgs) -> anyhow::Result<()> {
    let decode = ingest::DecodeOptions { threads: args.sampling.decode_threads, ..Default::default() };
    let s = sample_file(&args.video, &args.sampling.options(), decode)?;
    let grid: Vec<i64> = s.clip.grid_thw.iter().map(|&v| v as i64).collect();
    write_safetensors(
        &args.out,
        &[
            ("pixel_values_videos", vec![s.clip.rows(), sampler::PATCH_DIM], TensorData::F32(&s.clip.pixel_values)),
            ("video_grid_thw", vec![1, 3], TensorData::I64(&grid)),
        ],
    )
    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", args.out.display()))?;
    let report = serde_json::json!({
        "frame_indices": s.plan.frame_indices,
        "video_fps": s.plan.video_fps,
        "total_num_frames": s.plan.total_num_frames,
        "resized_height": s.plan.resized_height,
        "resized_width": s.plan.resized_width,
        "grid_thw": s.clip.grid_thw,
        "timestamps": s.clip.timestamps,
    });
    println!("{report}");
    Ok(())
}

fn analyze(args: AnalyzeArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let decode = ingest::DecodeOptions { threads: args.sampling.decode_threads, ..Default::default() };
    // Check the clip before spending time on the model.
    let clip = sample_file(&args.video, &args.sampling.options(), decode)?;
    let engine = inference::Engine::load(inference::LoadOptions {
        model: args.model.clone(),
        device: args.device.parse()?,
        dtype: inference::parse_dtype(&args.dtype)?,
        queue: 1,
        vision_cache_bytes: 0,
        kv_cache_bytes: Some(usize::MAX),
        max_running: inference::engine::DEFAULT_MAX_RUNNING,
        prefill_chunk: inference::engine::DEFAULT_PREFILL_CHUNK,
    })?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(inference::processor::Message::text("system", system));
    }
    messages.push(inference::processor::Message::user_video(&args.prompt));
    let generation = args.generation.params(&engine.info().generation, args.dump.is_some());
    let request = inference::Request {
        messages,
        videos: vec![clip.into_video_input()],
        generation,
        schedule: inference::Schedule::interactive("analyze"),
    };
    let mut events = engine.submit(request)?;
    let mut stdout = std::io::stdout().lock();
    let mut captured = None;
    while let Some(event) = events.blocking_recv() {
        match event {
            // The CLI asks for no answer shape, so nothing is decided.
            inference::EngineEvent::Queued | inference::EngineEvent::Decided(_) => {}
            inference::EngineEvent::Captured { input_ids, logits } => captured = Some((input_ids, logits)),
            inference::EngineEvent::Token { text } => {
                stdout.write_all(text.as_bytes())?;
                stdout.flush()?;
            }
            inference::EngineEvent::Done { finish_reason, token_ids, usage, timings, .. } => {
                writeln!(stdout)?;
                tracing::info!(
                    finish_reason = finish_reason.as_str(),
                    prompt_tokens = usage.prompt_tokens,
                    completion_tokens = usage.completion_tokens,
                    vision_ms = timings.vision_ms,
                    prefill_ms = timings.prefill_ms,
                    ttft_ms = timings.ttft_ms,
                    decode_tok_s = timings.decode_tok_s,
                    "done"
                );
                if let (Some(path), Some((input_ids, logits))) = (&args.dump, captured.take()) {
                    let ids: Vec<i64> = input_ids.iter().map(|&i| i as i64).collect();
                    let generated: Vec<i64> = token_ids.iter().map(|&i| i as i64).collect();
                    write_safetensors(
                        path,
                        &[
                            ("input_ids", vec![ids.len()], TensorData::I64(&ids)),
                            ("logits_last", vec![logits.len()], TensorData::F32(&logits)),
                            ("generated_ids", vec![generated.len()], TensorData::I64(&generated)),
                        ],
                    )
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
                }
                return Ok(());
            }
            inference::EngineEvent::Failed { error } => return Err(error.into()),
        }
    }
    anyhow::bail!("the engine stopped before answering")
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LOOKOUT_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One clear line: clap's first line, without its usage block.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ");
            eprintln!("error: {first} (see lookout --help)");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Sample(args) => sample(args),
        Command::Analyze(args) => analyze(*args),
        Command::Serve(args) => serve(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}
