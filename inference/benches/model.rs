//! Model speed: vision encoding per frame pair, prefill tokens/s, TTFT and decode tokens/s for a
//! checkpoint directory, on synthetic input. benches/model.sh runs it next to transformers.
//!
//! ```text
//! LOOKOUT_BENCH_MODEL=DIR [LOOKOUT_BENCH_PAIRS=4] [LOOKOUT_BENCH_SIDE=448] [LOOKOUT_BENCH_DECODE=64]
//!   [LOOKOUT_BENCH_DTYPE=f32] [LOOKOUT_BENCH_DEVICE=cpu] [LOOKOUT_BENCH_INPUTS=inputs.safetensors]
//!   cargo bench -p inference --bench model
//! ```
//! Prints one JSON object; with LOOKOUT_BENCH_INPUTS it also writes the exact inputs it used, so
//! the Python side runs the same work.
#![allow(clippy::print_stdout, missing_docs)]

use std::time::Instant;

// Tensor ops allocate and free large buffers constantly; glibc malloc returns them to the OS each
// time (page faults on every op), mimalloc keeps them.
mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_core::Tensor;
use inference::config::Config;
use inference::files::ModelFiles;
use inference::model::Qwen3VL;
use inference::processor::{Message, Processor, VideoMeta};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn best<F: FnMut()>(mut f: F, reps: usize) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Which matmul kernels this run used, and the CPU features they were chosen by.
fn kernels(device: &candle_core::Device, dtype: inference::DType) -> String {
    use inference::gemm::{Kernel, bf16_kernel, kernel};
    if !device.is_cpu() {
        return "candle CUDA (cuBLAS)".into();
    }
    let gemm = match dtype {
        inference::DType::F32 => kernel().map_or("candle's gemm crate", Kernel::name),
        inference::DType::BF16 => bf16_kernel().map_or("candle's bf16 ops", Kernel::name),
        _ => "candle's ops",
    };
    #[cfg(target_arch = "x86_64")]
    let features: Vec<&str> = [
        ("avx2", std::arch::is_x86_feature_detected!("avx2")),
        ("fma", std::arch::is_x86_feature_detected!("fma")),
        ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
        ("avx512bf16", std::arch::is_x86_feature_detected!("avx512bf16")),
    ]
    .into_iter()
    .filter_map(|(name, has)| has.then_some(name))
    .collect();
    #[cfg(not(target_arch = "x86_64"))]
    let features: Vec<&str> = Vec::new();
    format!("linears and attention: {gemm}; CPU: {}", features.join(" "))
}

fn main() {
    let Ok(dir) = std::env::var("LOOKOUT_BENCH_MODEL") else {
        println!("set LOOKOUT_BENCH_MODEL to a checkpoint directory (benches/model.sh makes one)");
        return;
    };
    let pairs: usize = env("LOOKOUT_BENCH_PAIRS", 4);
    let side: usize = env("LOOKOUT_BENCH_SIDE", 448);
    let n_decode: usize = env("LOOKOUT_BENCH_DECODE", 64);
    let dtype = inference::parse_dtype(&env("LOOKOUT_BENCH_DTYPE", "f32".to_owned())).unwrap();
    let device: inference::DeviceChoice = env("LOOKOUT_BENCH_DEVICE", "cpu".to_owned()).parse().unwrap();
    let device = device.open().unwrap();

    let files = ModelFiles::resolve(&dir).unwrap();
    let cfg = Config::from_json(&std::fs::read_to_string(&files.config).unwrap()).unwrap();
    let processor = Processor::new(&files, &cfg).unwrap();
    #[allow(unsafe_code)]
    // SAFETY: the bench does not modify the weights while they are mapped.
    let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&files.weights, dtype, &device) }.unwrap();
    let model = Qwen3VL::new(&cfg, vb).unwrap();

    let g = side / 16;
    let grid = [pairs, g, g];
    let rows = pairs * g * g;
    // Deterministic pseudo-random pixels in [-1, 1].
    let pixels = common::pixels(rows * 1536, 0);
    let timestamps: Vec<f64> = (0..pairs).map(|i| i as f64 + 0.5).collect();
    let prompt = processor
        .prepare(
            &[Message::user_video("Describe what happens in this clip.")],
            &[VideoMeta { grid_thw: grid, timestamps }],
        )
        .unwrap();
    let pv = Tensor::from_vec(pixels.clone(), (rows, 1536), &device).unwrap();

    let sync = || device.synchronize().unwrap();
    let vision_s = best(
        || {
            model.encode_video(&pv, &[grid]).unwrap();
            sync();
        },
        3,
    );
    let vision = model.encode_video(&pv, &[grid]).unwrap();
    let prefill_s = best(
        || {
            let mut cache = model.new_cache();
            model.prefill(&prompt.ids, &prompt.kinds, &prompt.positions, Some(&vision), &mut cache).unwrap();
            sync();
        },
        3,
    );
    let mut cache = model.new_cache();
    let logits: Vec<f32> = model
        .prefill(&prompt.ids, &prompt.kinds, &prompt.positions, Some(&vision), &mut cache)
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut token = inference::sampling::argmax(&logits);
    let start = prompt.ids.len() as i64 + prompt.positions.rope_delta;
    let t = Instant::now();
    for pos in (start..).take(n_decode) {
        let l: Vec<f32> = model.decode(token, pos, &mut cache).unwrap().to_vec1().unwrap();
        token = inference::sampling::argmax(&l);
    }
    let decode_s = t.elapsed().as_secs_f64();

    if let Ok(path) = std::env::var("LOOKOUT_BENCH_INPUTS") {
        let ids: Vec<i64> = prompt.ids.iter().map(|&i| i as i64).collect();
        let kinds: Vec<i64> = prompt.kinds.iter().map(|k| *k as i64).collect();
        let mut map = std::collections::HashMap::new();
        let cpu = candle_core::Device::Cpu;
        map.insert("input_ids".to_owned(), Tensor::from_vec(ids.clone(), ids.len(), &cpu).unwrap());
        map.insert("mm_token_type_ids".to_owned(), Tensor::from_vec(kinds, ids.len(), &cpu).unwrap());
        map.insert("pixel_values".to_owned(), Tensor::from_vec(pixels, (rows, 1536), &cpu).unwrap());
        let grid_t = Tensor::from_vec(vec![grid[0] as i64, grid[1] as i64, grid[2] as i64], (1, 3), &cpu).unwrap();
        map.insert("video_grid_thw".to_owned(), grid_t);
        map.insert("decode_tokens".to_owned(), Tensor::from_vec(vec![n_decode as i64], 1, &cpu).unwrap());
        candle_core::safetensors::save(&map, path).unwrap();
    }
    let report = serde_json::json!({
        "impl": "lookout",
        "threads": candle_core::utils::get_num_threads(),
        "prompt_tokens": prompt.ids.len(),
        "frame_pairs": pairs,
        "vision_ms_per_pair": vision_s * 1000.0 / pairs as f64,
        "prefill_tok_s": prompt.ids.len() as f64 / prefill_s,
        "ttft_ms": (vision_s + prefill_s) * 1000.0,
        "decode_tok_s": n_decode as f64 / decode_s,
        "kernels": kernels(&device, dtype),
    });
    println!("{report}");
}
