//! Qwen3-VL: the vision tower and the text decoder joined by placeholder merge and DeepStack.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::Config;
use crate::positions::{PromptPositions, TokenKind};
use crate::text::{KvCache, Rope, TextModel};
use crate::vision::{VisionModel, VisionOutput};

/// The whole model. Inference state lives in [`KvCache`]s owned by the caller, so one loaded
/// model can serve several sequences.
#[derive(Debug)]
pub struct Qwen3VL {
    /// The vision tower.
    pub vision: VisionModel,
    /// The text decoder.
    pub text: TextModel,
    cfg: Config,
    device: Device,
    dtype: DType,
}

impl Qwen3VL {
    /// Builds the model from checkpoint tensors (`model.visual.*`, `model.language_model.*`,
    /// `lm_head.*`).
    ///
    /// bf16 on a CPU with AVX512-BF16 ([`crate::gemm::bf16_kernel`]): the linears' weights are
    /// packed in bf16 and multiplied in bf16 with f32 sums, everything else (activations,
    /// norms, attention, the KV cache) is f32; elsewhere bf16 is candle's bf16 throughout.
    pub fn new(cfg: &Config, vb: VarBuilder<'_>) -> Result<Self> {
        let bf16_linears = vb.device().is_cpu() && vb.dtype() == DType::BF16 && crate::gemm::bf16_kernel().is_some();
        let vb = if bf16_linears { vb.to_dtype(DType::F32) } else { vb };
        let build = || -> Result<(VisionModel, TextModel)> {
            let vision = VisionModel::new(&cfg.vision_config, vb.pp("model.visual"))?;
            let text = TextModel::new(
                &cfg.text_config,
                cfg.tie_word_embeddings(),
                vb.pp("model.language_model"),
                vb.pp("lm_head"),
            )?;
            Ok((vision, text))
        };
        let (vision, text) = if bf16_linears { crate::gemm::bf16_weights(build)? } else { build()? };
        Ok(Qwen3VL { vision, text, cfg: cfg.clone(), device: vb.device().clone(), dtype: vb.dtype() })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of the weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A fresh KV cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.text.num_layers())
    }

    /// Bytes of KV cache one token takes (keys and values of every layer, in the model dtype).
    pub fn kv_bytes_per_token(&self) -> usize {
        let t = &self.cfg.text_config;
        t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim() * self.dtype.size_in_bytes()
    }

    /// Encodes video patch rows (`rows x 1536`) for the given grids.
    pub fn encode_video(&self, pixel_values: &Tensor, grids: &[[usize; 3]]) -> Result<VisionOutput> {
        self.vision.forward(&pixel_values.to_device(&self.device)?, grids)
    }

    /// Runs the prompt (`ids`, with `kinds` marking video placeholders in order) into an empty
    /// `cache` and returns the logits of the last position (f32, `(vocab,)`).
    pub fn prefill(
        &self,
        ids: &[u32],
        kinds: &[TokenKind],
        positions: &PromptPositions,
        vision: Option<&VisionOutput>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let input = self.prefill_input(ids, kinds, positions, vision)?;
        self.prefill_chunk(&input, ids.len(), cache)?
            .ok_or_else(|| candle_core::Error::Msg("the prompt is empty".into()))
    }

    /// Runs the next `len` positions of `input` (a chunk of the prompt) into `cache`, which holds
    /// the positions before them. Returns the logits of the last position once the chunk ends
    /// the prompt. Chunks attend exactly as the whole prompt does (each row to every row before
    /// it), so a long prompt can be prefilled between other sequences' decode steps.
    pub fn prefill_chunk(&self, input: &PrefillInput, len: usize, cache: &mut KvCache) -> Result<Option<Tensor>> {
        let from = cache.len();
        let len = len.min(input.len.saturating_sub(from));
        if len == 0 {
            candle_core::bail!("nothing of the prompt is left to prefill");
        }
        let whole = from == 0 && len == input.len;
        let (x, rope, deepstack) = if whole {
            (input.x.clone(), None, input.deepstack.clone())
        } else {
            let ds = input.deepstack.iter().map(|t| t.narrow(0, from, len)).collect::<Result<Vec<_>>>()?;
            (input.x.narrow(0, from, len)?, Some(input.rope.narrow(from, len)?), ds)
        };
        let h = self.text.forward(&x, rope.as_ref().unwrap_or(&input.rope), cache, &deepstack)?;
        if from + len < input.len { Ok(None) } else { self.text.logits(&h).map(Some) }
    }

    /// The prompt's embeddings with the vision features merged in, its DeepStack features and
    /// rotary tables, ready to prefill whole or in chunks.
    pub fn prefill_input(
        &self,
        ids: &[u32],
        kinds: &[TokenKind],
        positions: &PromptPositions,
        vision: Option<&VisionOutput>,
    ) -> Result<PrefillInput> {
        let n = ids.len();
        if n == 0 || kinds.len() != n || positions.axes.iter().any(|a| a.len() != n) {
            candle_core::bail!("a prompt of {n} ids needs as many kinds and positions");
        }
        let mut x = self.text.embed(ids)?;
        let visual: Vec<usize> =
            kinds.iter().enumerate().filter(|(_, k)| **k != TokenKind::Text).map(|(i, _)| i).collect();
        let mut deepstack = Vec::new();
        if let Some(v) = vision {
            let rows = v.embeds.dim(0)?;
            if rows != visual.len() {
                candle_core::bail!("{} visual placeholders but the vision tower produced {rows} tokens", visual.len());
            }
            // Row i of `gather` picks vision row `ordinal` for placeholder positions and the
            // appended zero row elsewhere: one index_select scatters features into sequence order.
            let mut gather = vec![rows as u32; n];
            for (ordinal, &pos) in visual.iter().enumerate() {
                gather[pos] = ordinal as u32;
            }
            let gather = Tensor::from_vec(gather, n, &self.device)?;
            let mask: Vec<u8> = kinds.iter().map(|k| u8::from(*k != TokenKind::Text)).collect();
            let mask = Tensor::from_vec(mask, (n, 1), &self.device)?;
            let dtype = x.dtype();
            let spread = |t: &Tensor| -> Result<Tensor> {
                let t = t.to_dtype(dtype)?;
                let zero = Tensor::zeros((1, t.dim(1)?), t.dtype(), t.device())?;
                Tensor::cat(&[&t, &zero], 0)?.index_select(&gather, 0)
            };
            let merged = spread(&v.embeds)?;
            x = mask.broadcast_as(x.shape())?.where_cond(&merged, &x)?;
            deepstack = v.deepstack.iter().map(spread).collect::<Result<Vec<_>>>()?;
        } else if !visual.is_empty() {
            candle_core::bail!("the prompt has visual placeholders but no vision input");
        }
        let rope = self.text.rope([&positions.axes[0], &positions.axes[1], &positions.axes[2]])?;
        Ok(PrefillInput { x, rope, deepstack, len: n })
    }

    /// Feeds one generated token at absolute position `position` and returns the next logits.
    pub fn decode(&self, token: u32, position: i64, cache: &mut KvCache) -> Result<Tensor> {
        let x = self.text.embed(&[token])?;
        let p = [position];
        let rope = self.text.rope([&p, &p, &p])?;
        let h = self.text.forward(&x, &rope, cache, &[])?;
        self.text.logits(&h)
    }

    /// One decode step of several sequences in one forward: `tokens[i]` at `positions[i]` into
    /// `caches[i]`. Returns the next logits of each, f32 `(b, vocab)`. Same tokens as
    /// [`decode`](Self::decode) one at a time (each row attends to its own cache only).
    pub fn decode_batch(&self, tokens: &[u32], positions: &[i64], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        if tokens.len() != positions.len() || tokens.len() != caches.len() || tokens.is_empty() {
            candle_core::bail!("a batch needs one position and one cache per token");
        }
        let x = self.text.embed(tokens)?;
        let rope = self.text.rope([positions, positions, positions])?;
        let h = self.text.forward_batch(&x, &rope, caches)?;
        self.text.logits_batch(&h)
    }
}

/// A prompt ready to prefill ([`Qwen3VL::prefill_input`]).
#[derive(Debug)]
pub struct PrefillInput {
    x: Tensor,
    rope: Rope,
    deepstack: Vec<Tensor>,
    len: usize,
}

impl PrefillInput {
    /// Positions in the prompt.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: an empty prompt is refused.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}
