//! What the inference benches share.

/// `len` deterministic pseudo-random values in [-1, 1) (xorshift64), one stream per `seed`.
pub(crate) fn pixels(len: usize, seed: u64) -> Vec<f32> {
    let mut state = 0x2545_f491_4f6c_dd1du64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}
