//! Shared helpers for the parity tests: the fixture models and their reference outputs.
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use inference::config::Config;
use inference::files::ModelFiles;
use inference::model::Qwen3VL;
use inference::processor::{Content, Message, Part, Processor, VideoMeta};
use serde_json::Value;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn model_dir(name: &str) -> PathBuf {
    root().join("fixtures/models").join(name)
}

pub fn cases() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("fixtures/models/cases.json")).unwrap()).unwrap()
}

pub struct Loaded {
    pub files: ModelFiles,
    pub cfg: Config,
    pub model: Qwen3VL,
    pub processor: Processor,
}

pub fn load(name: &str, dtype: DType) -> Loaded {
    let files = ModelFiles::resolve(model_dir(name).to_str().unwrap()).unwrap();
    let cfg = Config::from_json(&std::fs::read_to_string(&files.config).unwrap()).unwrap();
    let processor = Processor::new(&files, &cfg).unwrap();
    let tensors = candle_core::safetensors::load(&files.weights[0], &Device::Cpu).unwrap();
    let vb = VarBuilder::from_tensors(tensors, dtype, &Device::Cpu);
    let model = Qwen3VL::new(&cfg, vb).unwrap();
    Loaded { files, cfg, model, processor }
}

/// Messages of a case, as Lookout's processor takes them.
pub fn messages(case: &Value) -> Vec<Message> {
    case["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role = m["role"].as_str().unwrap().to_owned();
            let content = match &m["content"] {
                Value::String(s) => Content::Text(s.clone()),
                Value::Array(parts) => Content::Parts(
                    parts
                        .iter()
                        .map(|p| match p["type"].as_str() {
                            Some("video") => Part::Video,
                            _ => Part::Text(p["text"].as_str().unwrap().to_owned()),
                        })
                        .collect(),
                ),
                _ => panic!("bad content"),
            };
            Message { role, content }
        })
        .collect()
}

/// The timestamps the reference wrote into the expanded prompt (`<t seconds>`), as numbers.
pub fn timestamps(case: &Value) -> Vec<f64> {
    let text = case["expanded"].as_str().unwrap();
    text.split('<').filter_map(|s| s.split_once(" seconds>")).map(|(num, _)| num.parse().unwrap()).collect()
}

pub struct Reference {
    pub tensors: std::collections::HashMap<String, Tensor>,
}

impl Reference {
    pub fn load(model: &str, case: &str) -> Self {
        let path = model_dir(model).join("reference").join(format!("{case}.safetensors"));
        Reference { tensors: candle_core::safetensors::load(path, &Device::Cpu).unwrap() }
    }

    pub fn ids(&self, key: &str) -> Vec<i64> {
        self.tensors[key].to_vec1().unwrap()
    }

    pub fn f32s(&self, key: &str) -> Vec<f32> {
        self.tensors[key].to_vec1().unwrap()
    }

    pub fn has(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    pub fn pixel_values(&self) -> Tensor {
        let codes = &self.tensors["pixel_codes"];
        ((codes.to_dtype(DType::F32).unwrap() - 127.5).unwrap() / 127.5).unwrap()
    }

    pub fn grid(&self) -> [usize; 3] {
        let g: Vec<Vec<i64>> = self.tensors["video_grid_thw"].to_vec2().unwrap();
        [g[0][0] as usize, g[0][1] as usize, g[0][2] as usize]
    }

    /// The case's video as the engine takes it.
    pub fn video(&self, case: &Value) -> inference::VideoInput {
        inference::VideoInput {
            pixel_values: self.pixel_values().flatten_all().unwrap().to_vec1().unwrap(),
            grid_thw: self.grid(),
            timestamps: timestamps(case),
        }
    }

    pub fn video_meta(&self, case: &Value) -> Vec<VideoMeta> {
        if self.has("video_grid_thw") {
            vec![VideoMeta { grid_thw: self.grid(), timestamps: timestamps(case) }]
        } else {
            vec![]
        }
    }
}

/// max |a - b| / max |b|.
pub fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}
