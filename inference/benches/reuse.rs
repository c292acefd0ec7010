//! Vision reuse across sliding windows: the vision time of a stream of windows with the reuse
//! cache against encoding every window whole, in one run. benches/reuse.sh runs it.
//!
//! ```text
//! LOOKOUT_BENCH_MODEL=DIR [LOOKOUT_BENCH_WINDOW_PAIRS=4] [LOOKOUT_BENCH_STRIDE_PAIRS=1]
//!   [LOOKOUT_BENCH_WINDOWS=12] [LOOKOUT_BENCH_SIDE=448] [LOOKOUT_BENCH_DTYPE=f32]
//!   [LOOKOUT_BENCH_DEVICE=cpu] cargo bench -p inference --bench reuse
//! ```
//! Prints one JSON object. Windows `k` holds pairs `k * stride .. k * stride + window`; both
//! ways get the same pixels, and the outputs are checked equal bit for bit.
#![allow(clippy::print_stdout, missing_docs)]

use std::time::Instant;

mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_core::{DType, Tensor};
use inference::config::Config;
use inference::files::ModelFiles;
use inference::model::Qwen3VL;
use inference::reuse::VisionCache;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let Ok(dir) = std::env::var("LOOKOUT_BENCH_MODEL") else {
        println!("set LOOKOUT_BENCH_MODEL to a checkpoint directory (benches/reuse.sh makes one)");
        return;
    };
    let window: usize = env("LOOKOUT_BENCH_WINDOW_PAIRS", 4);
    let stride: usize = env("LOOKOUT_BENCH_STRIDE_PAIRS", 1).max(1);
    let windows: usize = env("LOOKOUT_BENCH_WINDOWS", 12);
    let side: usize = env("LOOKOUT_BENCH_SIDE", 448);
    let dtype = inference::parse_dtype(&env("LOOKOUT_BENCH_DTYPE", "f32".to_owned())).unwrap();
    let device: inference::DeviceChoice = env("LOOKOUT_BENCH_DEVICE", "cpu".to_owned()).parse().unwrap();
    let device = device.open().unwrap();
    let files = ModelFiles::resolve(&dir).unwrap();
    let cfg = Config::from_json(&std::fs::read_to_string(&files.config).unwrap()).unwrap();
    #[allow(unsafe_code)]
    // SAFETY: the bench does not modify the weights while they are mapped.
    let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&files.weights, dtype, &device) }.unwrap();
    let model = Qwen3VL::new(&cfg, vb).unwrap();

    let g = side / 16;
    let pair_len = g * g * 1536;
    let total_pairs = (windows - 1) * stride + window;
    let stream = common::pixels(total_pairs * pair_len, 0);
    let window_of = |k: usize| &stream[k * stride * pair_len..(k * stride + window) * pair_len];
    let grid = [window, g, g];
    let bits = |t: &Tensor| -> Vec<u32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };

    // Warm up both paths once.
    let pv = Tensor::from_vec(window_of(0).to_vec(), (window * g * g, 1536), &device).unwrap();
    model.encode_video(&pv, &[grid]).unwrap();
    let mut cold = VisionCache::new(0);
    cold.encode(&model.vision, &device, window_of(0).to_vec(), &[grid]).unwrap();

    let mut whole_s = 0.0;
    let mut reuse_s = 0.0;
    let mut cache = VisionCache::new(usize::MAX);
    let (mut hits, mut misses) = (0, 0);
    for k in 0..windows {
        let t = Instant::now();
        let pv = Tensor::from_vec(window_of(k).to_vec(), (window * g * g, 1536), &device).unwrap();
        let whole = model.encode_video(&pv, &[grid]).unwrap();
        device.synchronize().unwrap();
        whole_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let (reused, n) = cache.encode(&model.vision, &device, window_of(k).to_vec(), &[grid]).unwrap();
        device.synchronize().unwrap();
        reuse_s += t.elapsed().as_secs_f64();
        hits += n.hits;
        misses += n.misses;
        assert!(bits(&whole.embeds) == bits(&reused.embeds), "window {k}: reuse changed the output");
        for (a, b) in whole.deepstack.iter().zip(&reused.deepstack) {
            assert!(bits(a) == bits(b), "window {k}: reuse changed a DeepStack tap");
        }
    }
    let report = serde_json::json!({
        "windows": windows,
        "window_pairs": window,
        "stride_pairs": stride,
        "side": side,
        "pairs_reused": hits,
        "pairs_encoded": misses,
        "cache_mib": cache.bytes() as f64 / (1 << 20) as f64,
        "whole_ms_per_window": whole_s * 1000.0 / windows as f64,
        "reuse_ms_per_window": reuse_s * 1000.0 / windows as f64,
        "speedup": whole_s / reuse_s,
        "bit_exact": true,
    });
    println!("{report}");
}
