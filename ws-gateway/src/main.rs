//! `lookout`: watch video with Qwen3-VL.
//!
//! Run `lookout --help` for the commands.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LOOKOUT_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
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
