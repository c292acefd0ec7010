//! Vectorized CPU kernels for the element-wise hot spots (GELU-tanh, SiLU, softmax).
//!
//! candle's CPU ops call libm's `expf`/`tanhf` one element at a time; these kernels use a
//! polynomial `exp` (relative error about 1e-7, below f32 rounding of the results that matter)
//! that the compiler vectorizes, compiled for AVX2/FMA and AVX-512 and picked at run time. Other
//! devices and dtypes keep candle's own ops.

#![allow(clippy::excessive_precision)] // polynomial coefficients as published

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// exp(x) for f32, vectorizable: 2^(x log2 e) split into 2^n (exponent bits) and a degree-7
/// polynomial for 2^f, |f| <= 0.5.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to the nearest integer
    let x = x.clamp(-87.0, 88.0);
    let y = x * std::f32::consts::LOG2_E;
    let n = (y + MAGIC) - MAGIC;
    let f = y - n;
    let p = 1.525_273_4e-5_f32;
    let p = p * f + 1.540_353_1e-4;
    let p = p * f + 1.333_355_8e-3;
    let p = p * f + 9.618_129e-3;
    let p = p * f + 5.550_410_9e-2;
    let p = p * f + 2.402_265e-1;
    let p = p * f + 6.931_472e-1;
    let p = p * f + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
fn gelu_tanh_slice(xs: &[f32], out: &mut [f32]) {
    // gelu_tanh(x) = 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
    const K: f32 = 1.595_769_1; // 2 * sqrt(2 / pi)
    for (o, &x) in out.iter_mut().zip(xs) {
        let u = K * (x + 0.044_715 * x * x * x);
        *o = x / (1.0 + exp(-u));
    }
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
fn silu_slice(xs: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = x / (1.0 + exp(-x));
    }
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
fn softmax_rows(xs: &[f32], out: &mut [f32], dim: usize) {
    for (row, o) in xs.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0f32;
        for (d, &v) in o.iter_mut().zip(row) {
            let e = if v == f32::NEG_INFINITY { 0.0 } else { exp(v - max) };
            *d = e;
            sum += e;
        }
        let inv = 1.0 / sum;
        o.iter_mut().for_each(|v| *v *= inv);
    }
}

#[derive(Clone, Copy)]
enum Kind {
    GeluTanh,
    Silu,
    Softmax,
}

struct Op(Kind);

/// Elements per parallel task.
const CHUNK: usize = 1 << 15;

impl CustomOp1 for Op {
    fn name(&self) -> &'static str {
        match self.0 {
            Kind::GeluTanh => "fast-gelu-tanh",
            Kind::Silu => "fast-silu",
            Kind::Softmax => "fast-softmax",
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{} needs a contiguous input", self.name())))?;
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("{} needs f32", self.name());
        };
        use rayon::prelude::*;
        let xs = &data[start..end];
        let mut out = vec![0f32; xs.len()];
        let dim = (*layout.dims().last().unwrap_or(&1)).max(1);
        // Chunks of whole rows, big enough to amortize the hand-off to the thread pool.
        let chunk = (CHUNK / dim).max(1) * dim;
        let kind = self.0;
        out.par_chunks_mut(chunk).zip(xs.par_chunks(chunk)).for_each(|(o, x)| match kind {
            Kind::GeluTanh => gelu_tanh_slice(x, o),
            Kind::Silu => silu_slice(x, o),
            Kind::Softmax => softmax_rows(x, o, dim),
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

fn fast(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// GELU with the tanh approximation (`gelu_pytorch_tanh`).
pub(crate) fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if fast(x) { x.contiguous()?.apply_op1_no_bwd(&Op(Kind::GeluTanh)) } else { x.gelu() }
}

/// SiLU (`x * sigmoid(x)`).
pub(crate) fn silu(x: &Tensor) -> Result<Tensor> {
    if fast(x) { x.contiguous()?.apply_op1_no_bwd(&Op(Kind::Silu)) } else { x.silu() }
}

/// Softmax over the last dimension.
pub(crate) fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fast(x) { x.contiguous()?.apply_op1_no_bwd(&Op(Kind::Softmax)) } else { candle_nn::ops::softmax_last_dim(x) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f32;
        for i in -8000..8000 {
            let x = i as f32 / 100.0;
            let rel = ((exp(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
        }
        // f32 range reduction (x * log2 e) limits accuracy at large |x|; libm carries extra bits.
        assert!(worst < 1e-5, "{worst}");
        assert_eq!(exp(-1000.0), exp(-87.0), "inputs are clamped");
    }

    #[test]
    fn kernels_match_candle() {
        let x = Tensor::arange(-600i64, 600, &Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
        let x = (x / 50.0).unwrap().reshape((12, 100)).unwrap();
        let close = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 2e-6, "{d}");
        };
        close(&gelu_tanh(&x).unwrap(), &x.gelu().unwrap());
        close(&silu(&x).unwrap(), &x.silu().unwrap());
        close(&softmax_last_dim(&x).unwrap(), &candle_nn::ops::softmax_last_dim(&x).unwrap());
        // A fully masked tail stays zero.
        let m = Tensor::new(&[[0f32, 1.0, f32::NEG_INFINITY]], &Device::Cpu).unwrap();
        let s: Vec<Vec<f32>> = softmax_last_dim(&m).unwrap().to_vec2().unwrap();
        assert_eq!(s[0][2], 0.0);
    }
}
