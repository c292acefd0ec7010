//! Finding and reading a checkpoint in the Hugging Face layout, from a local directory or the Hub.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::Error;

/// The files of one checkpoint.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// Where they are.
    pub dir: PathBuf,
    /// `config.json`.
    pub config: PathBuf,
    /// `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// The safetensors files (one, or the shards named by `model.safetensors.index.json`).
    pub weights: Vec<PathBuf>,
    /// The chat template text.
    pub chat_template: String,
    /// `generation_config.json`, when present.
    pub generation: GenerationConfig,
    /// `tokenizer_config.json` contents (special token strings), when present.
    pub tokenizer_config: serde_json::Value,
}

/// The parts of `generation_config.json` Lookout uses.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct GenerationConfig {
    /// End-of-sequence ids (one or several).
    #[serde(default, deserialize_with = "one_or_many")]
    pub eos_token_id: Vec<u32>,
    /// Padding id.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Whether the model's authors sample by default.
    #[serde(default)]
    pub do_sample: Option<bool>,
    /// Default temperature.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Default top-k.
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Default top-p.
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Default repetition penalty.
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    /// Default length limit.
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
        Null,
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        Some(OneOrMany::One(v)) => vec![v],
        Some(OneOrMany::Many(v)) => v,
        Some(OneOrMany::Null) | None => Vec::new(),
    })
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| Error::Files(format!("cannot read {}: {e}", path.display())))
}

fn json(path: &Path) -> Result<serde_json::Value, Error> {
    serde_json::from_str(&read(path)?).map_err(|e| Error::Files(format!("{} is not valid JSON: {e}", path.display())))
}

impl ModelFiles {
    /// Resolves `model`: a local directory, or a Hub id (`owner/name`) downloaded with hf-hub
    /// into its cache (with a progress bar) on first use.
    pub fn resolve(model: &str) -> Result<Self, Error> {
        let path = Path::new(model);
        if path.is_dir() {
            return Self::from_dir(path);
        }
        let looks_like_id = model.split('/').count() == 2 && !model.starts_with('.') && !model.starts_with('/');
        if !looks_like_id {
            return Err(Error::Files(format!("{model} is not a directory (and not a Hub id of the form owner/name)")));
        }
        Self::download(model)
    }

    /// Reads a local checkpoint directory.
    pub fn from_dir(dir: &Path) -> Result<Self, Error> {
        let need = |name: &str| -> Result<PathBuf, Error> {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::Files(format!(
                    "{} has no {name}; a Qwen3-VL checkpoint directory is expected",
                    dir.display()
                )))
            }
        };
        let config = need("config.json")?;
        let tokenizer = need("tokenizer.json")?;
        let weights = if dir.join("model.safetensors.index.json").is_file() {
            let index = json(&dir.join("model.safetensors.index.json"))?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Files("model.safetensors.index.json has no weight_map".into()))?;
            let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_owned)).collect();
            files.sort();
            files.dedup();
            files.iter().map(|f| need(f)).collect::<Result<Vec<_>, _>>()?
        } else {
            vec![need("model.safetensors")?]
        };
        let tokenizer_config = match dir.join("tokenizer_config.json") {
            p if p.is_file() => json(&p)?,
            _ => serde_json::Value::Null,
        };
        let chat_template = find_chat_template(dir, &tokenizer_config)?;
        let generation = match dir.join("generation_config.json") {
            p if p.is_file() => {
                serde_json::from_str(&read(&p)?).map_err(|e| Error::Files(format!("generation_config.json: {e}")))?
            }
            _ => GenerationConfig::default(),
        };
        Ok(ModelFiles { dir: dir.to_owned(), config, tokenizer, weights, chat_template, generation, tokenizer_config })
    }

    fn download(id: &str) -> Result<Self, Error> {
        let offline = |e: &dyn std::fmt::Display| {
            Error::Hub(format!(
                "cannot fetch {id} from the Hugging Face Hub ({e}). Without network access, download the \
                 checkpoint elsewhere (config.json, tokenizer files, *.safetensors) and pass its local \
                 directory, e.g. --model /models/Qwen3-VL-2B-Instruct"
            ))
        };
        if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
            // Offline: only a complete copy in the local Hub cache will do.
            let cache = hf_hub::Cache::from_env().model(id.to_owned());
            let config =
                cache.get("config.json").ok_or_else(|| offline(&"HF_HUB_OFFLINE is set and it is not cached"))?;
            let dir = config.parent().map(Path::to_path_buf).ok_or_else(|| Error::Hub("bad cache path".into()))?;
            return Self::from_dir(&dir);
        }
        // HF_ENDPOINT and HF_HOME are honoured; files already in the cache are not fetched again.
        let api = hf_hub::api::sync::ApiBuilder::from_env().with_progress(true).build().map_err(|e| offline(&e))?;
        let repo = api.model(id.to_owned());
        let config = repo.get("config.json").map_err(|e| offline(&e))?;
        let dir = config.parent().map(Path::to_path_buf).ok_or_else(|| Error::Hub("bad cache path".into()))?;
        for name in ["tokenizer.json", "tokenizer_config.json"] {
            repo.get(name).map_err(|e| offline(&e))?;
        }
        for optional in
            ["chat_template.jinja", "chat_template.json", "generation_config.json", "preprocessor_config.json"]
        {
            let _ = repo.get(optional);
        }
        match repo.get("model.safetensors.index.json") {
            Ok(index) => {
                let index = json(&index)?;
                let mut files: Vec<String> = index["weight_map"]
                    .as_object()
                    .map(|m| m.values().filter_map(|v| v.as_str().map(str::to_owned)).collect())
                    .unwrap_or_default();
                files.sort();
                files.dedup();
                for f in files {
                    repo.get(&f).map_err(|e| offline(&e))?;
                }
            }
            Err(_) => {
                repo.get("model.safetensors").map_err(|e| offline(&e))?;
            }
        }
        Self::from_dir(&dir)
    }
}

/// `chat_template.jinja`, then `chat_template.json`, then `tokenizer_config.json`'s
/// `chat_template` (a string, or a list of named templates where `default` wins).
fn find_chat_template(dir: &Path, tokenizer_config: &serde_json::Value) -> Result<String, Error> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return read(&jinja);
    }
    let from_value = |v: &serde_json::Value| -> Option<String> {
        match v {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(list) => {
                let named = |name: &str| {
                    list.iter().find(|t| t["name"] == name).and_then(|t| t["template"].as_str()).map(str::to_owned)
                };
                named("default").or_else(|| list.first().and_then(|t| t["template"].as_str()).map(str::to_owned))
            }
            _ => None,
        }
    };
    let json_file = dir.join("chat_template.json");
    if json_file.is_file()
        && let Some(t) = from_value(&json(&json_file)?["chat_template"])
    {
        return Ok(t);
    }
    if let Some(t) = from_value(&tokenizer_config["chat_template"]) {
        return Ok(t);
    }
    Err(Error::Files(format!(
        "{} has no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json)",
        dir.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_is_one_or_many() {
        let g: GenerationConfig = serde_json::from_str(r#"{"eos_token_id": 5}"#).unwrap();
        assert_eq!(g.eos_token_id, vec![5]);
        let g: GenerationConfig = serde_json::from_str(r#"{"eos_token_id": [5, 6], "top_k": 20}"#).unwrap();
        assert_eq!(g.eos_token_id, vec![5, 6]);
        assert_eq!(g.top_k, Some(20));
    }

    #[test]
    fn template_sources_in_order() {
        let dir = std::env::temp_dir().join(format!("lookout-tpl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tc = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
        assert_eq!(find_chat_template(&dir, &tc).unwrap(), "D");
        std::fs::write(dir.join("chat_template.json"), r#"{"chat_template": "J"}"#).unwrap();
        assert_eq!(find_chat_template(&dir, &tc).unwrap(), "J");
        std::fs::write(dir.join("chat_template.jinja"), "K").unwrap();
        assert_eq!(find_chat_template(&dir, &tc).unwrap(), "K");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(find_chat_template(Path::new("/nonexistent"), &serde_json::Value::Null).is_err());
    }

    #[test]
    fn missing_pieces_are_clear_errors() {
        let e = ModelFiles::resolve("/definitely/not/here").unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        let e = ModelFiles::from_dir(Path::new("/tmp")).unwrap_err().to_string();
        assert!(e.contains("config.json"), "{e}");
    }
}
