//! Vectorized CPU kernels for the element-wise hot spots (GELU-tanh, SiLU, softmax) and for the
//! few-row matmul of a batched decode step.
//!
//! candle's CPU ops call libm's `expf`/`tanhf` one element at a time; these kernels use a
//! polynomial `exp` (relative error about 1e-7, below f32 rounding of the results that matter)
//! that the compiler vectorizes, compiled for AVX2/FMA and AVX-512 and picked at run time. Other
//! devices and dtypes keep candle's own ops.
//!
//! candle's CPU matmul (the `gemm` crate) packs the whole weight matrix on every call unless the
//! input is one row (then it runs a matrix-vector product): a decode step of 2 to 32 sequences
//! took 3 to 4 times one sequence's step on a 1536x512 linear (measured: 147 us for one row,
//! 478 us for two). [`skinny_matmul`] reads each weight row once for all the input rows, so a
//! batch costs about what one row costs while the weights dominate.

#![allow(clippy::excessive_precision)] // polynomial coefficients as published

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// exp(x) for f32, vectorizable: 2^(x log2 e) split into 2^n (exponent bits) and a degree-7
/// polynomial for 2^f, |f| <= 0.5.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to the nearest integer
    let x = x.clamp(-87.0, 88.0);
    let y = x * std::f32::consts::LOG2_E;
    let t = y + MAGIC; // its low bits hold n: t = MAGIC + n exactly
    let n = t - MAGIC;
    let f = y - n;
    let p = 1.525_273_4e-5_f32;
    let p = p * f + 1.540_353_1e-4;
    let p = p * f + 1.333_355_8e-3;
    let p = p * f + 9.618_129e-3;
    let p = p * f + 5.550_410_9e-2;
    let p = p * f + 2.402_265e-1;
    let p = p * f + 6.931_472e-1;
    let p = p * f + 1.0;
    // 2^n from t's bits with integer ops only (`n as i32` is a saturating conversion, which
    // the compiler does one lane at a time: it was most of the softmax's time).
    let scale = f32::from_bits(t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23);
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
pub(crate) fn softmax_rows(xs: &[f32], out: &mut [f32], dim: usize) {
    for (row, o) in xs.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let max = lanes_max(row);
        for (d, &v) in o.iter_mut().zip(row) {
            *d = if v == f32::NEG_INFINITY { 0.0 } else { exp(v - max) };
        }
        let inv = 1.0 / lanes_sum(o);
        o.iter_mut().for_each(|v| *v *= inv);
    }
}

/// One row of attention probabilities: `out[j] = softmax(scale * row[..seen])[j]` for `j < seen`,
/// zero after (the keys a causal row does not see), in one pass for the maximum, one for the
/// exponentials and their sum and one for the normalisation.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
pub(crate) fn softmax_scaled(row: &[f32], out: &mut [f32], scale: f32, seen: usize) {
    let (seen_row, seen_out) = (&row[..seen], &mut out[..seen]);
    let max = lanes_max(seen_row);
    let shift = max * scale;
    for (d, &v) in seen_out.iter_mut().zip(seen_row) {
        *d = exp(v * scale - shift);
    }
    let inv = 1.0 / lanes_sum(seen_out);
    seen_out.iter_mut().for_each(|v| *v *= inv);
    out[seen..].fill(0.0);
}

/// The largest of `a`, in 16 independent lanes (a running maximum in one register would wait on
/// each comparison; the measured cost of the softmax was that chain and the one of the sum).
#[inline(always)]
fn lanes_max(a: &[f32]) -> f32 {
    const L: usize = 16;
    let (chunks, tail) = a.as_chunks::<L>();
    let mut acc = [f32::NEG_INFINITY; L];
    for c in chunks {
        for l in 0..L {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    acc.iter().chain(tail).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// The sum of `a` in 16 independent lanes, then of the lanes.
#[inline(always)]
fn lanes_sum(a: &[f32]) -> f32 {
    const L: usize = 16;
    let (chunks, tail) = a.as_chunks::<L>();
    let mut acc = [0f32; L];
    for c in chunks {
        for l in 0..L {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

/// `a . b` in 16 independent lanes (so that it vectorizes into two AVX2 accumulators), then
/// their sum. (More accumulators measured slower here: the compiler then kept them in
/// half-width registers.)
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let (av, at) = a.as_chunks::<L>();
    let (bv, bt) = b.as_chunks::<L>();
    let mut acc = [0f32; L];
    for (x, y) in av.iter().zip(bv) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (x, y) in at.iter().zip(bt) {
        sum += x * y;
    }
    sum
}

/// `out[j * m + i] = x_i . w_j` for the weight rows of one block (`x` is `m x k`).
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
fn skinny_block(x: &[f32], m: usize, k: usize, w: &[f32], out: &mut [f32]) {
    for (wr, o) in w.chunks_exact(k).zip(out.chunks_exact_mut(m)) {
        for (xi, oi) in x.chunks_exact(k).zip(o.iter_mut()) {
            *oi = dot(xi, wr);
        }
    }
}

/// The same blocks with AVX2 and FMA intrinsics: tiles of 4 input rows by 2 weight rows, eight
/// accumulators in registers, so every weight chunk loaded serves four rows and every input
/// chunk two (the portable loop, as the compiler vectorizes it, keeps two accumulators and waits
/// on the multiply-add's latency).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::*;

    /// Whether [`block`] may run: the CPU has AVX2 and FMA, and rows are whole 8-lane chunks.
    pub(super) fn usable(k: usize) -> bool {
        k.is_multiple_of(8) && k > 0 && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// `out[j * m + i] = x_i . w_j`.
    ///
    /// # Safety
    /// [`usable`]`(k)`, `x.len() >= m * k`, `w.len() % k == 0` and `out.len() >= w.len() / k * m`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block(x: &[f32], m: usize, k: usize, w: &[f32], out: &mut [f32]) {
        let rows = w.len() / k;
        let mut j = 0;
        while j < rows {
            let pair = j + 1 < rows;
            let mut i = 0;
            while i < m {
                let left = m - i;
                // SAFETY: the tiles stay within `x`, `w` and `out` by the contract above.
                unsafe {
                    match (left >= 4, pair) {
                        (true, true) => tile::<4, 2>(x, i, w, j, k, m, out),
                        (true, false) => tile::<4, 1>(x, i, w, j, k, m, out),
                        (false, true) => tile::<1, 2>(x, i, w, j, k, m, out),
                        (false, false) => tile::<1, 1>(x, i, w, j, k, m, out),
                    }
                }
                i += if left >= 4 { 4 } else { 1 };
            }
            j += if pair { 2 } else { 1 };
        }
    }

    /// Rows `i..i + R` of `x` by rows `j..j + C` of `w`.
    ///
    /// # Safety
    /// AVX2 and FMA, `k % 8 == 0`, and the rows exist.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const R: usize, const C: usize>(
        x: &[f32],
        i: usize,
        w: &[f32],
        j: usize,
        k: usize,
        m: usize,
        out: &mut [f32],
    ) {
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        let mut at = 0;
        while at < k {
            // SAFETY: `at + 8 <= k` and the rows exist (the caller's contract).
            unsafe {
                let mut wv = [_mm256_setzero_ps(); C];
                for (c, v) in wv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(wp.add((j + c) * k + at));
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(xp.add((i + r) * k + at));
                    for (a, wc) in row.iter_mut().zip(&wv) {
                        *a = _mm256_fmadd_ps(xv, *wc, *a);
                    }
                }
            }
            at += 8;
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, a) in row.iter().enumerate() {
                out[(j + c) * m + i + r] = hsum(*a);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}

/// One block of [`skinny_matmul`], by the intrinsics where the CPU has them.
fn skinny_block_any(x: &[f32], m: usize, k: usize, w: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2::usable(k) && x.len() >= m * k && w.len().is_multiple_of(k) && out.len() >= w.len() / k * m {
        // SAFETY: `usable` checked the CPU and the width; the lengths are checked here.
        #[allow(unsafe_code)]
        unsafe {
            avx2::block(x, m, k, w, out)
        };
        return;
    }
    skinny_block(x, m, k, w, out);
}

/// Input rows up to which [`skinny_matmul`] beats candle's matmul (it packs the weights).
pub(crate) const SKINNY_ROWS: usize = 32;

/// Input rows up to which [`skinny_matmul`] beats the packed GEMM of [`crate::gemm`], whose
/// weights are packed once at load. Measured on the small bench model's decode steps
/// (`benches/serving.sh`, part `steps`, 2 threads of an AMD EPYC with AVX-512): with the AVX-512 GEMM,
/// 8 rows took 11.0 ms against 14.5 through this kernel, 4 rows 9.2 against 9.6, 2 rows 8.1
/// against 5.9; with the AVX2 GEMM (`LOOKOUT_CPU_GEMM=avx2`) 8 rows 12.6 against 13.6, 4 rows
/// 10.3 against 9.2.
pub(crate) const SKINNY_OVER_PACKED: usize = 4;

struct Skinny;

impl candle_core::CustomOp2 for Skinny {
    fn name(&self) -> &'static str {
        "skinny-matmul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (s1, s2) else {
            candle_core::bail!("skinny-matmul needs f32");
        };
        let (Some((xa, xb)), Some((wa, wb))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("skinny-matmul needs contiguous inputs");
        };
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("skinny-matmul: {m}x{k} by ({n}x{k2})^T");
        }
        let (x, w) = (&x[xa..xb], &w[wa..wb]);
        // Blocks of weight rows, big enough to amortize the hand-off to the thread pool.
        let rows = (CHUNK / k.max(1)).max(1);
        let mut t = vec![0f32; n * m];
        crate::parallel::for_each_chunk(&mut t, rows * m, |i, o| {
            skinny_block_any(x, m, k, &w[i * rows * k..][..o.len() / m.max(1) * k], o)
        });
        if m == 1 {
            // One row (a single sequence's decode step): (n, 1) is already (1, n).
            return Ok((CpuStorage::F32(t), Shape::from((1, n))));
        }
        // (n, m) -> (m, n)
        let mut out = vec![0f32; m * n];
        for (j, row) in t.chunks_exact(m).enumerate() {
            for (i, v) in row.iter().enumerate() {
                out[i * n + j] = *v;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// `x w^T` for `x` of 1 to [`SKINNY_ROWS`] rows and `w` (`n x k`) in f32 on the CPU; `None`
/// where candle's matmul is the one to use (other devices, dtypes or shapes).
pub(crate) fn skinny_matmul(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let rows = x.dims().first().copied().unwrap_or(0);
    if !(fast(x) && w.dtype() == DType::F32 && x.rank() == 2 && w.rank() == 2 && (1..=SKINNY_ROWS).contains(&rows)) {
        return Ok(None);
    }
    x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &Skinny).map(Some)
}

/// One decode position's attention for one query head: scores against the first `len` keys of
/// its KV group (`k`, `v`: `len x hd` and more), softmax, and the weighted sum of the values,
/// computed as candle's matmuls and [`softmax_last_dim`] do (scaled after the dot product;
/// softmax in f32).
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+fma", "x86_64+avx2+fma"))]
fn decode_head(q: &[f32], k: &[f32], v: &[f32], len: usize, scale: f32, scores: &mut [f32], out: &mut [f32]) {
    let hd = q.len();
    for (s, kr) in scores.iter_mut().zip(k.chunks_exact(hd)).take(len) {
        *s = dot(q, kr) * scale;
    }
    let scores = &mut scores[..len];
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = exp(*s - max);
        sum += *s;
    }
    let inv = 1.0 / sum;
    out.fill(0.0);
    for (&p, vr) in scores.iter().zip(v.chunks_exact(hd)) {
        let p = p * inv;
        for (o, x) in out.iter_mut().zip(vr) {
            *o += p * x;
        }
    }
}

/// One decode step's attention for a batch of sequences: row `i` of `q` (`(b, heads, 1, hd)`)
/// attends to the first `len` positions of its own KV cache (`caches[i] = (k, v, len)`, each
/// `(1, kv_heads, capacity, hd)`, read in place: nothing is copied), in f32 on the CPU. Every
/// (row, head) is one task of the thread pool, so a step of many sequences is one parallel
/// section rather than one per sequence. Returns `(b, heads, 1, hd)`; `None` where the general
/// path is the one to use (another device or dtype, a cache not contiguous).
pub(crate) fn decode_attention(q: &Tensor, caches: &[(&Tensor, &Tensor, usize)], scale: f64) -> Result<Option<Tensor>> {
    use candle_core::Storage;
    let usable = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous() && t.rank() == 4;
    if !(fast(q) && caches.iter().all(|(k, v, _)| usable(k) && usable(v) && k.shape() == v.shape())) {
        return Ok(None);
    }
    let (b, heads, n, hd) = q.dims4()?;
    if n != 1 || b != caches.len() {
        candle_core::bail!("decode-attention: {b} rows of {n} positions for {} caches", caches.len());
    }
    let q = q.contiguous()?;
    let (q_storage, q_layout) = q.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(qd)) = &*q_storage else { return Ok(None) };
    let (qa, qb) = q_layout.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("q layout".into()))?;
    let qd = &qd[qa..qb];
    // Read guards on every cache for the duration of the step (nothing writes them meanwhile).
    let guards: Vec<_> = caches.iter().map(|(k, v, _)| (k.storage_and_layout(), v.storage_and_layout())).collect();
    struct Row<'a> {
        k: &'a [f32],
        v: &'a [f32],
        len: usize,
        group: usize,
        rep: usize,
    }
    let mut rows = Vec::with_capacity(b);
    for (((ks, kl), (vs, vl)), (k, _, len)) in guards.iter().zip(caches) {
        let (one, kv_heads, cap, hd2) = k.dims4()?;
        if one != 1 || hd2 != hd || kv_heads == 0 || heads % kv_heads != 0 || *len == 0 || *len > cap {
            candle_core::bail!(
                "decode-attention: {heads} heads of {hd} against {kv_heads} x {cap} x {hd2} ({len} held)"
            );
        }
        let (Storage::Cpu(CpuStorage::F32(kd)), Storage::Cpu(CpuStorage::F32(vd))) = (&**ks, &**vs) else {
            return Ok(None);
        };
        let ((ka, kb), (va, vb)) = kl
            .contiguous_offsets()
            .zip(vl.contiguous_offsets())
            .ok_or_else(|| candle_core::Error::Msg("cache layout".into()))?;
        rows.push(Row { k: &kd[ka..kb], v: &vd[va..vb], len: *len, group: cap * hd, rep: heads / kv_heads });
    }
    let scale = scale as f32;
    let mut out = vec![0f32; b * heads * hd];
    crate::parallel::for_each_chunk(&mut out, hd, |t, o| {
        let row = &rows[t / heads];
        let g = (t % heads) / row.rep;
        let (kg, vg) = (&row.k[g * row.group..][..row.group], &row.v[g * row.group..][..row.group]);
        let mut scores = vec![0f32; row.len];
        decode_head(&qd[t * hd..(t + 1) * hd], kg, vg, row.len, scale, &mut scores, o);
    });
    Tensor::from_vec(out, (b, heads, 1, hd), q.device()).map(Some)
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
        let xs = &data[start..end];
        let mut out = vec![0f32; xs.len()];
        let dim = (*layout.dims().last().unwrap_or(&1)).max(1);
        // Chunks of whole rows, big enough to amortize the hand-off to the thread pool.
        let chunk = (CHUNK / dim).max(1) * dim;
        let kind = self.0;
        crate::parallel::for_each_chunk(&mut out, chunk, |i, o| {
            let x = &xs[i * chunk..][..o.len()];
            match kind {
                Kind::GeluTanh => gelu_tanh_slice(x, o),
                Kind::Silu => silu_slice(x, o),
                Kind::Softmax => softmax_rows(x, o, dim),
            }
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
        // The few-row matmul, against candle's: widths of whole 8-lane chunks (the AVX2 tiles where
        // the CPU has them, with row and column tails) and odd widths (the portable loop).
        for (m, k, n) in [(1, 64, 3), (2, 37, 5), (3, 512, 70), (6, 64, 7), (32, 100, 9), (32, 96, 11)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
            let ours = skinny_matmul(&x, &w).unwrap().expect("taken");
            let theirs = x.matmul(&w.t().unwrap()).unwrap();
            let d = (&ours - &theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = theirs.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d / scale < 1e-6, "{m}x{k} by {n}: {d} of {scale}");
        }
        let many = Tensor::randn(0f32, 1.0, (SKINNY_ROWS + 1, 8), &Device::Cpu).unwrap();
        assert!(skinny_matmul(&many, &Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap()).unwrap().is_none());
        // Decode attention in place over a cache with room to spare, against the general path.
        let (heads, kv, cap, len, hd) = (8, 2, 40, 29, 16);
        let q = Tensor::randn(0f32, 1.0, (1, heads, 1, hd), &Device::Cpu).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, kv, cap, hd), &Device::Cpu).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, kv, cap, hd), &Device::Cpu).unwrap();
        let scale = (hd as f64).powf(-0.5);
        let general = |q: &Tensor, k: &Tensor, v: &Tensor, len: usize| {
            let (kn, vn) = (
                k.narrow(2, 0, len).unwrap().contiguous().unwrap(),
                v.narrow(2, 0, len).unwrap().contiguous().unwrap(),
            );
            let qg = q.reshape((1, kv, heads / kv, hd)).unwrap();
            let att = (qg.matmul(&kn.t().unwrap()).unwrap() * scale).unwrap();
            softmax_last_dim(&att).unwrap().matmul(&vn).unwrap().reshape((1, heads, 1, hd)).unwrap()
        };
        let ours = decode_attention(&q, &[(&k, &v, len)], scale).unwrap().expect("taken");
        close(&ours, &general(&q, &k, &v, len));
        // Several sequences in one step, each against its own cache of its own size and length.
        let caches: Vec<(Tensor, Tensor, usize)> = [(40, 29), (8, 1), (64, 64)]
            .into_iter()
            .map(|(cap, len)| {
                let t = || Tensor::randn(0f32, 1.0, (1, kv, cap, hd), &Device::Cpu).unwrap();
                (t(), t(), len)
            })
            .collect();
        let q = Tensor::randn(0f32, 1.0, (caches.len(), heads, 1, hd), &Device::Cpu).unwrap();
        let refs: Vec<_> = caches.iter().map(|(k, v, len)| (k, v, *len)).collect();
        let ours = decode_attention(&q, &refs, scale).unwrap().expect("taken");
        for (i, (k, v, len)) in caches.iter().enumerate() {
            let alone = general(&q.narrow(0, i, 1).unwrap(), k, v, *len);
            let row = ours.narrow(0, i, 1).unwrap();
            close(&row, &alone);
            // Bit for bit what the sequence gets decoded alone.
            let single = decode_attention(&q.narrow(0, i, 1).unwrap(), &[(k, v, *len)], scale).unwrap().expect("taken");
            let d = (&row - &single).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(d, 0.0, "row {i}");
        }
        assert!(decode_attention(&q, &refs[..1], scale).is_err(), "one cache per row");
        // A fully masked tail stays zero.
        let m = Tensor::new(&[[0f32, 1.0, f32::NEG_INFINITY]], &Device::Cpu).unwrap();
        let s: Vec<Vec<f32>> = softmax_last_dim(&m).unwrap().to_vec2().unwrap();
        assert_eq!(s[0][2], 0.0);
    }
}
