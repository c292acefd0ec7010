//! `lookout analyze` end to end on a fixture model: Lookout's own clip pipeline, processor,
//! model and engine, against the transformers reference for the same clip and parameters.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn ids(st: &safetensors::SafeTensors<'_>, name: &str) -> Vec<i64> {
    st.tensor(name).unwrap().data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
}

fn f32s(st: &safetensors::SafeTensors<'_>, name: &str) -> Vec<f32> {
    st.tensor(name).unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

#[test]
fn analyze_streams_the_reference_answer() {
    let dump = std::env::temp_dir().join(format!("lookout-analyze-{}.safetensors", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_lookout"))
        .args(["analyze", "--model"])
        .arg(root().join("fixtures/models/tiny-untied"))
        .arg("--video")
        .arg(root().join("fixtures/preprocess/clips/h264_25fps_480x270.mkv"))
        .args(["--fps", "1", "--min-pixels", "4096", "--max-pixels", "16384"])
        .args(["--prompt", "What happens in this clip?", "--greedy", "--max-tokens", "16", "--dump"])
        .arg(&dump)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let reference = std::fs::read(root().join("fixtures/models/tiny-untied/reference/video_fps1.safetensors")).unwrap();
    let reference = safetensors::SafeTensors::deserialize(&reference).unwrap();
    let got = std::fs::read(&dump).unwrap();
    let got = safetensors::SafeTensors::deserialize(&got).unwrap();
    // Same frames, size, timestamps and template: identical prompt ids.
    assert_eq!(ids(&got, "input_ids"), ids(&reference, "input_ids"));
    // Pixels differ from the reference by at most one level, so logits agree closely, not exactly.
    let (a, b) = (f32s(&got, "logits_last"), f32s(&reference, "logits_last"));
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
    assert!(err < 1e-3, "logits relative error {err}");
    assert_eq!(ids(&got, "generated_ids"), ids(&reference, "generated"));

    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("fixtures/models/cases.json")).unwrap()).unwrap();
    let want = cases["models"]["tiny-untied"][0]["generated_text"].as_str().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    // The stream drops special tokens; this answer has none, so it is the reference text.
    assert_eq!(stdout.trim_end_matches('\n'), want);
    std::fs::remove_file(dump).ok();
}

#[test]
fn analyze_bad_inputs_fail_cleanly() {
    let clip = root().join("fixtures/preprocess/clips/h264_short_30fps_256x144.mp4");
    let run = |model: &str, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_lookout"))
            .args(["analyze", "--model", model, "--prompt", "hi", "--video"])
            .arg(&clip)
            .args(extra)
            .output()
            .unwrap()
    };
    let model = root().join("fixtures/models/tiny-tied");
    let model = model.to_str().unwrap();
    for (m, extra, needle) in [
        ("/no/such/model", &[][..], "not a directory"),
        (model, &["--device", "cuda"][..], "--features cuda"),
        (model, &["--dtype", "int3"][..], "unknown dtype"),
        (model, &["--top-p", "0", "--temperature", "1"][..], "top_p"),
    ] {
        let o = run(m, extra);
        assert!(!o.status.success());
        let e = String::from_utf8(o.stderr).unwrap();
        assert!(e.contains(needle), "{extra:?}: {e}");
        assert!(!e.contains("panicked"), "{e}");
    }
}

#[test]
fn hub_ids_fail_clearly_without_network() {
    // The Hub endpoint points at a closed local port: nothing leaves the machine.
    let home = std::env::temp_dir().join(format!("lookout-hf-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_lookout"))
        .args(["analyze", "--model", "Qwen/Qwen3-VL-2B-Instruct", "--prompt", "hi", "--video"])
        .arg(root().join("fixtures/preprocess/clips/h264_short_30fps_256x144.mp4"))
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_HOME", &home)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8(out.stderr).unwrap();
    assert!(e.contains("cannot fetch Qwen/Qwen3-VL-2B-Instruct"), "{e}");
    assert!(e.contains("--model /"), "the error should say how to use a local directory: {e}");
    let out = Command::new(env!("CARGO_BIN_EXE_lookout"))
        .args(["analyze", "--model", "Qwen/Qwen3-VL-2B-Instruct", "--prompt", "hi", "--video"])
        .arg(root().join("fixtures/preprocess/clips/h264_short_30fps_256x144.mp4"))
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", &home)
        .output()
        .unwrap();
    let e = String::from_utf8(out.stderr).unwrap();
    assert!(e.contains("HF_HUB_OFFLINE"), "{e}");
    std::fs::remove_dir_all(home).ok();
}
