//! Small numerical building blocks, each computed in the precision the reference uses.

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use std::sync::Arc;

use crate::gemm::{Packed, PackedMatmul};

/// A linear layer `x W^T (+ b)` with weights in the model dtype.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    /// The weight as loaded, kept where something reads it: candle's matmul (no packed copy)
    /// or the few-row kernel (f32 packing); dropped where the packed copy serves every row.
    weight: Option<Tensor>,
    /// The weight packed for the CPU GEMM (f32 on a CPU with AVX2 or AVX-512, or bf16, see
    /// [`crate::gemm`]): rows beyond the few-row kernel's go through it, and every row of a
    /// linear without `few_rows` or with bf16 weights.
    packed: Option<Arc<Packed>>,
    bias: Option<Tensor>,
    /// A few input rows go through the few-row kernel (the text decoder's batched decode
    /// steps). Off for the vision tower, whose pairs must encode bit for bit alike whatever
    /// else is in the batch.
    few_rows: bool,
}

impl Linear {
    pub(crate) fn load(vb: VarBuilder<'_>, inp: usize, out: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out, inp), "weight")?;
        let bias = if bias { Some(vb.get(out, "bias")?) } else { None };
        Self::build(weight, bias, false)
    }

    /// A linear of the text decoder: a few input rows (a batched decode step) take the few-row
    /// kernel (see [`crate::fastmath::skinny_matmul`]) unless the weights are packed in bf16.
    pub(crate) fn load_few_rows(vb: VarBuilder<'_>, inp: usize, out: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out, inp), "weight")?;
        let bias = if bias { Some(vb.get(out, "bias")?) } else { None };
        Self::build(weight, bias, true)
    }

    /// A linear of `weight` (`out x in`) and `bias`, packed for the CPU GEMM where it applies.
    pub(crate) fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Self::build(weight, bias, false)
    }

    fn build(weight: Tensor, bias: Option<Tensor>, few_rows: bool) -> Result<Self> {
        let packed = Packed::from_tensor(&weight)?;
        let keep = packed.as_ref().is_none_or(|p| few_rows && !p.is_bf16());
        Ok(Linear { weight: keep.then_some(weight), packed, bias, few_rows })
    }

    /// A linear sharing `weight` (the LM head, tied to the embeddings or not), not packed: it
    /// only ever sees a few rows (the last prompt position, one row per decoding sequence).
    pub(crate) fn from_weight(weight: Tensor) -> Self {
        Linear { weight: Some(weight), packed: None, bias: None, few_rows: true }
    }

    /// `x W^T`: a few rows (a batched decode step) by the few-row kernel on the CPU, more by the
    /// packed GEMM, elsewhere candle's matmul. Where both CPU kernels serve, the few-row one
    /// takes up to [`crate::fastmath::SKINNY_OVER_PACKED`] rows: a decode row's logits then
    /// depend on how many rows share its step, within f32 rounding (the two kernels sum in
    /// different orders).
    fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.dims().first().copied().unwrap_or(0);
        let few = if self.packed.is_some() { crate::fastmath::SKINNY_OVER_PACKED } else { usize::MAX };
        if self.few_rows
            && rows <= few
            && let Some(w) = &self.weight
            && let Some(y) = crate::fastmath::skinny_matmul(x, w)?
        {
            return Ok(y);
        }
        if let Some(packed) = &self.packed
            && x.device().is_cpu()
            && x.dtype() == DType::F32
        {
            return x.contiguous()?.apply_op1_no_bwd(&PackedMatmul(packed.clone()));
        }
        match &self.weight {
            Some(w) => x.matmul(&w.t()?),
            None => candle_core::bail!(
                "a linear packed for the CPU got a {:?} input on {:?}",
                x.dtype(),
                x.device().location()
            ),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match x.dims() {
            [b, n, k] => self.matmul(&x.reshape((b * n, *k))?)?.reshape((*b, *n, ()))?,
            _ => self.matmul(x)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// LayerNorm as torch computes it for any input dtype: statistics, normalization and the affine
/// part in f32, one cast back at the end.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub(crate) fn load(vb: VarBuilder<'_>, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.get(dim, "weight")?.to_dtype(DType::F32)?,
            bias: vb.get(dim, "bias")?.to_dtype(DType::F32)?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        y.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?.to_dtype(dtype)
    }
}

/// Qwen3 RMSNorm: `x * rsqrt(mean(x^2) + eps)` in f32, cast back to the input dtype, then times
/// the weight (in the input dtype).
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub(crate) fn load(vb: VarBuilder<'_>, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm { weight: vb.get(dim, "weight")?, eps })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xf.broadcast_mul(&(var + self.eps)?.sqrt()?.recip()?)?.to_dtype(dtype)?;
        y.broadcast_mul(&self.weight)
    }
}

/// `[-x2, x1]` for `x = [x1, x2]` split in halves along the last dimension.
pub(crate) fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d - d / 2)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// `softmax(x)` along the last dimension computed in f32, cast back to `x`'s dtype (torch eager
/// attention: `softmax(..., dtype=float32).to(query.dtype)`).
pub(crate) fn softmax_f32(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    crate::fastmath::softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)
}
