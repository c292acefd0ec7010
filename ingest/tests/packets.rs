//! Demuxing gives every packet back. libav allocates packets with glibc's malloc; reading a
//! file's packets again and again must not grow glibc's heap. (One reused `Packet` across
//! `av_read_frame` calls leaked each packet's buffer: a looped replay grew by ~60 KiB/s.)

use std::path::PathBuf;

use ingest::{DecodeOptions, FileSource};

/// Bytes in use in glibc's heap.
fn in_use() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's counters.
    unsafe { libc::mallinfo2().uordblks }
}

#[test]
fn reading_and_decoding_a_file_again_and_again_keeps_no_packets() {
    let clip = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/preprocess/clips/h264_25fps_480x270.mkv");
    let file_bytes = std::fs::metadata(&clip).unwrap().len() as usize;
    let run = || {
        // The scan reads every packet; decoding a few frames reads packets again.
        let source = FileSource::open(&clip).unwrap();
        let frames: Vec<_> = source.frames(&[0, 10, 20], DecodeOptions::default()).unwrap().collect();
        assert_eq!(frames.len(), 3);
    };
    // libav's one-time tables and caches first.
    for _ in 0..3 {
        run();
    }
    let before = in_use();
    let runs = 20;
    for _ in 0..runs {
        run();
    }
    // The decode threads give their memory back as they finish (up to a few seconds here);
    // leaking the packets would keep about the file's size per run (4.7 MB here) for good.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut grown = in_use().saturating_sub(before);
    while grown >= file_bytes && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        grown = in_use().saturating_sub(before);
    }
    assert!(grown < file_bytes, "glibc's heap grew by {grown} bytes over {runs} reads of a {file_bytes}-byte file");
}
