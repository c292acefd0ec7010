//! Rotated clips (a display matrix, as phones write): frames come out turned upright and the
//! stream reports the turned size, as the reference reader (torchcodec 0.17) does. The rotated
//! files are made here with ffmpeg (`-c copy -metadata:s:v:0 rotate=R`, the same pixels), and
//! the angle is read back with ffprobe, libav's own reading of the matrix.

use std::path::PathBuf;
use std::process::Command;

use ingest::orientation::Rotation;
use ingest::{DecodeOptions, FileSource};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn rotated_clips_decode_upright_with_the_turned_size() {
    let clip = root().join("fixtures/preprocess/clips/h264_25fps_480x270.mkv");
    let dir = std::env::temp_dir().join(format!("lookout-rotation-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plain = FileSource::open(&clip).unwrap();
    assert_eq!(plain.info().rotation, Rotation::None);
    let indices = [0, 7, 19];
    let upright: Vec<ingest::Frame> =
        plain.frames(&indices, DecodeOptions::default()).unwrap().map(Result::unwrap).collect();
    for tag in [90, 180, 270] {
        let rotated = dir.join(format!("r{tag}.mp4"));
        let made = Command::new("ffmpeg")
            .args(["-v", "error", "-y", "-i"])
            .arg(&clip)
            .args(["-c", "copy", "-metadata:s:v:0", &format!("rotate={tag}")])
            .arg(&rotated)
            .status()
            .unwrap();
        assert!(made.success());
        let probe = Command::new("ffprobe")
            .args(["-v", "error", "-select_streams", "v:0", "-show_entries", "stream_side_data=rotation"])
            .args(["-of", "default=nw=1:nk=1"])
            .arg(&rotated)
            .output()
            .unwrap();
        let degrees: i32 = String::from_utf8_lossy(&probe.stdout).trim().parse().unwrap();
        let want = match degrees.rem_euclid(360) {
            90 => Rotation::Ccw90,
            180 => Rotation::Half,
            270 => Rotation::Cw90,
            other => panic!("ffprobe reads {other} degrees"),
        };
        let src = FileSource::open(&rotated).unwrap();
        assert_eq!(src.info().rotation, want, "rotate={tag}: libav reads {degrees} degrees");
        let (w, h) = want.turned(480, 270);
        assert_eq!((src.info().width, src.info().height), (w, h));
        let got: Vec<ingest::Frame> =
            src.frames(&indices, DecodeOptions::default()).unwrap().map(Result::unwrap).collect();
        for (g, u) in got.iter().zip(&upright) {
            let (turned, tw, th) = want.apply(u.rgb.to_vec(), u.width, u.height);
            assert_eq!((g.width, g.height), (tw, th));
            assert!(*g.rgb == *turned, "rotate={tag}: frame {} is not the upright one turned", g.seq);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
