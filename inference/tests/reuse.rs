//! Vision reuse: a window put together from cached frame pairs is bit for bit the window encoded
//! whole, in both dtypes; identical pairs in one window are encoded once; the cache keeps to
//! its budget.

mod common;

use candle_core::{DType, Device, Tensor};
use common::load;
use inference::reuse::{ReuseCount, VisionCache};
use inference::vision::{VisionModel, VisionOutput};

const PATCH: usize = 1536;

/// Patch rows of frame pair `g` (`h x w` patches), distinct for each `g`.
fn pair(g: usize, h: usize, w: usize) -> Vec<f32> {
    let mut state = 0x9e37_79b9_u32.wrapping_mul(g as u32 + 1);
    (0..h * w * PATCH)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

fn window(pairs: &[usize], h: usize, w: usize) -> Vec<f32> {
    pairs.iter().flat_map(|&g| pair(g, h, w)).collect()
}

fn whole(tower: &VisionModel, data: &[f32], grids: &[[usize; 3]]) -> VisionOutput {
    let rows = data.len() / PATCH;
    tower.forward(&Tensor::from_vec(data.to_vec(), (rows, PATCH), &Device::Cpu).unwrap(), grids).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn assert_same(a: &VisionOutput, b: &VisionOutput, what: &str) {
    assert_eq!(a.embeds.dims(), b.embeds.dims(), "{what}");
    assert!(bits(&a.embeds) == bits(&b.embeds), "{what}: merged tokens differ");
    assert_eq!(a.deepstack.len(), b.deepstack.len());
    assert!(!a.deepstack.is_empty(), "the fixture has DeepStack taps");
    for (i, (x, y)) in a.deepstack.iter().zip(&b.deepstack).enumerate() {
        assert!(bits(x) == bits(y), "{what}: DeepStack tap {i} differs");
    }
}

fn overlapping_windows_reuse_pairs_bit_for_bit(dtype: DType) {
    let l = load("tiny-tied", dtype);
    let tower = &l.model.vision;
    let (h, w) = (8, 12);
    let mut cache = VisionCache::new(64 << 20);
    // Window A: pairs 0..4; window B, one stride of two pairs later: 2..6.
    let a = window(&[0, 1, 2, 3], h, w);
    let (out_a, n) = cache.encode(tower, &Device::Cpu, a.clone(), &[[4, h, w]]).unwrap();
    assert_eq!(n, ReuseCount { hits: 0, misses: 4 });
    assert_same(&out_a, &whole(tower, &a, &[[4, h, w]]), "window A");
    let b = window(&[2, 3, 4, 5], h, w);
    let (out_b, n) = cache.encode(tower, &Device::Cpu, b.clone(), &[[4, h, w]]).unwrap();
    assert_eq!(n, ReuseCount { hits: 2, misses: 2 });
    assert_same(&out_b, &whole(tower, &b, &[[4, h, w]]), "window B (two pairs reused)");
    // The same pairs in another order, and two videos of different sizes in one request.
    let c = [window(&[5, 2], h, w), window(&[7], 4, 6)].concat();
    let grids = [[2, h, w], [1, 4, 6]];
    let (out_c, n) = cache.encode(tower, &Device::Cpu, c.clone(), &grids).unwrap();
    assert_eq!(n, ReuseCount { hits: 2, misses: 1 });
    assert_same(&out_c, &whole(tower, &c, &grids), "two videos");
    // A still camera: the same pair three times is encoded once.
    let mut still = VisionCache::new(64 << 20);
    let s = window(&[9, 9, 9], h, w);
    let (out_s, n) = still.encode(tower, &Device::Cpu, s.clone(), &[[3, h, w]]).unwrap();
    assert_eq!(n, ReuseCount { hits: 2, misses: 1 });
    assert_eq!(still.len(), 1);
    assert_same(&out_s, &whole(tower, &s, &[[3, h, w]]), "a still camera");
    // A pair whose pixels differ in one bit is not the cached one.
    let mut d = pair(2, h, w);
    d[77] = f32::from_bits(d[77].to_bits() ^ 1);
    let (out_d, n) = cache.encode(tower, &Device::Cpu, d.clone(), &[[1, h, w]]).unwrap();
    assert_eq!(n, ReuseCount { hits: 0, misses: 1 });
    assert_same(&out_d, &whole(tower, &d, &[[1, h, w]]), "one bit changed");
}

#[test]
fn overlapping_windows_reuse_pairs_bit_for_bit_f32() {
    overlapping_windows_reuse_pairs_bit_for_bit(DType::F32);
}

#[test]
fn overlapping_windows_reuse_pairs_bit_for_bit_bf16() {
    overlapping_windows_reuse_pairs_bit_for_bit(DType::BF16);
}

#[test]
fn the_cache_keeps_to_its_budget_oldest_out_first() {
    let l = load("tiny-tied", DType::F32);
    let tower = &l.model.vision;
    let (h, w) = (8, 12);
    // Measure one pair's size, then allow two.
    let mut probe = VisionCache::new(64 << 20);
    probe.encode(tower, &Device::Cpu, pair(0, h, w), &[[1, h, w]]).unwrap();
    let one = probe.bytes();
    assert!(one > 0);
    let mut cache = VisionCache::new(2 * one);
    cache.encode(tower, &Device::Cpu, window(&[0, 1, 2], h, w), &[[3, h, w]]).unwrap();
    assert_eq!((cache.len(), cache.bytes()), (2, 2 * one), "three pairs, room for two");
    // Pair 0 went first: 1 and 2 are still there.
    let (_, n) = cache.encode(tower, &Device::Cpu, window(&[1, 2], h, w), &[[2, h, w]]).unwrap();
    assert_eq!(n, ReuseCount { hits: 2, misses: 0 });
    // Using 1 makes 2 the oldest: a new pair evicts 2.
    cache.encode(tower, &Device::Cpu, pair(1, h, w), &[[1, h, w]]).unwrap();
    cache.encode(tower, &Device::Cpu, pair(3, h, w), &[[1, h, w]]).unwrap();
    let (_, n) = cache.encode(tower, &Device::Cpu, window(&[1, 2], h, w), &[[2, h, w]]).unwrap();
    assert_eq!(n, ReuseCount { hits: 1, misses: 1 });
    assert!(cache.bytes() <= 2 * one);
    // No budget: nothing kept, the output still right.
    let mut off = VisionCache::new(0);
    let x = window(&[0, 0], h, w);
    let (out, n) = off.encode(tower, &Device::Cpu, x.clone(), &[[2, h, w]]).unwrap();
    assert_eq!(n, ReuseCount { hits: 0, misses: 2 });
    assert!(off.is_empty());
    assert_same(&out, &whole(tower, &x, &[[2, h, w]]), "without reuse");
    // Bad input is an error, not a panic.
    assert!(off.encode(tower, &Device::Cpu, x[..100].to_vec(), &[[2, h, w]]).is_err());
}
