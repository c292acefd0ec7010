//! The Qwen3-VL text decoder: interleaved MRoPE, q/k RMSNorm, GQA, causal prefill, DeepStack
//! injection, and a KV cache that grows as needed.

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::TextConfig;
use crate::ops::{Linear, RmsNorm, rotate_half, softmax_f32};

/// Keys and values of one sequence for every layer. Capacity grows geometrically; dropping the
/// cache frees it.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    cap: usize,
    /// Tokens to allocate room for at the first append (0: grow as needed).
    reserve: usize,
}

impl KvCache {
    /// An empty cache for `layers` decoder layers.
    pub fn new(layers: usize) -> Self {
        KvCache { layers: vec![None; layers], len: 0, cap: 0, reserve: 0 }
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Allocates room for `tokens` at once when the first tokens arrive, instead of growing by
    /// copies (a request knows its prompt and roughly how long it answers).
    pub fn reserve(&mut self, tokens: usize) {
        self.reserve = tokens;
    }

    /// Bytes the cache has allocated (keys and values of every layer, its whole capacity).
    pub fn bytes(&self) -> usize {
        self.layers.iter().flatten().map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()).sum()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets the tokens after the first `len` (their room is kept and written over next): a
    /// batched step that failed part way is undone with it.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Forgets every token (keeps no memory).
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
        self.cap = 0;
    }

    /// Appends `k`, `v` (`(1, kv_heads, n, head_dim)`) for `layer` and returns the layer's cached
    /// keys and values at their whole capacity, and how many positions they hold now. Every
    /// layer appends the same `n` per step; the length advances when the last layer has appended.
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor, last_layer: bool) -> Result<(Tensor, Tensor, usize)> {
        let n = k.dim(2)?;
        let need = self.len + n;
        if need > self.cap {
            let cap = if self.cap == 0 && self.reserve >= need {
                self.reserve
            } else {
                need.max(self.cap * 2).max(256).next_multiple_of(256)
            };
            for slot in self.layers.iter_mut().flatten() {
                let (ok, ov) = slot;
                let grow = |t: &Tensor| -> Result<Tensor> {
                    let (b, h, _, d) = t.dims4()?;
                    let z = Tensor::zeros((b, h, cap, d), t.dtype(), t.device())?;
                    z.slice_set(&t.narrow(2, 0, self.len)?, 2, 0)?;
                    Ok(z)
                };
                *slot = (grow(ok)?, grow(ov)?);
            }
            self.cap = cap;
        }
        let slot = &mut self.layers[layer];
        if slot.is_none() {
            let (b, h, _, d) = k.dims4()?;
            *slot = Some((
                Tensor::zeros((b, h, self.cap, d), k.dtype(), k.device())?,
                Tensor::zeros((b, h, self.cap, d), v.dtype(), v.device())?,
            ));
        }
        let (ck, cv) = slot.as_ref().ok_or_else(|| candle_core::Error::Msg("kv slot".into()))?;
        ck.slice_set(&k.contiguous()?, 2, self.len)?;
        cv.slice_set(&v.contiguous()?, 2, self.len)?;
        let out = (ck.clone(), cv.clone(), need);
        if last_layer {
            self.len = need;
        }
        Ok(out)
    }
}

/// Interleaved MRoPE tables for a run of positions: `cos`/`sin` of `(n, head_dim)` in the model
/// dtype.
#[derive(Debug)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// The tables of rows `from..from + len` (a chunk of a prompt).
    pub fn narrow(&self, from: usize, len: usize) -> Result<Rope> {
        Ok(Rope { cos: self.cos.narrow(0, from, len)?, sin: self.sin.narrow(0, from, len)? })
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

struct Layer {
    attn: Attention,
    gate: Linear,
    up: Linear,
    down: Linear,
    input_norm: RmsNorm,
    post_norm: RmsNorm,
}

impl Layer {
    /// The MLP block with its residual: `h + down(silu(gate(n)) * up(n))`, `n` the
    /// post-attention norm of `h`.
    fn mlp(&self, h: Tensor) -> Result<Tensor> {
        let m = self.post_norm.forward(&h)?;
        let m = self.down.forward(&(crate::fastmath::silu(&self.gate.forward(&m)?)? * self.up.forward(&m)?)?)?;
        h + m
    }
}

/// The decoder stack with its embedding, final norm and head.
pub struct TextModel {
    embed: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    head: Linear,
    inv_freq: Vec<f32>,
    /// Frequency index -> axis (0 = T, 1 = H, 2 = W).
    axis_of: Vec<usize>,
    head_dim: usize,
    device: Device,
    dtype: DType,
    attention_budget: usize,
}

/// Bytes the attention scores of one layer may take at once (all heads, f32; the scaled and
/// the softmaxed copies live beside them, so about three times this at the peak). A longer
/// prompt is attended a block of query rows at a time: memory grows with its length, not its
/// square (a 30 s clip at the default budgets is some 17,000 tokens, whose full score matrix
/// alone would be 1.2 GB per head).
pub const ATTENTION_BUDGET: usize = 64 << 20;

/// Query rows per block so that `heads` score rows of `total` keys fit in `budget` bytes.
pub(crate) fn rows_per_block(heads: usize, total: usize, n: usize, budget: usize) -> usize {
    (budget / (heads * total * 4).max(1)).clamp(1, n.max(1))
}

impl std::fmt::Debug for TextModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextModel").field("layers", &self.layers.len()).finish_non_exhaustive()
    }
}

impl TextModel {
    /// Loads `model.language_model.*` (and the head from `lm_head` or the tied embedding).
    pub fn new(cfg: &TextConfig, tie: bool, vb: VarBuilder<'_>, head_vb: VarBuilder<'_>) -> Result<Self> {
        let h = cfg.hidden_size;
        let hd = cfg.head_dim();
        let eps = cfg.rms_norm_eps;
        let embed = vb.get((cfg.vocab_size, h), "embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = vb.pp(format!("layers.{i}"));
            let a = l.pp("self_attn");
            let bias = cfg.attention_bias;
            layers.push(Layer {
                attn: Attention {
                    q: Linear::load_few_rows(a.pp("q_proj"), h, cfg.num_attention_heads * hd, bias)?,
                    k: Linear::load_few_rows(a.pp("k_proj"), h, cfg.num_key_value_heads * hd, bias)?,
                    v: Linear::load_few_rows(a.pp("v_proj"), h, cfg.num_key_value_heads * hd, bias)?,
                    o: Linear::load_few_rows(a.pp("o_proj"), cfg.num_attention_heads * hd, h, bias)?,
                    q_norm: RmsNorm::load(a.pp("q_norm"), hd, eps)?,
                    k_norm: RmsNorm::load(a.pp("k_norm"), hd, eps)?,
                    heads: cfg.num_attention_heads,
                    kv_heads: cfg.num_key_value_heads,
                    head_dim: hd,
                },
                gate: Linear::load_few_rows(l.pp("mlp.gate_proj"), h, cfg.intermediate_size, false)?,
                up: Linear::load_few_rows(l.pp("mlp.up_proj"), h, cfg.intermediate_size, false)?,
                down: Linear::load_few_rows(l.pp("mlp.down_proj"), cfg.intermediate_size, h, false)?,
                input_norm: RmsNorm::load(l.pp("input_layernorm"), h, eps)?,
                post_norm: RmsNorm::load(l.pp("post_attention_layernorm"), h, eps)?,
            });
        }
        let norm = RmsNorm::load(vb.pp("norm"), h, eps)?;
        let head = if tie {
            Linear::from_weight(embed.clone())
        } else {
            Linear::from_weight(head_vb.get((cfg.vocab_size, h), "weight")?)
        };
        let theta = cfg.rope_theta() as f32;
        let inv_freq: Vec<f32> = (0..hd).step_by(2).map(|j| 1.0 / theta.powf(j as f32 / hd as f32)).collect();
        let sec = cfg.mrope_section();
        let axis_of = (0..hd / 2)
            .map(|j| match j % 3 {
                1 if j < 3 * sec[1] => 1,
                2 if j < 3 * sec[2] => 2,
                _ => 0,
            })
            .collect();
        Ok(TextModel {
            embed,
            layers,
            norm,
            head,
            inv_freq,
            axis_of,
            head_dim: hd,
            device: vb.device().clone(),
            dtype: vb.dtype(),
            attention_budget: ATTENTION_BUDGET,
        })
    }

    /// Sets the bytes one layer's attention scores may take at once (see [`ATTENTION_BUDGET`]).
    pub fn set_attention_budget(&mut self, bytes: usize) {
        self.attention_budget = bytes.max(1);
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Token embeddings `(n, hidden)`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let ids = Tensor::from_slice(ids, ids.len(), &self.device)?;
        self.embed.index_select(&ids, 0)
    }

    /// MRoPE tables for positions `pos[axis][i]` (T, H, W).
    pub fn rope(&self, pos: [&[i64]; 3]) -> Result<Rope> {
        let n = pos[0].len();
        let half = self.head_dim / 2;
        let mut cos = Vec::with_capacity(n * self.head_dim);
        let mut sin = Vec::with_capacity(n * self.head_dim);
        let mut angles = vec![0f32; half];
        for ((t, h), w) in pos[0].iter().zip(pos[1]).zip(pos[2]) {
            let p = [*t, *h, *w];
            for ((a, &axis), f) in angles.iter_mut().zip(&self.axis_of).zip(&self.inv_freq) {
                *a = p[axis] as f32 * f;
            }
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (n, self.head_dim), &self.device)?.to_dtype(self.dtype)?,
            sin: Tensor::from_vec(sin, (n, self.head_dim), &self.device)?.to_dtype(self.dtype)?,
        })
    }

    /// Runs the stack over `x` (`(n, hidden)` embeddings) appended to `cache`, adding
    /// `deepstack[k]` (a full `(n, hidden)` tensor, zero off the visual rows) after layer `k`.
    /// Returns the final-normed hidden state of the last position, `(1, hidden)`.
    ///
    /// Only that position's output is wanted, so the last layer computes the keys and values
    /// of every position (the cache holds them) and the rest for the last position alone: a
    /// prompt's prefill skips most of one layer's work (an eighth of the small bench model's).
    pub fn forward(&self, x: &Tensor, rope: &Rope, cache: &mut KvCache, deepstack: &[Tensor]) -> Result<Tensor> {
        let n = x.dim(0)?;
        let budget = self.attention_budget;
        let last = self.layers.len() - 1;
        let h =
            self.stack(x, deepstack, last, |attn, x, layer, _| attn.forward(x, rope, cache, layer, false, budget))?;
        let layer = &self.layers[last];
        let a = layer.attn.forward_last(&layer.input_norm.forward(&h)?, rope, cache, last, budget)?;
        let h = (h.i((.., n - 1..n))? + a)?;
        let mut h = layer.mlp(h)?;
        if let Some(ds) = deepstack.get(last) {
            h = h.broadcast_add(&ds.i(n - 1..n)?.to_dtype(h.dtype())?.unsqueeze(0)?)?;
        }
        self.norm.forward(&h.squeeze(0)?)
    }

    /// One decode step of several sequences at once: `x` holds one new token's embedding per
    /// sequence (`(b, hidden)`), `rope` its position's tables, `caches[i]` row i's keys and
    /// values. The linears and the MLP run on all rows together; each row attends to its own
    /// cache. Returns the final-normed hidden states `(b, hidden)`.
    pub fn forward_batch(&self, x: &Tensor, rope: &Rope, caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let b = x.dim(0)?;
        if caches.len() != b {
            candle_core::bail!("{b} rows but {} caches", caches.len());
        }
        let layers = self.layers.len();
        let h = self.stack(x, &[], layers, |attn, x, layer, last| attn.forward_batch(x, rope, caches, layer, last))?;
        self.norm.forward(&h.squeeze(0)?)
    }

    /// The first `layers` decoder layers over `x` (`(n, hidden)`), attention by `attend` (told
    /// whether its layer is the model's last); returns `(1, n, hidden)`.
    fn stack(
        &self,
        x: &Tensor,
        deepstack: &[Tensor],
        layers: usize,
        mut attend: impl FnMut(&Attention, &Tensor, usize, bool) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut h = x.unsqueeze(0)?;
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate().take(layers) {
            let a = attend(&layer.attn, &layer.input_norm.forward(&h)?, i, i == last)?;
            h = layer.mlp((h + a)?)?;
            if let Some(ds) = deepstack.get(i) {
                h = h.broadcast_add(&ds.to_dtype(h.dtype())?.unsqueeze(0)?)?;
            }
        }
        Ok(h)
    }

    /// Logits `(vocab,)` in f32 for a final hidden state `(1, hidden)`.
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        self.head.forward(h)?.squeeze(0)?.to_dtype(DType::F32)
    }

    /// Logits `(b, vocab)` in f32 for final hidden states `(b, hidden)`.
    pub fn logits_batch(&self, h: &Tensor) -> Result<Tensor> {
        self.head.forward(h)?.to_dtype(DType::F32)
    }
}

/// Additive causal mask of query rows `from..from + rows` of a block whose keys are the `past`
/// cached positions and its own (`total` in all), in f32: 0 where visible, -inf after the row.
fn causal_mask(from: usize, rows: usize, past: usize, total: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (from..from + rows)
        .flat_map(|i| (0..total).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (rows, total), device)
}

impl Attention {
    /// Queries, keys and values of `x` (`(b, n, hidden)`) with their rotary positions applied:
    /// `(b, heads, n, head_dim)` and twice `(b, kv_heads, n, head_dim)`. `cos`, `sin` broadcast
    /// against them: `(1, 1, n, hd)` for one sequence of `n` positions, `(b, 1, 1, hd)` for `b`
    /// sequences of one position each.
    fn project(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (k, v) = self.keys_values(x, cos, sin)?;
        Ok((self.queries(x, cos, sin)?, k, v))
    }

    /// The queries of [`Attention::project`].
    fn queries(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let q =
            self.q_norm.forward(&self.q.forward(x)?.reshape((b, n, self.heads, self.head_dim))?)?.transpose(1, 2)?;
        q.broadcast_mul(cos)? + rotate_half(&q)?.broadcast_mul(sin)?
    }

    /// The keys and values of [`Attention::project`].
    fn keys_values(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, n, _) = x.dims3()?;
        let hd = self.head_dim;
        let k = self.k_norm.forward(&self.k.forward(x)?.reshape((b, n, self.kv_heads, hd))?)?.transpose(1, 2)?;
        let v = self.v.forward(x)?.reshape((b, n, self.kv_heads, hd))?.transpose(1, 2)?;
        Ok(((k.broadcast_mul(cos)? + rotate_half(&k)?.broadcast_mul(sin)?)?, v))
    }

    /// As [`Attention::forward`] in the model's last layer, for the last of `x`'s positions
    /// only (`(1, 1, hidden)`); every position's keys and values are cached.
    fn forward_last(
        &self,
        x: &Tensor,
        rope: &Rope,
        cache: &mut KvCache,
        layer: usize,
        budget: usize,
    ) -> Result<Tensor> {
        let n = x.dim(1)?;
        let (cos, sin) = (rope.cos.unsqueeze(0)?.unsqueeze(0)?, rope.sin.unsqueeze(0)?.unsqueeze(0)?);
        let (k, v) = self.keys_values(x, &cos, &sin)?;
        let q = self.queries(&x.narrow(1, n - 1, 1)?, &cos.narrow(2, n - 1, 1)?, &sin.narrow(2, n - 1, 1)?)?;
        let o = self.attend(&q, &k, &v, cache, layer, true, budget)?;
        self.o.forward(&o.transpose(1, 2)?.reshape((1, 1, self.heads * self.head_dim))?)
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        cache: &mut KvCache,
        layer: usize,
        last_layer: bool,
        budget: usize,
    ) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let (q, k, v) =
            self.project(x, &rope.cos.unsqueeze(0)?.unsqueeze(0)?, &rope.sin.unsqueeze(0)?.unsqueeze(0)?)?;
        let o = self.attend(&q, &k, &v, cache, layer, last_layer, budget)?;
        let o = o.transpose(1, 2)?.reshape((b, n, self.heads * self.head_dim))?;
        self.o.forward(&o)
    }

    /// Row i of `x` (`(1, b, hidden)`) is the next token of the sequence cached in `caches[i]`.
    /// The projections come out as `b` sequences of one position each (`(b, heads, 1, hd)`,
    /// contiguous: a row is a narrow of the first dimension, nothing is copied), every row is
    /// appended to its own cache, and the rows attend to their caches in one pass.
    fn forward_batch(
        &self,
        x: &Tensor,
        rope: &Rope,
        caches: &mut [&mut KvCache],
        layer: usize,
        last_layer: bool,
    ) -> Result<Tensor> {
        let (_, b, _) = x.dims3()?;
        let x = x.reshape((b, 1, ()))?;
        let (q, k, v) = self.project(&x, &rope.cos.reshape((b, 1, 1, ()))?, &rope.sin.reshape((b, 1, 1, ()))?)?;
        let mut held = Vec::with_capacity(b);
        for (i, cache) in caches.iter_mut().enumerate() {
            held.push(cache.append(layer, &k.narrow(0, i, 1)?, &v.narrow(0, i, 1)?, last_layer)?);
        }
        let scale = (self.head_dim as f64).powf(-0.5);
        let refs: Vec<_> = held.iter().map(|(k, v, len)| (k, v, *len)).collect();
        let o = match crate::fastmath::decode_attention(&q, &refs, scale)? {
            Some(o) => o,
            None => {
                let rows = held
                    .iter()
                    .enumerate()
                    .map(|(i, (k, v, total))| self.attend_cached(&q.narrow(0, i, 1)?, k, v, *total, usize::MAX))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0)?
            }
        };
        self.o.forward(&o.reshape((1, b, self.heads * self.head_dim))?)
    }

    /// Appends `k`, `v` to `cache` and attends `q` (`(1, heads, n, head_dim)`, the last `n`
    /// positions) to everything cached, causally. Returns `(1, heads, n, head_dim)`.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &mut KvCache,
        layer: usize,
        last_layer: bool,
        budget: usize,
    ) -> Result<Tensor> {
        let (k, v, total) = cache.append(layer, k, v, last_layer)?;
        self.attend_cached(q, &k, &v, total, budget)
    }

    /// Attends `q` (`(b, heads, n, head_dim)`, the last `n` of `total` positions) to the first
    /// `total` positions of a cache's keys and values (`(b, kv_heads, capacity, head_dim)`),
    /// causally. Returns `(b, heads, n, head_dim)`.
    fn attend_cached(&self, q: &Tensor, k: &Tensor, v: &Tensor, total: usize, budget: usize) -> Result<Tensor> {
        let (b, _, n, hd) = q.dims4()?;
        let scale = (hd as f64).powf(-0.5);
        // One new position: attended in place over the cache, nothing copied.
        if n == 1
            && let Some(o) = crate::fastmath::decode_attention(q, &[(k, v, total)], scale)?
        {
            return Ok(o);
        }
        let (k, v) = (k.narrow(2, 0, total)?, v.narrow(2, 0, total)?);
        let past = total - n;
        // GQA without copying K/V: fold the query heads that share a KV head into the rows.
        let rep = self.heads / self.kv_heads;
        // On the CPU: fused, a block of query rows at a time (crate::gemm).
        let groups = b * self.kv_heads;
        let fold = |t: &Tensor, rows: usize| t.contiguous()?.reshape((groups, rows, hd));
        if let Some(o) =
            crate::gemm::causal_attention(&fold(q, rep * n)?, &fold(&k, total)?, &fold(&v, total)?, scale, past, n)?
        {
            return o.reshape((b, self.heads, n, hd));
        }
        let kt = k.contiguous()?.t()?;
        let v = v.contiguous()?;
        // A long prompt is attended a block of query rows at a time (each row's softmax is its own).
        let block = rows_per_block(self.heads, total, n, budget);
        let mut outs = Vec::with_capacity(n.div_ceil(block));
        for from in (0..n).step_by(block) {
            let rows = block.min(n - from);
            let qb = if rows == n { q.clone() } else { q.narrow(2, from, rows)? };
            let qb = qb.contiguous()?.reshape((b, self.kv_heads, rep * rows, hd))?;
            let att = (qb.matmul(&kt)? * scale)?.reshape((b, self.heads, rows, total))?;
            let att = if n > 1 {
                att.broadcast_add(&causal_mask(from, rows, past, total, q.device())?.to_dtype(att.dtype())?)?
            } else {
                att
            };
            let att = softmax_f32(&att)?.reshape((b, self.kv_heads, rep * rows, total))?;
            outs.push(att.matmul(&v)?.reshape((b, self.heads, rows, hd))?);
        }
        if outs.len() == 1 { Ok(outs.remove(0)) } else { Tensor::cat(&outs, 2) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_shape() {
        let m = causal_mask(0, 2, 3, 5, &Device::Cpu).unwrap();
        let v: Vec<Vec<f32>> = m.to_vec2().unwrap();
        assert_eq!(v[0], vec![0.0, 0.0, 0.0, 0.0, f32::NEG_INFINITY]);
        assert_eq!(v[1], vec![0.0; 5]);
        // The second row alone, as a block of its own.
        let m = causal_mask(1, 1, 3, 5, &Device::Cpu).unwrap();
        assert_eq!(m.to_vec2::<f32>().unwrap(), [v[1].clone()]);
    }

    #[test]
    fn blocks_fit_the_budget() {
        assert_eq!(rows_per_block(16, 1000, 10, 1 << 30), 10, "a short prompt is one block");
        assert_eq!(rows_per_block(16, 17_000, 17_000, 64 << 20), 61);
        assert_eq!(rows_per_block(16, 1 << 30, 5, 1), 1, "at least one row");
    }
}
