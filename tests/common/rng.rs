//! A seeded generator, so test traffic is reproducible. Each test binary adds the
//! distributions it needs in an `impl Rng` of its own.

/// SplitMix64: a tiny seeded generator, so test traffic is reproducible without a `rand`
/// dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (the modulo bias is irrelevant for test traffic).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}
