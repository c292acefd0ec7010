//! `config.json` of a Qwen3-VL checkpoint, in both serializer layouts.

use serde::Deserialize;

use crate::Error;

/// RoPE parameters of the text model (`rope_parameters` in v5 configs, `rope_scaling` plus
/// `rope_theta` in 4.57 configs).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RopeParameters {
    /// `"default"` is the only type the published checkpoints use.
    #[serde(default = "default_rope_type")]
    pub rope_type: String,
    /// Base of the inverse frequencies.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Frequencies per axis (T, H, W); they sum to `head_dim / 2`.
    #[serde(default)]
    pub mrope_section: Option<Vec<usize>>,
}

fn default_rope_type() -> String {
    "default".into()
}

/// The text decoder.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TextConfig {
    /// Vocabulary rows of the embedding and head.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA).
    pub num_key_value_heads: usize,
    /// Per-head width (128 for the published models; not always hidden / heads).
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Activation of the MLP (`silu`).
    #[serde(default = "default_silu")]
    pub hidden_act: String,
    /// 4.57 layout: theta at the top level.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// 4.57 layout.
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    /// v5 layout.
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// Biases on q/k/v/o (false for Qwen3-VL).
    #[serde(default)]
    pub attention_bias: bool,
    /// Context length the model was trained for.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Whether the head reuses the embedding (may also be given at the top level).
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_silu() -> String {
    "silu".into()
}
fn default_max_pos() -> usize {
    262_144
}

impl TextConfig {
    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// RoPE base, from whichever layout the file uses (class default 5,000,000).
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .or_else(|| self.rope_scaling.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or(5_000_000.0)
    }

    /// MRoPE sections (T, H, W), default `[24, 20, 20]`.
    pub fn mrope_section(&self) -> Vec<usize> {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.mrope_section.clone())
            .or_else(|| self.rope_scaling.as_ref().and_then(|r| r.mrope_section.clone()))
            .unwrap_or_else(|| vec![24, 20, 20])
    }

    fn rope_type(&self) -> String {
        self.rope_parameters
            .as_ref()
            .or(self.rope_scaling.as_ref())
            .map_or_else(default_rope_type, |r| r.rope_type.clone())
    }
}

/// The vision tower.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VisionConfig {
    /// Transformer blocks.
    #[serde(default = "d_depth")]
    pub depth: usize,
    /// Width.
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    /// MLP width.
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    /// Attention heads.
    #[serde(default = "d_heads")]
    pub num_heads: usize,
    /// Input channels.
    #[serde(default = "d_in")]
    pub in_channels: usize,
    /// Patch side in pixels.
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    /// 2x2 patches become one LLM token.
    #[serde(default = "d_merge")]
    pub spatial_merge_size: usize,
    /// Frames per patch.
    #[serde(default = "d_temporal")]
    pub temporal_patch_size: usize,
    /// Width of the merged tokens (the text hidden size).
    pub out_hidden_size: usize,
    /// Rows of the learned position table (a square grid).
    #[serde(default = "d_pos")]
    pub num_position_embeddings: usize,
    /// Blocks after which DeepStack features are taken.
    #[serde(default = "d_deepstack")]
    pub deepstack_visual_indexes: Vec<usize>,
    /// Block MLP activation (`gelu_pytorch_tanh`).
    #[serde(default = "d_act")]
    pub hidden_act: String,
}

fn d_depth() -> usize {
    27
}
fn d_hidden() -> usize {
    1152
}
fn d_inter() -> usize {
    4304
}
fn d_heads() -> usize {
    16
}
fn d_in() -> usize {
    3
}
fn d_patch() -> usize {
    16
}
fn d_merge() -> usize {
    2
}
fn d_temporal() -> usize {
    2
}
fn d_pos() -> usize {
    2304
}
fn d_deepstack() -> Vec<usize> {
    vec![8, 16, 24]
}
fn d_act() -> String {
    "gelu_pytorch_tanh".into()
}

impl VisionConfig {
    /// Per-head width (64 or 72 for the published models).
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

/// A Qwen3-VL checkpoint's `config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Config {
    /// The text decoder.
    pub text_config: TextConfig,
    /// The vision tower.
    pub vision_config: VisionConfig,
    /// `<|image_pad|>`.
    pub image_token_id: u32,
    /// `<|video_pad|>`.
    pub video_token_id: u32,
    /// `<|vision_start|>`.
    pub vision_start_token_id: u32,
    /// `<|vision_end|>`.
    pub vision_end_token_id: u32,
    /// Top-level tie flag.
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
}

impl Config {
    /// Parses and checks a `config.json`.
    pub fn from_json(text: &str) -> Result<Self, Error> {
        let cfg: Config = serde_json::from_str(text).map_err(|e| Error::Config(format!("config.json: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Whether the head shares the embedding matrix.
    pub fn tie_word_embeddings(&self) -> bool {
        self.tie_word_embeddings.or(self.text_config.tie_word_embeddings).unwrap_or(false)
    }

    fn validate(&self) -> Result<(), Error> {
        let t = &self.text_config;
        let v = &self.vision_config;
        let bad = |m: String| Err(Error::Config(m));
        if t.num_attention_heads == 0
            || t.num_key_value_heads == 0
            || !t.num_attention_heads.is_multiple_of(t.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                t.num_attention_heads, t.num_key_value_heads
            ));
        }
        let sec = t.mrope_section();
        if sec.len() != 3 || sec.iter().sum::<usize>() * 2 != t.head_dim() {
            return bad(format!(
                "mrope_section {sec:?} must have 3 entries summing to head_dim / 2 = {}",
                t.head_dim() / 2
            ));
        }
        if t.rope_type() != "default" {
            return bad(format!("rope_type {:?} is not supported (only \"default\")", t.rope_type()));
        }
        if t.hidden_act != "silu" {
            return bad(format!("text hidden_act {:?} is not supported (only silu)", t.hidden_act));
        }
        if v.num_heads == 0 || !v.hidden_size.is_multiple_of(v.num_heads) || !v.head_dim().is_multiple_of(4) {
            return bad(format!(
                "vision hidden_size {} / num_heads {} must give a head size divisible by 4",
                v.hidden_size, v.num_heads
            ));
        }
        if v.out_hidden_size != t.hidden_size {
            return bad(format!(
                "vision out_hidden_size {} differs from the text hidden_size {}",
                v.out_hidden_size, t.hidden_size
            ));
        }
        let side = (v.num_position_embeddings as f64).sqrt() as usize;
        if side * side != v.num_position_embeddings || side < 2 {
            return bad(format!("num_position_embeddings {} is not a square grid", v.num_position_embeddings));
        }
        if v.deepstack_visual_indexes.iter().any(|&i| i >= v.depth) {
            return bad(format!("deepstack_visual_indexes {:?} outside depth {}", v.deepstack_visual_indexes, v.depth));
        }
        if v.deepstack_visual_indexes.len() > t.num_hidden_layers {
            return bad("more DeepStack features than text layers".into());
        }
        if !matches!(v.hidden_act.as_str(), "gelu_pytorch_tanh" | "gelu" | "gelu_new") {
            return bad(format!("vision hidden_act {:?} is not supported", v.hidden_act));
        }
        if v.spatial_merge_size != 2 || v.temporal_patch_size != 2 || v.patch_size != 16 || v.in_channels != 3 {
            return bad(format!(
                "vision patching {}x{} / temporal {} / merge {} / channels {} differs from Qwen3-VL's 16x16 / 2 / 2 / 3",
                v.patch_size, v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.in_channels
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_layouts_parse_to_the_same_rope() {
        let v5 = r#"{"text_config": {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000000, "mrope_section": [2, 1, 1]}},
            "vision_config": {"depth": 1, "hidden_size": 8, "num_heads": 2, "intermediate_size": 8,
            "out_hidden_size": 8, "num_position_embeddings": 4, "deepstack_visual_indexes": [0]},
            "image_token_id": 1, "video_token_id": 2, "vision_start_token_id": 3, "vision_end_token_id": 4}"#;
        let old = v5.replace(
            r#""rope_parameters": {"rope_type": "default", "rope_theta": 5000000, "mrope_section": [2, 1, 1]}"#,
            r#""rope_theta": 5000000, "rope_scaling": {"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": true}"#,
        );
        let a = Config::from_json(v5).unwrap();
        let b = Config::from_json(&old).unwrap();
        assert_eq!(a.text_config.rope_theta(), 5e6);
        assert_eq!(b.text_config.rope_theta(), 5e6);
        assert_eq!(a.text_config.mrope_section(), vec![2, 1, 1]);
        assert_eq!(b.text_config.mrope_section(), vec![2, 1, 1]);
        assert!(!a.tie_word_embeddings());
        let bad = v5.replace("[2, 1, 1]", "[2, 2, 2]");
        assert!(Config::from_json(&bad).unwrap_err().to_string().contains("mrope_section"));
        assert!(Config::from_json("{").is_err());
    }
}
