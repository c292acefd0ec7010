//! Checkpoint layouts: sharded safetensors with an index, and every supported dtype.

mod common;

use candle_core::{DType, Device};
use common::*;
use inference::files::ModelFiles;

fn prefill_logits(dir: &std::path::Path, dtype: DType) -> Vec<f32> {
    let files = ModelFiles::resolve(dir.to_str().unwrap()).unwrap();
    let cfg = inference::config::Config::from_json(&std::fs::read_to_string(&files.config).unwrap()).unwrap();
    let processor = inference::processor::Processor::new(&files, &cfg).unwrap();
    #[allow(unsafe_code)]
    // SAFETY: test files are not modified while mapped.
    let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&files.weights, dtype, &Device::Cpu) }.unwrap();
    let model = inference::model::Qwen3VL::new(&cfg, vb).unwrap();
    let all = cases();
    let case = &all["models"]["tiny-tied"][2];
    let prompt = processor.prepare(&messages(case), &[]).unwrap();
    let mut cache = model.new_cache();
    model.prefill(&prompt.ids, &prompt.kinds, &prompt.positions, None, &mut cache).unwrap().to_vec1().unwrap()
}

#[test]
fn sharded_checkpoint_loads_the_same_weights() {
    let src = model_dir("tiny-tied");
    let dir = std::env::temp_dir().join(format!("lookout-sharded-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() && p.file_name().unwrap() != "model.safetensors" {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    let tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (shard, part) in [("model-00001-of-00002.safetensors", a), ("model-00002-of-00002.safetensors", b)] {
        let sub: std::collections::HashMap<String, candle_core::Tensor> =
            part.iter().map(|n| ((*n).clone(), tensors[*n].clone())).collect();
        candle_core::safetensors::save(&sub, dir.join(shard)).unwrap();
        for n in part.iter() {
            map.insert((*n).clone(), serde_json::Value::String(shard.into()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let files = ModelFiles::resolve(dir.to_str().unwrap()).unwrap();
    assert_eq!(files.weights.len(), 2);
    assert_eq!(prefill_logits(&dir, DType::F32), prefill_logits(&src, DType::F32));
    // A shard named by the index but missing is a clear error.
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let e = ModelFiles::resolve(dir.to_str().unwrap()).unwrap_err().to_string();
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn f16_runs_close_to_the_f32_reference() {
    let got = prefill_logits(&model_dir("tiny-tied"), DType::F16);
    let want = Reference::load("tiny-tied", "text_only").f32s("logits_last");
    let err = rel_err(&got, &want);
    assert!(err < 0.01, "f16 relative error {err}");
}
