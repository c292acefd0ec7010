//! Samples a clip the way Qwen3-VL's reference pipeline does and prints the plan.
//!
//! Run with `cargo run -p examples --example sample_clip -- fixtures/preprocess/clips/h264_25fps_480x270.mkv`
//!
//! ```text
//! h264 480x270, 100 frames at 25 fps
//! 8 frames [0, 14, 28, 42, 57, 71, 85, 99] resized to 288x512, grid [4, 18, 32] = 576 LLM tokens
//! ```
#![allow(clippy::print_stdout)]

fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).ok_or_else(|| anyhow::anyhow!("usage: sample_clip VIDEO"))?;
    let s = ws_gateway::clip::sample_file(
        path.as_ref(),
        &sampler::SampleOptions::default(),
        ingest::DecodeOptions::default(),
    )?;
    println!(
        "{} {}x{}, {} frames at {} fps",
        s.info.codec, s.info.width, s.info.height, s.info.frame_count, s.info.fps
    );
    println!(
        "{} frames {:?} resized to {}x{}, grid {:?} = {} LLM tokens",
        s.plan.frame_indices.len(),
        s.plan.frame_indices,
        s.plan.resized_height,
        s.plan.resized_width,
        s.clip.grid_thw,
        s.clip.llm_tokens()
    );
    Ok(())
}
