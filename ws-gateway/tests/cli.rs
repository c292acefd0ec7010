//! `lookout sample` as a user runs it: output files, stdout JSON, and one-line errors.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lookout-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn lookout(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lookout")).args(args).output().unwrap()
}

#[test]
fn sample_writes_tensors_and_reports_json() {
    let clip = root().join("fixtures/preprocess/clips/h264_25fps_480x270.mkv");
    let out = tmp("ok.safetensors");
    let o = lookout(&[
        "sample",
        "--video",
        clip.to_str().unwrap(),
        "--fps",
        "1",
        "--min-pixels",
        "4096",
        "--max-pixels",
        "30000",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8(o.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "one JSON object: {stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["frame_indices"], serde_json::json!([0, 33, 66, 99]));
    assert_eq!(v["video_fps"], 25.0);
    assert_eq!(v["total_num_frames"], 100);
    let grid: Vec<usize> = v["grid_thw"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    assert_eq!(grid[0], 2);
    assert_eq!(v["resized_height"].as_u64().unwrap() as usize, grid[1] * 16);
    assert_eq!(v["resized_width"].as_u64().unwrap() as usize, grid[2] * 16);
    assert_eq!(v["timestamps"].as_array().unwrap().len(), 2);

    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let pv = st.tensor("pixel_values_videos").unwrap();
    assert_eq!(pv.dtype(), safetensors::Dtype::F32);
    assert_eq!(pv.shape(), &[grid.iter().product::<usize>(), 1536]);
    let values: Vec<f32> = pv.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    assert!(values.iter().all(|x| (-1.0..=1.0).contains(x)));
    assert!(values.iter().any(|&x| x != values[0]));
    let g = st.tensor("video_grid_thw").unwrap();
    assert_eq!(g.dtype(), safetensors::Dtype::I64);
    assert_eq!(g.shape(), &[1, 3]);
    let gv: Vec<i64> = g.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(gv, grid.iter().map(|&x| x as i64).collect::<Vec<_>>());
}

fn assert_one_line_error(args: &[&str], needle: &str) {
    let o = lookout(args);
    assert!(!o.status.success(), "{args:?} should fail");
    let stderr = String::from_utf8(o.stderr).unwrap();
    assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: one line expected, got {stderr:?}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.to_lowercase().contains(needle), "{args:?}: {stderr:?} should mention {needle:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(o.stdout.is_empty());
}

#[test]
fn bad_input_gets_one_clear_line() {
    let clip = root().join("fixtures/preprocess/clips/h264_short_30fps_256x144.mp4");
    let clip = clip.to_str().unwrap();
    let out = tmp("bad.safetensors");
    let out = out.to_str().unwrap();
    let text = tmp("notes.mp4");
    std::fs::write(&text, "not a video\n").unwrap();
    let text = text.to_str().unwrap();

    assert_one_line_error(&["sample", "--video", "/no/such/clip.mp4", "--out", out], "no such file");
    // A shared database that does not answer: one line, its password hidden.
    let model = root().join("fixtures/models/tiny-tied");
    let model = model.to_str().unwrap();
    let data = tmp("unreachable-db");
    let data = data.to_str().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let db = format!("postgres://lookout:hunter2@127.0.0.1:{port}/lookout");
    let o = lookout(&["serve", "--port", "0", "--model", model, "--data-dir", data, "--database", &db]);
    assert!(!String::from_utf8_lossy(&o.stderr).contains("hunter2"));
    assert_one_line_error(
        &["serve", "--port", "0", "--model", model, "--data-dir", data, "--database", &db],
        "cannot use the database postgres://lookout:***@127.0.0.1",
    );
    assert_one_line_error(
        &["serve", "--port", "0", "--model", model, "--database", "mysql://x@y/z"],
        "only postgresql",
    );
    assert_one_line_error(&["serve", "--port", "0", "--model", model, "--lease-s", "5"], "give --database");
    assert_one_line_error(&["sample", "--video", text, "--out", out], "not a readable media file");
    assert_one_line_error(
        &["sample", "--video", clip, "--min-pixels", "50000", "--max-pixels", "40000", "--out", out],
        "min_pixels",
    );
    assert_one_line_error(&["sample", "--video", clip, "--video-start", "5", "--out", out], "range");
    assert_one_line_error(
        &["sample", "--video", clip, "--video-start", "0.5", "--video-end", "0.2", "--out", out],
        "range",
    );
    assert_one_line_error(&["sample", "--video", clip, "--nframes", "0", "--out", out], "frames");
    assert_one_line_error(&["sample", "--video", clip, "--nframes", "100", "--out", out], "frames");
    assert_one_line_error(&["sample", "--video", clip, "--fps", "1", "--nframes", "4", "--out", out], "cannot be used");
    assert_one_line_error(&["sample", "--video", clip, "--fps=-2", "--out", out], "fps");
    assert_one_line_error(&["sample", "--video", clip, "--out", "/no/such/dir/x.safetensors"], "cannot write");
}

/// Starts `lookout serve` with `args` and `envs`, returns the child and its address.
fn spawn_serve(args: &[&str], envs: &[(&str, &str)]) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lookout"));
    cmd.arg("serve").args(args).stderr(std::process::Stdio::piped()).stdout(std::process::Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(stderr).read_line(&mut line).unwrap();
    let addr = line.trim().rsplit("http://").next().unwrap().to_owned();
    (child, addr)
}

#[test]
fn serve_reads_a_toml_config_and_flags_or_env_win() {
    let dir = tmp("serve-config");
    std::fs::create_dir_all(&dir).unwrap();
    let model = root().join("fixtures/models/tiny-tied");
    let config = dir.join("lookout.toml");
    std::fs::write(
        &config,
        format!(
            "model = {:?}\nport = 0\ndata_dir = {:?}\nmax_sessions = 2\n",
            model.to_str().unwrap(),
            dir.join("data").to_str().unwrap()
        ),
    )
    .unwrap();
    let (mut child, addr) = spawn_serve(&["--config", config.to_str().unwrap()], &[("LOOKOUT_API_KEY", "k1")]);
    let health: serde_json::Value = ureq_get(&format!("http://{addr}/v1/health"), None);
    assert!(health["model"].as_str().unwrap().ends_with("tiny-tied"));
    // The key came from the environment: routes other than health need it.
    assert_eq!(ureq_status(&format!("http://{addr}/v1/models"), None), 401);
    assert_eq!(ureq_status(&format!("http://{addr}/v1/models"), Some("k1")), 200);
    child.kill().unwrap();
    child.wait().unwrap();

    std::fs::write(&config, "modle = \"typo\"\n").unwrap();
    let o = lookout(&["serve", "--config", config.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown field"));
}

fn ureq_get(url: &str, key: Option<&str>) -> serde_json::Value {
    for _ in 0..100 {
        let mut r = ureq::get(url);
        if let Some(k) = key {
            r = r.set("Authorization", &format!("Bearer {k}"));
        }
        if let Ok(resp) = r.call() {
            return resp.into_json().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("{url} never answered");
}

fn ureq_status(url: &str, key: Option<&str>) -> u16 {
    let mut r = ureq::get(url);
    if let Some(k) = key {
        r = r.set("Authorization", &format!("Bearer {k}"));
    }
    match r.call() {
        Ok(resp) => resp.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn a_second_signal_ends_a_slow_shutdown_at_once() {
    use std::io::Write;
    let dir = tmp("second-signal");
    std::fs::create_dir_all(&dir).unwrap();
    let model = root().join("fixtures/models/tiny-tied");
    let (mut child, addr) = spawn_serve(
        &["--model", model.to_str().unwrap(), "--port", "0", "--data-dir", dir.join("data").to_str().unwrap()],
        &[],
    );
    // An upload in flight: the orderly shutdown waits for it (up to 10 s).
    let mut tcp = std::net::TcpStream::connect(&addr).unwrap();
    tcp.write_all(
        b"POST /v1/uploads HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n\
          Content-Length: 100000000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c\"\r\n\r\n",
    )
    .unwrap();
    tcp.write_all(&[0u8; 65536]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pid = child.id().to_string();
    let signal = |s: &str| {
        assert!(Command::new("kill").arg(s).arg(&pid).status().unwrap().success());
    };
    signal("-TERM");
    std::thread::sleep(Duration::from_millis(700));
    assert!(child.try_wait().unwrap().is_none(), "the first signal waits for the upload in flight");
    let sent = std::time::Instant::now();
    signal("-INT");
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(sent.elapsed() < Duration::from_secs(3), "a second signal must end it at once");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130));
    drop(tcp);
}

mod config {
    //! Property test: any `--config` file (known settings with values of any type and size,
    //! unknown ones, arbitrary text) is read or refused with a one-line error naming what to
    //! change, never a panic. No file names a model, so a file whose every value is good ends at
    //! the "no model" error before anything starts (the model is checked last).
    use super::*;
    use proptest::prelude::*;

    const KEYS: &[&str] = &[
        "host",
        "port",
        "data_dir",
        "api_key",
        "max_upload_mb",
        "max_sessions",
        "max_connections",
        "max_ws_message_kb",
        "engine_queue",
        "dtype",
        "device",
        "allow_private_urls",
        "rtsp_transport",
        "rtsp_max_backoff_s",
        "rtsp_allow_link_local",
        "ice_servers",
        "webrtc_udp_addrs",
        "ws_start_timeout_s",
        "header_read_timeout_s",
        "retention_days",
        "retention_max_events",
        "allow_private_webhooks",
        "webhook_attempts",
        "webhook_retry_s",
        "mqtt_url",
        "media_budget_mb",
        "vision_cache_mb",
        "kv_cache_mb",
        "max_batch",
        "prefill_chunk",
        "no_such_setting",
    ];

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<i64>().prop_map(|v| v.to_string()),
            any::<f64>().prop_map(|v| if v.is_finite() { format!("{v:?}") } else { "nan".into() }),
            Just("inf".to_owned()),
            Just("-1".to_owned()),
            Just("0".to_owned()),
            any::<bool>().prop_map(|v| v.to_string()),
            "[ -~]{0,40}".prop_map(|s| format!("{s:?}")),
            proptest::collection::vec("[ -~]{0,12}", 0..3).prop_map(|v| format!("{v:?}")),
        ]
    }

    fn file() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => proptest::collection::vec((proptest::sample::select(KEYS), value()), 0..6)
                .prop_map(|kv| kv.into_iter().map(|(k, v)| format!("{k} = {v}\n")).collect::<String>()),
            1 => proptest::collection::vec(any::<u8>(), 0..200)
                .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn any_config_file_is_read_or_refused_with_one_line(text in file()) {
            let path = tmp(&format!("config-{}.toml", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()));
            std::fs::write(&path, &text).unwrap();
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_lookout"));
            for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("LOOKOUT_")) {
                cmd.env_remove(k);
            }
            let out = cmd.args(["serve", "--config"]).arg(&path).output().unwrap();
            let _ = std::fs::remove_file(&path);
            let stderr = String::from_utf8_lossy(&out.stderr);
            prop_assert!(!stderr.contains("panicked"), "{text:?} → {stderr}");
            prop_assert!(matches!(out.status.code(), Some(1 | 2)), "{text:?} → {:?} {stderr}", out.status);
            prop_assert!(!stderr.trim().is_empty(), "{text:?}: no message");
            prop_assert_eq!(stderr.trim().lines().count(), 1, "{:?} → {}", text, stderr);
            // Either every value is good (then only the model is missing), or the line names the
            // file and place, or the setting and what it must be.
            let line = stderr.trim();
            prop_assert!(
                line.contains("no model") || line.contains(".toml at line") || line.contains("must be")
                    || line.contains("use ") || line.contains("expected"),
                "{text:?} → {stderr}"
            );
        }
    }
}
