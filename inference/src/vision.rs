//! The Qwen3-VL vision tower: patch embedding, interpolated learned positions, 2-D rotary
//! attention within each frame pair, patch mergers and DeepStack taps.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::VisionConfig;
use crate::ops::{LayerNorm, Linear, rotate_half, softmax_f32};

const LN_EPS: f64 = 1e-6;
const ROPE_THETA: f32 = 10_000.0;

/// What the tower returns for a batch of images/videos.
#[derive(Debug, Clone)]
pub struct VisionOutput {
    /// Merged tokens, `(rows / 4, out_hidden)`, in placeholder order.
    pub embeds: Tensor,
    /// One `(rows / 4, out_hidden)` tensor per DeepStack tap.
    pub deepstack: Vec<Tensor>,
}

struct Block {
    norm1: LayerNorm,
    norm2: LayerNorm,
    qkv: Linear,
    proj: Linear,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    exact_gelu: bool,
}

struct Merger {
    norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    postshuffle: bool,
    width: usize,
}

impl Merger {
    fn load(vb: VarBuilder<'_>, cfg: &VisionConfig, postshuffle: bool) -> Result<Self> {
        let width = cfg.hidden_size * cfg.spatial_merge_size * cfg.spatial_merge_size;
        let norm_dim = if postshuffle { width } else { cfg.hidden_size };
        Ok(Merger {
            norm: LayerNorm::load(vb.pp("norm"), norm_dim, LN_EPS)?,
            fc1: Linear::load(vb.pp("linear_fc1"), width, width, true)?,
            fc2: Linear::load(vb.pp("linear_fc2"), width, cfg.out_hidden_size, true)?,
            postshuffle,
            width,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.postshuffle {
            self.norm.forward(&x.reshape(((), self.width))?)?
        } else {
            self.norm.forward(x)?.reshape(((), self.width))?
        };
        // nn.GELU(): the exact erf form, unlike the blocks' tanh approximation.
        self.fc2.forward(&self.fc1.forward(&x)?.gelu_erf()?)
    }
}

/// Rotary tables for one batch: `cos`/`sin` of shape `(rows, head_dim)` in f32.
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Block {
    fn load(vb: VarBuilder<'_>, cfg: &VisionConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Block {
            norm1: LayerNorm::load(vb.pp("norm1"), d, LN_EPS)?,
            norm2: LayerNorm::load(vb.pp("norm2"), d, LN_EPS)?,
            qkv: Linear::load(vb.pp("attn.qkv"), d, 3 * d, true)?,
            proj: Linear::load(vb.pp("attn.proj"), d, d, true)?,
            fc1: Linear::load(vb.pp("mlp.linear_fc1"), d, cfg.intermediate_size, true)?,
            fc2: Linear::load(vb.pp("mlp.linear_fc2"), cfg.intermediate_size, d, true)?,
            heads: cfg.num_heads,
            exact_gelu: cfg.hidden_act == "gelu",
        })
    }

    fn forward(&self, x: &Tensor, rotary: &Rotary, segments: &[(usize, usize)], budget: usize) -> Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let x = (x + self.attention(&h, rotary, segments, budget)?)?;
        let h = self.fc1.forward(&self.norm2.forward(&x)?)?;
        let h = if self.exact_gelu { h.gelu_erf()? } else { crate::fastmath::gelu_tanh(&h)? };
        x + self.fc2.forward(&h)?
    }

    /// Full attention within each segment (one image or one frame pair); `segments` lists
    /// `(count, length)` runs of equal-length segments, so each run is batched matmuls of as
    /// many segments as `budget` bytes of scores hold (at least one).
    fn attention(&self, x: &Tensor, rotary: &Rotary, segments: &[(usize, usize)], budget: usize) -> Result<Tensor> {
        let (n, d) = x.dims2()?;
        let hd = d / self.heads;
        let dtype = x.dtype();
        let qkv = self.qkv.forward(x)?.reshape((n, 3, self.heads, hd))?;
        let q = qkv.narrow(1, 0, 1)?.squeeze(1)?;
        let k = qkv.narrow(1, 1, 1)?.squeeze(1)?;
        let v = qkv.narrow(1, 2, 1)?.squeeze(1)?;
        // RoPE in f32, then back to the model dtype.
        let cos = rotary.cos.unsqueeze(1)?;
        let sin = rotary.sin.unsqueeze(1)?;
        let rope = |t: &Tensor| -> Result<Tensor> {
            let t = t.to_dtype(DType::F32)?;
            (t.broadcast_mul(&cos)? + rotate_half(&t)?.broadcast_mul(&sin)?)?.to_dtype(dtype)
        };
        let q = rope(&q)?;
        let k = rope(&k)?;
        let scale = (hd as f64).powf(-0.5);
        let mut outs = Vec::with_capacity(segments.len());
        let mut start = 0;
        for &(count_all, len) in segments {
            let per_segment = self.heads * len * len * 4;
            let batch = (budget / per_segment.max(1)).clamp(1, count_all.max(1));
            let mut left = count_all;
            while left > 0 {
                let count = batch.min(left);
                let rows = count * len;
                let shape = (count, len, self.heads, hd);
                let qs = q.narrow(0, start, rows)?.reshape(shape)?.transpose(1, 2)?.contiguous()?;
                let ks = k.narrow(0, start, rows)?.reshape(shape)?.transpose(1, 2)?.contiguous()?;
                let vs = v.narrow(0, start, rows)?.reshape(shape)?.transpose(1, 2)?.contiguous()?;
                let o = match crate::gemm::attention(&qs, &ks, &vs, scale)? {
                    Some(o) => o,
                    None => softmax_f32(&(qs.matmul(&ks.t()?)? * scale)?)?.matmul(&vs)?,
                };
                let o = o.transpose(1, 2)?.reshape((rows, d))?;
                outs.push(o);
                start += rows;
                left -= count;
            }
        }
        let o = Tensor::cat(&outs, 0)?;
        self.proj.forward(&o)
    }
}

/// The vision tower.
pub struct VisionModel {
    /// The patch embedding (a 3-D convolution whose stride is its kernel: a linear on the
    /// flattened patch).
    patch: Linear,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    merger: Merger,
    deepstack: Vec<(usize, Merger)>,
    cfg: VisionConfig,
    inv_freq: Vec<f32>,
    device: Device,
    dtype: DType,
    attention_budget: usize,
}

impl std::fmt::Debug for VisionModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VisionModel").field("depth", &self.blocks.len()).finish_non_exhaustive()
    }
}

impl VisionModel {
    /// Loads `model.visual.*`.
    pub fn new(cfg: &VisionConfig, vb: VarBuilder<'_>) -> Result<Self> {
        let d = cfg.hidden_size;
        let patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size * cfg.patch_size;
        let patch_w = vb
            .get(
                (d, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size),
                "patch_embed.proj.weight",
            )?
            .reshape((d, patch_dim))?;
        let patch = Linear::new(patch_w, Some(vb.get(d, "patch_embed.proj.bias")?))?;
        let pos_embed = vb.get((cfg.num_position_embeddings, d), "pos_embed.weight")?;
        let blocks =
            (0..cfg.depth).map(|i| Block::load(vb.pp(format!("blocks.{i}")), cfg)).collect::<Result<Vec<_>>>()?;
        let merger = Merger::load(vb.pp("merger"), cfg, false)?;
        let deepstack = cfg
            .deepstack_visual_indexes
            .iter()
            .enumerate()
            .map(|(k, &layer)| Ok((layer, Merger::load(vb.pp(format!("deepstack_merger_list.{k}")), cfg, true)?)))
            .collect::<Result<Vec<_>>>()?;
        // Axial RoPE: head_dim / 2 rotary dims per axis pair, inv_freq over even steps.
        let spatial = cfg.head_dim() / 2;
        let inv_freq = (0..spatial).step_by(2).map(|j| 1.0 / ROPE_THETA.powf(j as f32 / spatial as f32)).collect();
        Ok(VisionModel {
            patch,
            pos_embed,
            blocks,
            merger,
            deepstack,
            cfg: cfg.clone(),
            inv_freq,
            device: vb.device().clone(),
            dtype: vb.dtype(),
            attention_budget: crate::text::ATTENTION_BUDGET,
        })
    }

    /// Sets the bytes one block's attention scores may take at once (frame pairs are batched up
    /// to it; see [`crate::text::ATTENTION_BUDGET`]).
    pub fn set_attention_budget(&mut self, bytes: usize) {
        self.attention_budget = bytes.max(1);
    }

    /// Block-major (row, col) patch coordinates of one `h x w` grid (2x2 merge units contiguous).
    fn block_coords(h: usize, w: usize, m: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::with_capacity(h * w);
        for bh in 0..h / m {
            for bw in 0..w / m {
                for ih in 0..m {
                    for iw in 0..m {
                        out.push((bh * m + ih, bw * m + iw));
                    }
                }
            }
        }
        out
    }

    /// Bilinear (align_corners) resampling of the learned position table to each grid, with
    /// transformers 5.24's arithmetic: f32 source coordinates and weights, products and sums in
    /// f32, cast to the model dtype at the end.
    fn position_embeddings(&self, grids: &[[usize; 3]]) -> Result<Tensor> {
        let side = (self.cfg.num_position_embeddings as f64).sqrt() as usize;
        let m = self.cfg.spatial_merge_size;
        let table = self.pos_embed.to_dtype(DType::F32)?;
        let mut idx = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        let mut wts = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        let taps = |i: usize, size: usize| -> [(usize, f32); 2] {
            let src = (i as f32) * ((side - 1) as f32) / ((size.max(2) - 1) as f32);
            let f = src.floor();
            let d0 = (1.0 - (src - f).abs()).max(0.0);
            let d1 = (1.0 - (src - f - 1.0).abs()).max(0.0);
            let f0 = (f as usize).min(side - 1);
            let f1 = (f as usize + 1).min(side - 1);
            [(f0, d0), (f1, d1)]
        };
        for &[t, h, w] in grids {
            let coords = Self::block_coords(h, w, m);
            for _ in 0..t {
                for &(r, c) in &coords {
                    let hr = taps(r, h);
                    let wc = taps(c, w);
                    let mut k = 0;
                    for (hi, hw) in hr {
                        for (wi, ww) in wc {
                            idx[k].push((hi * side + wi) as u32);
                            wts[k].push(hw * ww);
                            k += 1;
                        }
                    }
                }
            }
        }
        let n = idx[0].len();
        let mut acc: Option<Tensor> = None;
        for k in 0..4 {
            let i = Tensor::from_vec(std::mem::take(&mut idx[k]), n, &self.device)?;
            let w = Tensor::from_vec(std::mem::take(&mut wts[k]), (n, 1), &self.device)?;
            let term = table.index_select(&i, 0)?.broadcast_mul(&w)?;
            acc = Some(match acc {
                Some(a) => (a + term)?,
                None => term,
            });
        }
        acc.ok_or_else(|| candle_core::Error::Msg("empty grid".into()))?.to_dtype(self.dtype)
    }

    fn rotary(&self, grids: &[[usize; 3]]) -> Result<Rotary> {
        let m = self.cfg.spatial_merge_size;
        let nf = self.inv_freq.len();
        let hd = self.cfg.head_dim();
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        for &[t, h, w] in grids {
            let coords = Self::block_coords(h, w, m);
            let mut one_frame_cos = Vec::with_capacity(coords.len() * hd);
            let mut one_frame_sin = Vec::with_capacity(coords.len() * hd);
            for &(r, c) in &coords {
                let mut row = Vec::with_capacity(2 * nf);
                row.extend(self.inv_freq.iter().map(|f| r as f32 * f));
                row.extend(self.inv_freq.iter().map(|f| c as f32 * f));
                for _ in 0..2 {
                    one_frame_cos.extend(row.iter().map(|a| a.cos()));
                    one_frame_sin.extend(row.iter().map(|a| a.sin()));
                }
            }
            for _ in 0..t {
                cos.extend_from_slice(&one_frame_cos);
                sin.extend_from_slice(&one_frame_sin);
            }
        }
        let n = cos.len() / hd;
        Ok(Rotary {
            cos: Tensor::from_vec(cos, (n, hd), &self.device)?,
            sin: Tensor::from_vec(sin, (n, hd), &self.device)?,
        })
    }

    /// Encodes patch rows (`rows x 1536`, f32 from the sampler) of the given grids.
    pub fn forward(&self, pixel_values: &Tensor, grids: &[[usize; 3]]) -> Result<VisionOutput> {
        let rows: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
        if pixel_values.dims2()?.0 != rows {
            candle_core::bail!("pixel_values has {} rows but the grids need {rows}", pixel_values.dims2()?.0);
        }
        let x = self.patch.forward(&pixel_values.to_dtype(self.dtype)?)?;
        let mut x = (x + self.position_embeddings(grids)?)?;
        let rotary = self.rotary(grids)?;
        let segments: Vec<(usize, usize)> = grids.iter().map(|g| (g[0], g[1] * g[2])).collect();
        let mut deepstack = Vec::with_capacity(self.deepstack.len());
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x, &rotary, &segments, self.attention_budget)?;
            for (layer, merger) in &self.deepstack {
                if *layer == i {
                    deepstack.push(merger.forward(&x)?);
                }
            }
        }
        let embeds = self.merger.forward(&x)?;
        Ok(VisionOutput { embeds, deepstack })
    }
}
