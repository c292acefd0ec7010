//! The CPU GEMM behind the model's linears: `x W^T` in f32 for any number of rows, with each
//! weight matrix packed once at load.
//!
//! candle's CPU matmul (the `gemm` crate) packs the weights again on every call, and on stable
//! Rust runs only its AVX2 kernels. Here the weights are laid out at load in panels of `NR`
//! output columns (`[n / NR][k][NR]`, the last panel zero-padded); the f32 kernels read the input
//! rows where they are (the bf16 kernel packs them as pairs first), and a register-tiled kernel
//! does the multiply-adds, a block of [`KC`] inner indices at a time: AVX-512 tiles of 12 rows by 32 columns (24 accumulators), AVX2/FMA tiles of 6
//! by 16 (12). The kernel is chosen once by the CPU's features; `LOOKOUT_CPU_GEMM` (`avx512`,
//! `avx2`, `candle`) overrides it, and without AVX2 and FMA the linears keep candle's matmul.
//! With AVX512-BF16, bf16 weights are packed as pairs and multiplied by `vdpbf16ps` (f32 sums;
//! see [`crate::model::Qwen3VL::new`] for when). [`attention`] and [`causal_attention`] fuse an
//! attention's two products on the same kernels, a block of query rows at a time.
//!
//! Every output element is summed over `k` in one order (blocks of [`KC`] in turn, each a chain
//! of multiply-adds) whatever the number of rows, the row's place among them or its tile, so a
//! frame pair encodes bit for bit alike in any batch (the vision reuse cache relies on it) and a
//! decode row gives the same logits alone as in a batch.

use std::cell::Cell;
use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// Inner indices per block: one block of an input panel (12 x 256 f32, 12 KiB) and of a weight
/// panel (256 x 32, 32 KiB) stay in the L1/L2 caches while a tile is computed.
const KC: usize = 256;
/// Row panels per block of input rows packed at once (96 rows for AVX-512).
const MC_PANELS: usize = 8;
/// Weight panels a task covers at most (256 columns for AVX-512): its block of outputs
/// (96 x 256) and of weights (256 x 256) stay in the L2 cache across the K blocks. Measured on
/// a 3136 x 1536 x 384 product: 121 GFLOP/s with all 48 panels per task, 2 threads.
const NC_PANELS: usize = 8;

/// The register-tiled kernel in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AVX-512F, 12 x 32 tiles.
    Avx512,
    /// AVX2 with FMA, 6 x 16 tiles.
    Avx2,
    /// AVX512-BF16: bf16 weights and inputs, f32 sums, 12 x 32 tiles of pairs (`vdpbf16ps`).
    Avx512Bf16,
}

impl Kernel {
    /// Rows of a tile.
    fn mr(self) -> usize {
        match self {
            Kernel::Avx512 | Kernel::Avx512Bf16 => 12,
            Kernel::Avx2 => 6,
        }
    }

    /// Columns of a tile (and of a weight panel).
    fn nr(self) -> usize {
        match self {
            Kernel::Avx512 | Kernel::Avx512Bf16 => 32,
            Kernel::Avx2 => 16,
        }
    }

    /// Whether a packed value is a pair of bf16 (two inner indices) rather than one f32.
    fn pairs(self) -> bool {
        self == Kernel::Avx512Bf16
    }

    /// Packed steps for `k` inner indices.
    fn steps(self, k: usize) -> usize {
        if self.pairs() { k.div_ceil(2) } else { k }
    }

    /// `avx512`, `avx2` or `avx512-bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Avx512 => "avx512",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512Bf16 => "avx512-bf16",
        }
    }
}

/// The bf16 kernel, where the CPU has AVX512-BF16 and the f32 kernel in use is the AVX-512 one
/// (`LOOKOUT_CPU_GEMM=avx2` or `candle` turns it off too): `--dtype bf16` on the CPU then keeps
/// activations in f32 and packs the linears' weights in bf16. `None`: bf16 stays candle's.
pub fn bf16_kernel() -> Option<Kernel> {
    (kernel() == Some(Kernel::Avx512) && cpu_has("avx512bf16")).then_some(Kernel::Avx512Bf16)
}

/// The kernel this process uses for f32 linears on the CPU (`None`: candle's matmul), chosen
/// once from the CPU's features and `LOOKOUT_CPU_GEMM`.
pub fn kernel() -> Option<Kernel> {
    static CHOICE: OnceLock<Option<Kernel>> = OnceLock::new();
    *CHOICE.get_or_init(|| {
        let asked = std::env::var("LOOKOUT_CPU_GEMM").ok();
        let chosen = choose(asked.as_deref(), cpu_has("avx512f"), cpu_has("avx2") && cpu_has("fma"));
        tracing::debug!(kernel = chosen.map_or("candle", Kernel::name), "CPU GEMM");
        chosen
    })
}

/// What `LOOKOUT_CPU_GEMM` asks for, within what the CPU can run (an unknown value or one the
/// CPU lacks falls back to the best it has).
fn choose(asked: Option<&str>, avx512: bool, avx2: bool) -> Option<Kernel> {
    let best = if avx512 {
        Some(Kernel::Avx512)
    } else if avx2 {
        Some(Kernel::Avx2)
    } else {
        None
    };
    match asked {
        Some("candle") => None,
        Some("avx2") if avx2 => Some(Kernel::Avx2),
        _ => best,
    }
}

fn cpu_has(feature: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        match feature {
            "avx512f" => is_x86_feature_detected!("avx512f"),
            "avx2" => is_x86_feature_detected!("avx2"),
            "fma" => is_x86_feature_detected!("fma"),
            "avx512bf16" => is_x86_feature_detected!("avx512bf16"),
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = feature;
        false
    }
}

/// A weight matrix (`n x k`, the layout of a linear's `weight`) packed for [`Kernel`]: panels
/// of `nr` columns, `[n / nr][steps][nr]`, each value an f32's bits or, for
/// [`Kernel::Avx512Bf16`], two bf16 (`k` and `k + 1`, the low half first).
pub(crate) struct Packed {
    kernel: Kernel,
    n: usize,
    k: usize,
    data: Vec<u32>,
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Packed({}x{}, {})", self.n, self.k, self.kernel.name())
    }
}

/// `x` rounded to bf16 (to nearest, ties to even, as torch's `.to(torch.bfloat16)`).
fn bf16(x: f32) -> u32 {
    if x.is_nan() {
        return 0x7fc0;
    }
    let b = x.to_bits();
    (b.wrapping_add(0x7fff + ((b >> 16) & 1))) >> 16
}

impl Packed {
    fn empty(n: usize, k: usize, kernel: Kernel) -> Packed {
        let data = vec![0u32; n.div_ceil(kernel.nr()) * kernel.steps(k) * kernel.nr()];
        Packed { kernel, n, k, data }
    }

    /// Puts `v` at column `j`, inner index `kk`.
    fn put(&mut self, j: usize, kk: usize, v: f32) {
        let (nr, steps) = (self.kernel.nr(), self.kernel.steps(self.k));
        if self.kernel.pairs() {
            self.data[(j / nr) * steps * nr + (kk / 2) * nr + j % nr] |= bf16(v) << (16 * (kk % 2));
        } else {
            self.data[(j / nr) * steps * nr + kk * nr + j % nr] = v.to_bits();
        }
    }

    /// Packs `w` (`n x k`, row-major) in panels of the kernel's columns.
    pub(crate) fn new(w: &[f32], n: usize, k: usize, kernel: Kernel) -> Packed {
        assert_eq!(w.len(), n * k, "a {n}x{k} weight");
        let mut p = Packed::empty(n, k, kernel);
        for (j, row) in w.chunks_exact(k.max(1)).enumerate() {
            for (kk, v) in row.iter().enumerate() {
                p.put(j, kk, *v);
            }
        }
        p
    }

    /// Packs `x` given by columns (`k x n`, row-major: the values of an attention, whose
    /// product with the probabilities is `p V`).
    pub(crate) fn from_columns(x: &[f32], k: usize, n: usize, kernel: Kernel) -> Packed {
        assert_eq!(x.len(), n * k, "a {k}x{n} matrix");
        let mut p = Packed::empty(n, k, kernel);
        for (kk, row) in x.chunks_exact(n.max(1)).enumerate() {
            for (j, v) in row.iter().enumerate() {
                p.put(j, kk, *v);
            }
        }
        p
    }

    /// Packs a linear's weight tensor when the CPU GEMM applies to it (f32 on the CPU, a kernel
    /// this CPU runs; in bf16 inside [`bf16_weights`]); `None` leaves it to candle.
    pub(crate) fn from_tensor(w: &Tensor) -> Result<Option<Arc<Packed>>> {
        let chosen = if BF16_WEIGHTS.with(Cell::get) { bf16_kernel() } else { kernel() };
        let Some(kernel) = chosen else { return Ok(None) };
        if !w.device().is_cpu() || w.dtype() != DType::F32 || w.rank() != 2 {
            return Ok(None);
        }
        let (n, k) = w.dims2()?;
        let values = w.flatten_all()?.to_vec1::<f32>()?;
        Ok(Some(Arc::new(Packed::new(&values, n, k, kernel))))
    }

    /// Whether the weights are bf16.
    pub(crate) fn is_bf16(&self) -> bool {
        self.kernel.pairs()
    }

    /// `a W^T` for `a` of `m x k` (row-major): `m x n`.
    pub(crate) fn matmul(&self, a: &[f32], m: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * self.n];
        self.matmul_into(a, m, &mut out, true);
        out
    }

    /// `a W^T` into `out` (`m x n`), on the thread pool when `parallel`.
    pub(crate) fn matmul_into(&self, a: &[f32], m: usize, out: &mut [f32], parallel: bool) {
        self.matmul_part(a, m, self.k, out, self.n, parallel);
    }

    /// The product with the first `cols` columns and `inner` inner indices of the weight:
    /// `out[i][j] = sum_{kk < inner} a[i][kk] w[j][kk]` for `a` of `m x inner` and `out` of
    /// `m x cols` (both row-major). Causal attention multiplies a block of query rows by the
    /// keys up to its last position only, and those probabilities by as many values.
    pub(crate) fn matmul_part(&self, a: &[f32], m: usize, inner: usize, out: &mut [f32], cols: usize, parallel: bool) {
        let kernel = self.kernel;
        assert!(cols <= self.n && inner <= self.k, "{cols}x{inner} of a {}x{} weight", self.n, self.k);
        assert_eq!(a.len(), m * inner, "{m} rows of {inner}");
        assert_eq!(out.len(), m * cols, "{m} rows of {cols}");
        if m == 0 || cols == 0 {
            return;
        }
        let (mr, nr, steps) = (kernel.mr(), kernel.nr(), kernel.steps(self.k));
        let mc = mr * MC_PANELS;
        let panels = cols.div_ceil(nr);
        let threads = if parallel { crate::parallel::threads() } else { 1 };
        // The f32 kernels read the input rows where they are. The bf16 kernel reads them packed
        // as pairs, once per chunk of row blocks (within PACKED_A values), before the tiles.
        let pairs = kernel.pairs();
        let chunk_rows = if pairs { (PACKED_A / kernel.steps(inner).max(1) / mc).max(1) * mc } else { m };
        let ks_all = kernel.steps(inner);
        let c = OutPtr(out.as_mut_ptr());
        let mut packed = Vec::new();
        for c0 in (0..m).step_by(chunk_rows) {
            let crows = chunk_rows.min(m - c0);
            if pairs {
                let row_panels = crows.div_ceil(mr);
                packed.clear();
                packed.resize(row_panels * ks_all * mr, 0u32);
                let pack = |rp: usize, panel: &mut [u32]| {
                    let rows = (crows - rp * mr).min(mr);
                    pack_panel(kernel, a, inner, c0 + rp * mr, rows, panel);
                };
                if parallel {
                    crate::parallel::for_each_chunk(&mut packed, ks_all * mr, pack);
                } else {
                    packed.chunks_mut(ks_all * mr).enumerate().for_each(|(rp, panel)| pack(rp, panel));
                }
            }
            let packed = &packed;
            let blocks = crows.div_ceil(mc);
            // Enough tasks for every thread (row blocks by groups of weight panels).
            let groups = (4 * threads).div_ceil(blocks).max(panels.div_ceil(NC_PANELS)).clamp(1, panels);
            let per_group = panels.div_ceil(groups);
            let task = |task: usize| {
                let (block, group) = (task / groups, task % groups);
                let (p0, p1) = (group * per_group, ((group + 1) * per_group).min(panels));
                if p0 >= p1 {
                    return;
                }
                let i0 = block * mc;
                let rows = (crows - i0).min(mc);
                for pc in (0..inner).step_by(KC) {
                    let kc = KC.min(inner - pc);
                    let (s0, ks) = (kernel.steps(pc), kernel.steps(kc));
                    for p in p0..p1 {
                        // KC is even, so a block's first step is `kernel.steps(pc)` whole.
                        let b = &self.data[(p * steps + s0) * nr..][..ks * nr];
                        let width = (cols - p * nr).min(nr);
                        for rp in 0..rows.div_ceil(mr) {
                            let r = (rows - rp * mr).min(mr);
                            let ap = if pairs {
                                Input::Packed(&packed[((i0 / mr + rp) * ks_all + s0) * mr..][..ks * mr])
                            } else {
                                Input::Rows(&a[(c0 + i0 + rp * mr) * inner + pc..][..(r - 1) * inner + kc], inner)
                            };
                            // SAFETY: the tile is rows `c0 + i0 + rp * mr ..+ r` and columns
                            // `p * nr ..+ width` of `out` (m x cols): inside it, and no other
                            // task writes there (tasks split the rows by blocks and the columns
                            // by panels); `ap` holds `ks` steps of `r` rows, `b` of `nr` values.
                            #[allow(unsafe_code)]
                            unsafe {
                                let at = c.at((c0 + i0 + rp * mr) * cols + p * nr);
                                tile(kernel, ks, ap, b, at, cols, r, width, pc > 0)
                            };
                        }
                    }
                }
            };
            if parallel {
                crate::parallel::for_each(blocks * groups, task);
            } else {
                (0..blocks * groups).for_each(task);
            }
        }
    }
}

/// Packed input values a call holds at most (16 MiB): longer inputs are packed and multiplied
/// a chunk of row blocks at a time.
const PACKED_A: usize = 4 << 20;

thread_local! {
    /// Set by [`bf16_weights`] while a model is built.
    static BF16_WEIGHTS: Cell<bool> = const { Cell::new(false) };
}

/// Builds with `f` the linears whose weights are packed in bf16 (see [`bf16_kernel`]); the
/// model is otherwise f32.
pub(crate) fn bf16_weights<R>(f: impl FnOnce() -> R) -> R {
    let before = BF16_WEIGHTS.with(|b| b.replace(true));
    let out = f();
    BF16_WEIGHTS.with(|b| b.set(before));
    out
}

/// Rows `i0..i0 + rows` (at most `mr`) of `a` (`_ x k`), every inner index, as one panel:
/// `out[step][r]`, the rows past `rows` zero (a step is one f32, or two bf16 for the bf16
/// kernel, the last one's high half zero when `k` is odd).
fn pack_panel(kernel: Kernel, a: &[f32], k: usize, i0: usize, rows: usize, out: &mut [u32]) {
    let mr = kernel.mr();
    debug_assert!(rows <= mr && out.len() == kernel.steps(k) * mr);
    for r in 0..rows {
        let src = &a[(i0 + r) * k..][..k];
        let dst = out.iter_mut().skip(r).step_by(mr);
        if kernel.pairs() {
            let (whole, odd) = src.as_chunks::<2>();
            for (d, pair) in
                dst.zip(whole.iter().map(|p| bf16(p[0]) | (bf16(p[1]) << 16)).chain(odd.iter().map(|v| bf16(*v))))
            {
                *d = pair;
            }
        } else {
            for (d, v) in dst.zip(src) {
                *d = v.to_bits();
            }
        }
    }
    // Rows past the end stay zero: `out` comes zeroed.
}

/// The output buffer, shared by the tasks that write disjoint tiles of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

// SAFETY: the tasks write disjoint tiles (see `Packed::matmul`) and the buffer outlives them.
#[allow(unsafe_code)]
unsafe impl Send for OutPtr {}
#[allow(unsafe_code)]
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `offset` is within the buffer.
    #[allow(unsafe_code)]
    unsafe fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: the caller's contract.
        unsafe { self.0.add(offset) }
    }
}

/// A tile's input rows: a packed panel (`[step][mr]`, the bf16 kernel's pairs), or `rows` rows
/// read where they are, `lda` apart (the f32 kernels: packing them cost as much as the
/// multiply-adds where the weight is narrow, an attention's `p V` with its 64 columns).
#[derive(Clone, Copy)]
enum Input<'a> {
    Packed(&'a [u32]),
    Rows(&'a [f32], usize),
}

/// One tile: `rows x cols` of the output at `c` (row stride `ldc`) from `steps` steps of the
/// input rows `a` and the weight panel `b`, added to what is there when `accumulate`. Edge
/// tiles go through a full-size scratch tile so the kernel's loads and stores stay in bounds.
///
/// # Safety
/// `kernel` runs on this CPU; `c` points at a `rows x cols` tile of a buffer with row stride
/// `ldc`; `b` holds `steps * nr` values (`a`'s extent is checked).
#[allow(unsafe_code, clippy::too_many_arguments)]
unsafe fn tile(
    kernel: Kernel,
    steps: usize,
    a: Input<'_>,
    b: &[u32],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    let (mr, nr) = (kernel.mr(), kernel.nr());
    // Where the kernel finds input row r's step s: `a[r * row + s * step]`.
    let (a, row, step) = match a {
        Input::Packed(a) => {
            assert!(a.len() >= steps * mr, "a packed panel of {steps} steps");
            (a.as_ptr(), 1, mr)
        }
        Input::Rows(a, lda) => {
            assert!(!kernel.pairs() && rows > 0 && a.len() > (rows - 1) * lda + steps - 1, "{rows} rows of {steps}");
            (a.as_ptr().cast::<u32>(), lda, 1)
        }
    };
    debug_assert!(b.len() >= steps * nr && rows <= mr && cols <= nr);
    if cols == nr {
        // SAFETY: the tile's rows are whole; the kernel touches `rows` of them.
        unsafe { run(kernel, steps, a, row, step, b.as_ptr(), c, ldc, rows, accumulate) };
        return;
    }
    let mut scratch = [0f32; 12 * 32];
    for r in 0..rows {
        for j in 0..cols {
            // SAFETY: inside the caller's tile.
            scratch[r * nr + j] = if accumulate { unsafe { *c.add(r * ldc + j) } } else { 0.0 };
        }
    }
    // SAFETY: the scratch tile holds `mr x nr`.
    unsafe { run(kernel, steps, a, row, step, b.as_ptr(), scratch.as_mut_ptr(), nr, rows, accumulate) };
    for r in 0..rows {
        for j in 0..cols {
            // SAFETY: inside the caller's tile.
            unsafe { *c.add(r * ldc + j) = scratch[r * nr + j] };
        }
    }
}

/// The kernel for `rows` (1 to `mr`) rows of whole width.
///
/// # Safety
/// As [`tile`], with `nr` columns at `c`.
#[allow(unsafe_code, clippy::too_many_arguments)]
unsafe fn run(
    kernel: Kernel,
    steps: usize,
    a: *const u32,
    row: usize,
    step: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! by_rows {
            ($f:ident, $a:expr, $b:expr, $($r:literal)+) => {
                match rows {
                    // SAFETY: the caller's contract; `kernel` says the CPU has the features.
                    $($r => unsafe { x86::$f::<$r>(steps, $a, row, step, $b, c, ldc, accumulate) },)+
                    _ => unreachable!("a tile of {rows} rows"),
                }
            };
        }
        let (af, bf) = (a.cast::<f32>(), b.cast::<f32>());
        match kernel {
            Kernel::Avx512 => by_rows!(avx512, af, bf, 1 2 3 4 5 6 7 8 9 10 11 12),
            Kernel::Avx2 => by_rows!(avx2, af, bf, 1 2 3 4 5 6),
            Kernel::Avx512Bf16 => by_rows!(avx512bf16, a, b, 1 2 3 4 5 6 7 8 9 10 11 12),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kernel, steps, a, row, step, b, c, ldc, rows, accumulate);
        unreachable!("no CPU GEMM kernel off x86_64 (kernel() is None there)");
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    /// The accumulators of an AVX-512 tile of `R` rows by 32: zero, or what `c` holds.
    ///
    /// # Safety
    /// AVX-512F; with `accumulate`, `c` holds `R` rows of 32 at stride `ldc`.
    #[target_feature(enable = "avx512f")]
    unsafe fn start_tile<const R: usize>(c: *const f32, ldc: usize, accumulate: bool) -> [[__m512; 2]; R] {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        if accumulate {
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: the caller's contract.
                unsafe {
                    row[0] = _mm512_loadu_ps(c.add(r * ldc));
                    row[1] = _mm512_loadu_ps(c.add(r * ldc + 16));
                }
            }
        }
        acc
    }

    /// Writes an AVX-512 tile's accumulators to `c`.
    ///
    /// # Safety
    /// AVX-512F; `c` holds `R` rows of 32 at stride `ldc`.
    #[target_feature(enable = "avx512f")]
    unsafe fn store_tile<const R: usize>(c: *mut f32, ldc: usize, acc: &[[__m512; 2]; R]) {
        for (r, row) in acc.iter().enumerate() {
            // SAFETY: the caller's contract.
            unsafe {
                _mm512_storeu_ps(c.add(r * ldc), row[0]);
                _mm512_storeu_ps(c.add(r * ldc + 16), row[1]);
            }
        }
    }

    /// `R` rows by 32 columns: `c[r][..32] (+)= sum_kk a[r * row + kk * step] * b[kk * 32..][..32]`.
    ///
    /// # Safety
    /// AVX-512F; `a` holds `R` rows of `kc` steps at those strides, `b` `kc * 32` values, and `c`
    /// `R` rows of 32 at stride `ldc`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn avx512<const R: usize>(
        kc: usize,
        a: *const f32,
        row: usize,
        step: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        // SAFETY: every pointer stays within the extents of the contract.
        unsafe {
            let mut acc = start_tile::<R>(c, ldc, accumulate);
            let starts: [*const f32; R] = std::array::from_fn(|r| a.add(r * row));
            for kk in 0..kc {
                let b0 = _mm512_loadu_ps(b.add(kk * 32));
                let b1 = _mm512_loadu_ps(b.add(kk * 32 + 16));
                for (acc_row, ar) in acc.iter_mut().zip(&starts) {
                    let av = _mm512_set1_ps(*ar.add(kk * step));
                    let row = acc_row;
                    row[0] = _mm512_fmadd_ps(av, b0, row[0]);
                    row[1] = _mm512_fmadd_ps(av, b1, row[1]);
                }
            }
            store_tile(c, ldc, &acc);
        }
    }

    /// `R` rows by 32 columns from bf16 pairs: `c[r][j] (+)= sum_s a[s * 12 + r] . b[s * 32 + j]`,
    /// each a dot product of two bf16 pairs accumulated in f32 (`vdpbf16ps`).
    ///
    /// # Safety
    /// AVX-512F and AVX512-BF16; `a` holds `steps * 12` pairs (packed: `row` 1, `step` 12), `b`
    /// `steps * 32`, and `c` `R` rows of 32 at stride `ldc`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn avx512bf16<const R: usize>(
        steps: usize,
        a: *const u32,
        row: usize,
        step: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        // SAFETY: every pointer stays within the extents of the contract; a vector of 16 u32 is
        // one of 32 bf16 (the same 64 bytes).
        unsafe {
            let mut acc = start_tile::<R>(c, ldc, accumulate);
            for s in 0..steps {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(s * 32).cast()));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(s * 32 + 16).cast()));
                let ar = a.add(s * step);
                for (r, acc_row) in acc.iter_mut().enumerate() {
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ar.add(r * row) as i32));
                    let row = acc_row;
                    row[0] = _mm512_dpbf16_ps(row[0], av, b0);
                    row[1] = _mm512_dpbf16_ps(row[1], av, b1);
                }
            }
            store_tile(c, ldc, &acc);
        }
    }

    /// `R` rows by 16 columns, as [`avx512`] with 8-lane registers.
    ///
    /// # Safety
    /// AVX2 and FMA; `a` holds `R` rows of `kc` steps at strides `row` and `step`, `b` `kc * 16`
    /// values, and `c` `R` rows of 16 at stride `ldc`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn avx2<const R: usize>(
        kc: usize,
        a: *const f32,
        row: usize,
        step: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        // SAFETY: every pointer stays within the extents of the contract.
        unsafe {
            if accumulate {
                for (r, row) in acc.iter_mut().enumerate() {
                    row[0] = _mm256_loadu_ps(c.add(r * ldc));
                    row[1] = _mm256_loadu_ps(c.add(r * ldc + 8));
                }
            }
            let starts: [*const f32; R] = std::array::from_fn(|r| a.add(r * row));
            for kk in 0..kc {
                let b0 = _mm256_loadu_ps(b.add(kk * 16));
                let b1 = _mm256_loadu_ps(b.add(kk * 16 + 8));
                for (acc_row, ar) in acc.iter_mut().zip(&starts) {
                    let av = _mm256_broadcast_ss(&*ar.add(kk * step));
                    let row = acc_row;
                    row[0] = _mm256_fmadd_ps(av, b0, row[0]);
                    row[1] = _mm256_fmadd_ps(av, b1, row[1]);
                }
            }
            for (r, row) in acc.iter().enumerate() {
                _mm256_storeu_ps(c.add(r * ldc), row[0]);
                _mm256_storeu_ps(c.add(r * ldc + 8), row[1]);
            }
        }
    }
}

/// `x W^T` through a packed weight, as a candle op on `x` (`m x k`, f32 on the CPU).
pub(crate) struct PackedMatmul(pub(crate) Arc<Packed>);

impl CustomOp1 for PackedMatmul {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = storage else {
            candle_core::bail!("packed-matmul needs f32");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("packed-matmul needs a contiguous input");
        };
        let (m, k) = layout.shape().dims2()?;
        if k != self.0.k {
            candle_core::bail!("packed-matmul: {m}x{k} by a {}x{} weight", self.0.n, self.0.k);
        }
        Ok((CpuStorage::F32(self.0.matmul(&x[start..end], m)), Shape::from((m, self.0.n))))
    }
}

/// Query rows attended at once: their scores (`QUERY_BLOCK x len`) stay in the L2 cache.
const QUERY_BLOCK: usize = 96;

/// Attention of independent problems, fused: `q` is `(problems, rows, hd)`, `k` and `v`
/// `(problems, len, hd)`, contiguous f32; for each problem and block of query rows, the scores
/// `q k^T` (packed GEMM; causally, with the keys up to the block's furthest row only), scaled
/// and softmaxed ([`crate::fastmath::softmax_scaled`]) and multiplied by `v` (packed GEMM),
/// without a problem's whole score matrix ever being allocated.
struct Attention {
    kernel: Kernel,
    scale: f32,
    causal: Option<Causal>,
}

/// A causal mask: query row `r` is position `past + r % positions` (the rows are the query
/// heads of a KV group, each `positions` long) and sees the keys up to it.
#[derive(Clone, Copy)]
struct Causal {
    past: usize,
    positions: usize,
}

impl candle_core::CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "packed-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (sq, sk, sv) else {
            candle_core::bail!("packed-attention needs f32");
        };
        let offsets = |l: &Layout| -> Result<(usize, usize)> {
            l.contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("packed-attention needs contiguous inputs".into()))
        };
        let ((qa, qb), (ka, kb), (va, vb)) = (offsets(lq)?, offsets(lk)?, offsets(lv)?);
        let (problems, m, hd) = lq.shape().dims3()?;
        let (kp, len, khd) = lk.shape().dims3()?;
        if kp != problems || khd != hd || lv.shape() != lk.shape() {
            candle_core::bail!("packed-attention: q {:?}, k {:?}, v {:?}", lq.shape(), lk.shape(), lv.shape());
        }
        if let Some(c) = self.causal
            && (c.positions == 0 || !m.is_multiple_of(c.positions) || c.past + c.positions > len)
        {
            candle_core::bail!(
                "packed-attention: {m} query rows of {} positions after {} of {len}",
                c.positions,
                c.past
            );
        }
        let (q, k, v) = (&q[qa..qb], &k[ka..kb], &v[va..vb]);
        let (qsize, ksize) = (m * hd, len * hd);
        let mut out = vec![0f32; problems * qsize];
        crate::parallel::for_each_chunk(&mut out, qsize.max(1), |p, o| {
            let q = &q[p * qsize..][..qsize];
            let keys = Packed::new(&k[p * ksize..][..ksize], len, hd, self.kernel);
            let values = Packed::from_columns(&v[p * ksize..][..ksize], len, hd, self.kernel);
            let mut scores = vec![0f32; QUERY_BLOCK.min(m) * len];
            let mut probs = scores.clone();
            for from in (0..m).step_by(QUERY_BLOCK) {
                let rows = QUERY_BLOCK.min(m - from);
                // How many keys each row sees; causally, the block is multiplied by the keys up
                // to its furthest row only (a prompt's prefill skips about half the products).
                let seen = |r: usize| self.causal.map_or(len, |c| c.past + (from + r) % c.positions + 1);
                let width = (0..rows).map(seen).max().unwrap_or(len);
                let (s, pr) = (&mut scores[..rows * width], &mut probs[..rows * width]);
                keys.matmul_part(&q[from * hd..(from + rows) * hd], rows, hd, s, width, false);
                for (r, (row, out)) in s.chunks_exact(width).zip(pr.chunks_exact_mut(width)).enumerate() {
                    crate::fastmath::softmax_scaled(row, out, self.scale, seen(r));
                }
                values.matmul_part(pr, rows, width, &mut o[from * hd..(from + rows) * hd], hd, false);
            }
        });
        Ok((CpuStorage::F32(out), lq.shape().clone()))
    }
}

/// `softmax(q k^T * scale) v` over the last two dimensions of `(.., len, hd)` tensors, fused on
/// the CPU in f32 where the GEMM applies; `None` where candle's ops are the ones to use.
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    fused(q, k, v, scale, None)
}

/// Causal attention of a KV group's query heads: `q` is `(groups, heads_per_group * n, hd)`
/// (each head's `n` rows the positions `past..past + n`), `k` and `v` `(groups, len, hd)`.
pub(crate) fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    past: usize,
    n: usize,
) -> Result<Option<Tensor>> {
    fused(q, k, v, scale, Some(Causal { past, positions: n }))
}

fn fused(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: Option<Causal>) -> Result<Option<Tensor>> {
    let Some(kernel) = kernel() else { return Ok(None) };
    if !q.device().is_cpu() || q.dtype() != DType::F32 || q.rank() < 2 || k.rank() != q.rank() {
        return Ok(None);
    }
    let dims = q.dims().to_vec();
    let hd = dims[dims.len() - 1];
    let flat = |t: &Tensor| {
        let rows = t.dims()[t.rank() - 2];
        t.contiguous()?.reshape(((), rows, hd))
    };
    let op = Attention { kernel, scale: scale as f32, causal };
    let out = flat(q)?.apply_op3_no_bwd(&flat(k)?, &flat(v)?, &op)?;
    out.reshape(dims).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn reference(a: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|kk| a[i * k + kk] as f64 * w[j * k + kk] as f64).sum();
            }
        }
        out
    }

    /// The kernels this CPU runs.
    fn kernels() -> Vec<Kernel> {
        let mut all: Vec<Kernel> = [Kernel::Avx512, Kernel::Avx2]
            .into_iter()
            .filter(|k| choose(Some(k.name()), cpu_has("avx512f"), cpu_has("avx2") && cpu_has("fma")) == Some(*k))
            .collect();
        if cpu_has("avx512f") && cpu_has("avx512bf16") {
            all.push(Kernel::Avx512Bf16);
        }
        all
    }

    /// What the kernel multiplies: `x` itself, or rounded to bf16.
    fn seen(kernel: Kernel, x: &[f32]) -> Vec<f32> {
        if kernel.pairs() { x.iter().map(|v| f32::from_bits(bf16(*v) << 16)).collect() } else { x.to_vec() }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16(1.0), 0x3f80);
        assert_eq!(bf16(f32::from_bits(0x3f80_8000)), 0x3f80, "a tie goes to the even neighbour");
        assert_eq!(bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(bf16(-2.5), 0xc020);
        assert_eq!(bf16(f32::NAN), 0x7fc0);
        assert_eq!(bf16(f32::INFINITY), 0x7f80);
    }

    #[test]
    fn matches_a_float64_reference_on_edges_and_blocks() {
        // Row and column tails, one and several K blocks (a K not a multiple of the block).
        for kernel in kernels() {
            for (m, n, k) in [(1, 1, 1), (5, 7, 3), (13, 33, 300), (97, 48, 512), (200, 70, 257), (31, 1536, 64)] {
                let (a, w) = (values(m * k, 1), values(n * k, 2));
                let got = Packed::new(&w, n, k, kernel).matmul(&a, m);
                // bf16: the products of the rounded values, summed in f32.
                let want = reference(&seen(kernel, &a), &seen(kernel, &w), m, n, k);
                for (i, (g, r)) in got.iter().zip(&want).enumerate() {
                    let tol = 1e-5 * (k as f64).sqrt().max(1.0);
                    assert!((*g as f64 - r).abs() <= tol, "{kernel:?} {m}x{n}x{k} at {i}: {g} vs {r}");
                }
            }
        }
    }

    #[test]
    fn a_row_is_computed_alike_whatever_else_is_in_the_batch() {
        let (n, k) = (70, 600);
        let w = values(n * k, 3);
        for kernel in kernels() {
            let packed = Packed::new(&w, n, k, kernel);
            let rows = values(150 * k, 4);
            let all = packed.matmul(&rows, 150);
            for (start, m) in [(0, 1), (7, 1), (11, 5), (100, 50), (13, 99)] {
                let some = packed.matmul(&rows[start * k..(start + m) * k], m);
                assert_eq!(some, all[start * n..(start + m) * n], "{kernel:?}: rows {start}..+{m}");
            }
        }
    }

    #[test]
    fn fused_attention_matches_candle_ops() {
        let dev = candle_core::Device::Cpu;
        // Two problems of 200 positions (query blocks and a tail), head width 64.
        let shape = (2, 1, 200, 64);
        let t = |seed| Tensor::from_vec(values(2 * 200 * 64, seed), shape, &dev).unwrap();
        let (q, k, v) = (t(7), t(8), t(9));
        let scale = 0.125;
        let got = attention(&q, &k, &v, scale).unwrap().expect("this CPU runs a GEMM kernel");
        let att = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&att).unwrap().matmul(&v).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn fused_causal_attention_matches_a_masked_softmax() {
        // Two KV groups of 3 query heads, 40 new positions after 25 cached; and one head of 200
        // positions, whose first blocks of query rows see only some of the keys (a block is
        // multiplied by the keys up to its furthest row: 121 and 217 of 225, not whole panels).
        for (groups, heads, n, past, hd) in [(2, 3, 40, 25, 32), (2, 1, 200, 25, 32)] {
            causal_case(groups, heads, n, past, hd);
        }
    }

    fn causal_case(groups: usize, heads: usize, n: usize, past: usize, hd: usize) {
        let dev = candle_core::Device::Cpu;
        let total = past + n;
        let q = Tensor::from_vec(values(groups * heads * n * hd, 10), (groups, heads * n, hd), &dev).unwrap();
        let k = Tensor::from_vec(values(groups * total * hd, 11), (groups, total, hd), &dev).unwrap();
        let v = Tensor::from_vec(values(groups * total * hd, 12), (groups, total, hd), &dev).unwrap();
        let got = causal_attention(&q, &k, &v, 0.2, past, n).unwrap().expect("this CPU runs a GEMM kernel");
        let mask: Vec<f32> = (0..heads * n)
            .flat_map(|r| (0..total).map(move |j| if j > past + r % n { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (heads * n, total), &dev).unwrap();
        let att = (q.matmul(&k.t().unwrap()).unwrap() * 0.2).unwrap().broadcast_add(&mask).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&att).unwrap().matmul(&v).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{groups}x{heads} heads of {n} after {past}: {diff}");
    }

    #[test]
    fn the_kernel_follows_the_cpu_and_the_setting() {
        assert_eq!(choose(None, true, true), Some(Kernel::Avx512));
        assert_eq!(choose(None, false, true), Some(Kernel::Avx2));
        assert_eq!(choose(None, false, false), None);
        assert_eq!(choose(Some("candle"), true, true), None);
        assert_eq!(choose(Some("avx2"), true, true), Some(Kernel::Avx2));
        assert_eq!(choose(Some("avx2"), false, false), None, "a kernel the CPU lacks falls back");
        assert_eq!(choose(Some("avx512"), false, true), Some(Kernel::Avx2));
    }

    #[test]
    fn the_candle_op_matches_candle_matmul() {
        let Some(kernel) = kernels().first().copied() else { return };
        let (m, n, k) = (40, 96, 384);
        let dev = candle_core::Device::Cpu;
        let x = Tensor::from_vec(values(m * k, 5), (m, k), &dev).unwrap();
        let w = Tensor::from_vec(values(n * k, 6), (n, k), &dev).unwrap();
        let packed = Arc::new(Packed::new(&w.flatten_all().unwrap().to_vec1().unwrap(), n, k, kernel));
        let got = x.apply_op1_no_bwd(&PackedMatmul(packed)).unwrap();
        let want = x.matmul(&w.t().unwrap()).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "{diff}");
    }
}
