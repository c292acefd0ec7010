//! Decoding parity with the reference reader (torchcodec 0.17 over the same libav): stream facts
//! and a digest of every frame's RGB bytes, recorded by tools/reference/make_preprocess_fixtures.py.

use std::path::PathBuf;

use ingest::{DecodeOptions, FileSource, IngestError};
use sha2::{Digest, Sha256};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cases() -> serde_json::Value {
    let text = std::fs::read_to_string(root().join("fixtures/preprocess/cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn digest(rgb: &[u8]) -> String {
    let d = Sha256::digest(rgb);
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[test]
fn stream_facts_match_reference() {
    let cases = cases();
    for (clip, want) in cases["clips"].as_object().unwrap() {
        let src = FileSource::open(root().join(clip)).unwrap();
        let info = src.info();
        assert_eq!(info.codec, want["codec"].as_str().unwrap(), "{clip}");
        assert_eq!(info.width as u64, want["width"].as_u64().unwrap(), "{clip}");
        assert_eq!(info.height as u64, want["height"].as_u64().unwrap(), "{clip}");
        assert_eq!(info.frame_count as u64, want["num_frames"].as_u64().unwrap(), "{clip}");
        assert_eq!(info.fps, want["average_fps"].as_f64().unwrap(), "{clip}");
        assert!((info.duration_s - want["duration_seconds"].as_f64().unwrap()).abs() < 1e-9, "{clip}");
    }
}

fn check_all_frames(threads: usize) {
    let cases = cases();
    for (clip, want) in cases["clips"].as_object().unwrap() {
        let src = FileSource::open(root().join(clip)).unwrap();
        let n = src.info().frame_count;
        let indices: Vec<usize> = (0..n).collect();
        let frames: Vec<_> =
            src.frames(&indices, DecodeOptions { threads, queue: 2 }).unwrap().collect::<Result<_, _>>().unwrap();
        assert_eq!(frames.len(), n, "{clip}");
        let digests = want["rgb_sha256_16"].as_array().unwrap();
        let mismatched: Vec<usize> = frames
            .iter()
            .enumerate()
            .filter(|(i, f)| digest(&f.rgb) != digests[*i].as_str().unwrap())
            .map(|(i, _)| i)
            .collect();
        assert!(mismatched.is_empty(), "{clip}: frames {mismatched:?} differ from the reference");
        for (i, f) in frames.iter().enumerate() {
            assert_eq!(f.seq as usize, i);
        }
    }
}

#[test]
fn every_frame_is_bit_identical_to_reference() {
    check_all_frames(1);
}

#[test]
fn frame_threading_gives_the_same_frames() {
    check_all_frames(2);
}

#[test]
fn sparse_requests_skip_unwanted_frames_but_stay_exact() {
    let cases = cases();
    let clip = "fixtures/preprocess/clips/h264_high_b_30fps_342x198.mp4";
    let digests = cases["clips"][clip]["rgb_sha256_16"].as_array().unwrap();
    let src = FileSource::open(root().join(clip)).unwrap();
    let indices = [3usize, 3, 17, 44, 45, 89];
    let frames: Vec<_> = src.frames(&indices, DecodeOptions::default()).unwrap().collect::<Result<_, _>>().unwrap();
    assert_eq!(frames.len(), indices.len());
    for (f, &i) in frames.iter().zip(&indices) {
        assert_eq!(f.seq as usize, i);
        assert_eq!(digest(&f.rgb), digests[i].as_str().unwrap(), "frame {i}");
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let missing = FileSource::open("/nonexistent/clip.mp4").unwrap_err();
    assert!(matches!(missing, IngestError::Io { .. }), "{missing}");
    let dir = std::env::temp_dir().join(format!("lookout-ingest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("notes.mp4");
    std::fs::write(&text, b"this is not a video at all, just some text\n").unwrap();
    let e = FileSource::open(&text).unwrap_err();
    assert!(matches!(e, IngestError::NotMedia { .. } | IngestError::NoVideo { .. }), "{e}");
    let src = FileSource::open(root().join("fixtures/preprocess/clips/h264_short_30fps_256x144.mp4")).unwrap();
    let e = src.frames(&[0, 24], DecodeOptions::default()).unwrap_err();
    assert!(matches!(e, IngestError::FrameIndex { index: 24, frames: 24 }), "{e}");
    assert!(src.frames(&[5, 2], DecodeOptions::default()).is_err());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn dropping_the_stream_stops_decoding() {
    let src = FileSource::open(root().join("fixtures/preprocess/clips/h264_25fps_480x270.mkv")).unwrap();
    let indices: Vec<usize> = (0..100).collect();
    let mut stream = src.frames(&indices, DecodeOptions { threads: 1, queue: 1 }).unwrap();
    assert!(stream.next().unwrap().is_ok());
    drop(stream); // the decode thread sees the closed channel and exits
}
