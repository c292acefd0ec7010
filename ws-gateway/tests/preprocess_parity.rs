//! Clip preprocessing parity with the Python reference (qwen-vl-utils 0.0.14 `fetch_video` with
//! the torchcodec reader, then the transformers 5.24.0 Qwen3-VL video processor with
//! `do_resize=False`), recorded by tools/reference/make_preprocess_fixtures.py.

use std::io::Read;
use std::path::PathBuf;

use ingest::DecodeOptions;
use sampler::{PATCH_DIM, SampleOptions};
use serde_json::Value;
use ws_gateway::clip::sample_file;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn options(params: &Value) -> SampleOptions {
    let f = |k: &str| params.get(k).and_then(Value::as_f64);
    let u = |k: &str| params.get(k).and_then(Value::as_u64);
    SampleOptions {
        fps: f("fps"),
        nframes: u("nframes").map(|v| v as usize),
        min_frames: u("min_frames").map(|v| v as usize),
        max_frames: u("max_frames").map(|v| v as usize),
        min_pixels: u("min_pixels"),
        max_pixels: u("max_pixels"),
        total_pixels: u("total_pixels"),
        video_start: f("video_start"),
        video_end: f("video_end"),
    }
}

fn reference_pixels(case: &str) -> Vec<f32> {
    let path = root().join(format!("fixtures/preprocess/{case}.safetensors.gz"));
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()).read_to_end(&mut bytes).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let codes = st.tensor("pixel_codes").unwrap();
    assert_eq!(codes.shape()[1], PATCH_DIM);
    codes.data().iter().map(|&c| (c as f32 - 127.5) / 127.5).collect()
}

#[test]
fn clips_match_reference() {
    let text = std::fs::read_to_string(root().join("fixtures/preprocess/cases.json")).unwrap();
    let all: Value = serde_json::from_str(&text).unwrap();
    let cases = all["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    let mut report = Vec::new();
    for case in cases {
        let name = case["case"].as_str().unwrap();
        let want = &case["reference"];
        let got = sample_file(
            &root().join(case["clip"].as_str().unwrap()),
            &options(&case["params"]),
            DecodeOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let idx: Vec<u64> = want["frame_indices"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        let got_idx: Vec<u64> = got.plan.frame_indices.iter().map(|&i| i as u64).collect();
        assert_eq!(got_idx, idx, "{name}: frame indices");
        assert_eq!(got.plan.video_fps, want["video_fps"].as_f64().unwrap(), "{name}: fps");
        assert_eq!(got.plan.total_num_frames as u64, want["total_num_frames"].as_u64().unwrap(), "{name}");
        assert_eq!(got.plan.resized_height as u64, want["resized_height"].as_u64().unwrap(), "{name}: height");
        assert_eq!(got.plan.resized_width as u64, want["resized_width"].as_u64().unwrap(), "{name}: width");
        let grid: Vec<u64> = want["grid_thw"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        let got_grid: Vec<u64> = got.clip.grid_thw.iter().map(|&v| v as u64).collect();
        assert_eq!(got_grid, grid, "{name}: grid");
        let ts: Vec<f64> = want["timestamps"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(got.clip.timestamps, ts, "{name}: timestamps");
        let strings: Vec<String> = got.clip.timestamps.iter().map(|t| format!("{t:.1}")).collect();
        let want_strings: Vec<&str> =
            want["timestamp_strings"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(strings, want_strings, "{name}: timestamp text");

        let reference = reference_pixels(name);
        assert_eq!(got.clip.pixel_values.len(), reference.len(), "{name}: pixel count");
        let mut max = 0f32;
        let mut sum = 0f64;
        for (a, b) in got.clip.pixel_values.iter().zip(&reference) {
            let d = (a - b).abs();
            max = max.max(d);
            sum += d as f64;
        }
        let mean = sum / reference.len() as f64;
        report.push(format!("{name}: max {:.2} LSB, mean {:.4} LSB", max * 127.5, mean * 127.5));
        assert!(max <= 2.0 / 127.5 + 1e-6, "{name}: max abs diff {max} above 2/127.5");
        assert!(mean < 0.1 / 127.5, "{name}: mean abs diff {mean} not under 0.1/127.5");
    }
    println!("{}", report.join("\n"));
}
