//! MD5 of a whole file and of each of its parts, in one pass over the bytes.
//!
//! A multipart upload needs two MD5s of every byte: the file's own (for `md5sum.txt`)
//! and its part's (for the part ETag, `Content-MD5` and the multipart ETag). MD5 is a
//! chain of dependent additions and rotations, so one stream leaves most of a core's
//! execution units idle; [`Md5Parts`] runs the two chains side by side over the same
//! 64-byte blocks, which costs little more than one of them instead of two.
//!
//! The result is ordinary MD5 (RFC 1321); the tests compare it with the `md-5` crate.

use md5::{Digest, Md5};

const IV: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];

#[inline]
fn f(b: u32, c: u32, d: u32) -> u32 {
    d ^ (b & (c ^ d))
}
#[inline]
fn g(b: u32, c: u32, d: u32) -> u32 {
    c ^ (d & (b ^ c))
}
#[inline]
fn h(b: u32, c: u32, d: u32) -> u32 {
    b ^ c ^ d
}
#[inline]
fn i(b: u32, c: u32, d: u32) -> u32 {
    c ^ (b | !d)
}

/// One MD5 step on every lane: `a = b + rotl(a + fun(b, c, d) + m + k, s)`.
macro_rules! step {
    ($fun:ident, $m:expr, $k:expr, $s:expr; $([$a:ident $b:ident $c:ident $d:ident])+) => {
        $(
            $a = $b.wrapping_add(
                $fun($b, $c, $d)
                    .wrapping_add($a)
                    .wrapping_add($m)
                    .wrapping_add($k)
                    .rotate_left($s),
            );
        )+
    };
}

/// Four steps, the registers rotating as RFC 1321 has them.
macro_rules! quad {
    ($fun:ident, $w:ident, [$i0:expr, $i1:expr, $i2:expr, $i3:expr],
     [$k0:expr, $k1:expr, $k2:expr, $k3:expr], [$s0:expr, $s1:expr, $s2:expr, $s3:expr];
     $([$a:ident $b:ident $c:ident $d:ident])+) => {
        step!($fun, $w[$i0], $k0, $s0; $([$a $b $c $d])+);
        step!($fun, $w[$i1], $k1, $s1; $([$d $a $b $c])+);
        step!($fun, $w[$i2], $k2, $s2; $([$c $d $a $b])+);
        step!($fun, $w[$i3], $k3, $s3; $([$b $c $d $a])+);
    };
}

/// The 64 steps of one block, for every lane (each lane its own registers).
macro_rules! rounds {
    ($w:ident; $($lane:tt)+) => {
        quad!(f, $w, [0, 1, 2, 3], [0xd76a_a478, 0xe8c7_b756, 0x2420_70db, 0xc1bd_ceee], [7, 12, 17, 22]; $($lane)+);
        quad!(f, $w, [4, 5, 6, 7], [0xf57c_0faf, 0x4787_c62a, 0xa830_4613, 0xfd46_9501], [7, 12, 17, 22]; $($lane)+);
        quad!(f, $w, [8, 9, 10, 11], [0x6980_98d8, 0x8b44_f7af, 0xffff_5bb1, 0x895c_d7be], [7, 12, 17, 22]; $($lane)+);
        quad!(f, $w, [12, 13, 14, 15], [0x6b90_1122, 0xfd98_7193, 0xa679_438e, 0x49b4_0821], [7, 12, 17, 22]; $($lane)+);
        quad!(g, $w, [1, 6, 11, 0], [0xf61e_2562, 0xc040_b340, 0x265e_5a51, 0xe9b6_c7aa], [5, 9, 14, 20]; $($lane)+);
        quad!(g, $w, [5, 10, 15, 4], [0xd62f_105d, 0x0244_1453, 0xd8a1_e681, 0xe7d3_fbc8], [5, 9, 14, 20]; $($lane)+);
        quad!(g, $w, [9, 14, 3, 8], [0x21e1_cde6, 0xc337_07d6, 0xf4d5_0d87, 0x455a_14ed], [5, 9, 14, 20]; $($lane)+);
        quad!(g, $w, [13, 2, 7, 12], [0xa9e3_e905, 0xfcef_a3f8, 0x676f_02d9, 0x8d2a_4c8a], [5, 9, 14, 20]; $($lane)+);
        quad!(h, $w, [5, 8, 11, 14], [0xfffa_3942, 0x8771_f681, 0x6d9d_6122, 0xfde5_380c], [4, 11, 16, 23]; $($lane)+);
        quad!(h, $w, [1, 4, 7, 10], [0xa4be_ea44, 0x4bde_cfa9, 0xf6bb_4b60, 0xbebf_bc70], [4, 11, 16, 23]; $($lane)+);
        quad!(h, $w, [13, 0, 3, 6], [0x289b_7ec6, 0xeaa1_27fa, 0xd4ef_3085, 0x0488_1d05], [4, 11, 16, 23]; $($lane)+);
        quad!(h, $w, [9, 12, 15, 2], [0xd9d4_d039, 0xe6db_99e5, 0x1fa2_7cf8, 0xc4ac_5665], [4, 11, 16, 23]; $($lane)+);
        quad!(i, $w, [0, 7, 14, 5], [0xf429_2244, 0x432a_ff97, 0xab94_23a7, 0xfc93_a039], [6, 10, 15, 21]; $($lane)+);
        quad!(i, $w, [12, 3, 10, 1], [0x655b_59c3, 0x8f0c_cc92, 0xffef_f47d, 0x8584_5dd1], [6, 10, 15, 21]; $($lane)+);
        quad!(i, $w, [8, 15, 6, 13], [0x6fa8_7e4f, 0xfe2c_e6e0, 0xa301_4314, 0x4e08_11a1], [6, 10, 15, 21]; $($lane)+);
        quad!(i, $w, [4, 11, 2, 9], [0xf753_7e82, 0xbd3a_f235, 0x2ad7_d2bb, 0xeb86_d391], [6, 10, 15, 21]; $($lane)+);
    };
}

#[inline]
fn words(block: &[u8]) -> [u32; 16] {
    let mut w = [0u32; 16];
    for (word, bytes) in w.iter_mut().zip(block.chunks_exact(4)) {
        *word = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    }
    w
}

/// Advance two MD5 states over the same blocks (`blocks.len()` a multiple of 64).
#[allow(clippy::many_single_char_names)] // RFC 1321's register names
fn compress2(x: &mut [u32; 4], y: &mut [u32; 4], blocks: &[u8]) {
    for block in blocks.chunks_exact(64) {
        let w = words(block);
        let [mut a0, mut b0, mut c0, mut d0] = *x;
        let [mut a1, mut b1, mut c1, mut d1] = *y;
        rounds!(w; [a0 b0 c0 d0] [a1 b1 c1 d1]);
        x[0] = x[0].wrapping_add(a0);
        x[1] = x[1].wrapping_add(b0);
        x[2] = x[2].wrapping_add(c0);
        x[3] = x[3].wrapping_add(d0);
        y[0] = y[0].wrapping_add(a1);
        y[1] = y[1].wrapping_add(b1);
        y[2] = y[2].wrapping_add(c1);
        y[3] = y[3].wrapping_add(d1);
    }
}

/// Advance one MD5 state (`blocks.len()` a multiple of 64).
#[allow(clippy::many_single_char_names)] // RFC 1321's register names
fn compress1(x: &mut [u32; 4], blocks: &[u8]) {
    for block in blocks.chunks_exact(64) {
        let w = words(block);
        let [mut a, mut b, mut c, mut d] = *x;
        rounds!(w; [a b c d]);
        x[0] = x[0].wrapping_add(a);
        x[1] = x[1].wrapping_add(b);
        x[2] = x[2].wrapping_add(c);
        x[3] = x[3].wrapping_add(d);
    }
}

/// Advance the whole's state, and the segment's when it shares the whole's blocks.
#[inline]
fn absorb(whole: &mut [u32; 4], twin: Option<&mut [u32; 4]>, blocks: &[u8]) {
    match twin {
        Some(t) => compress2(whole, t, blocks),
        None => compress1(whole, blocks),
    }
}

/// The digest of a state that has absorbed `len - tail.len()` bytes in whole blocks,
/// with `tail` (< 64 bytes) still to come.
fn finish(mut state: [u32; 4], tail: &[u8], len: u64) -> [u8; 16] {
    debug_assert!(tail.len() < 64);
    let mut last = [0u8; 128];
    last[..tail.len()].copy_from_slice(tail);
    last[tail.len()] = 0x80;
    let end = if tail.len() < 56 { 64 } else { 128 };
    last[end - 8..end].copy_from_slice(&len.wrapping_mul(8).to_le_bytes());
    compress1(&mut state, &last[..end]);
    let mut out = [0u8; 16];
    for (o, s) in out.chunks_exact_mut(4).zip(state) {
        o.copy_from_slice(&s.to_le_bytes());
    }
    out
}

/// The running MD5 of a whole stream that also gives the MD5 of parts of it: of one
/// call ([`Md5Parts::part`]) or of a segment spanning several calls
/// ([`Md5Parts::begin_segment`] … [`Md5Parts::end_segment`]).
///
/// ```
/// use labrelay::hash::Md5Parts;
/// let mut h = Md5Parts::new();
/// let first = h.part(&[b'a'; 64]);
/// let second = h.part(b"abc");
/// assert_eq!(hex::encode(second), "900150983cd24fb0d6963f7d28e17f72");
/// let whole = h.finalize(); // the MD5 of 64 × "a" followed by "abc"
/// # let _ = (first, whole);
/// ```
#[derive(Clone)]
pub struct Md5Parts {
    whole: [u32; 4],
    /// Bytes not yet absorbed into `whole` (< 64).
    buf: [u8; 64],
    buf_len: usize,
    total: u64,
    segment: Option<Segment>,
}

/// An open segment: hashed alongside the whole when it started on a block boundary
/// (it then shares the whole's blocks and buffered tail), separately otherwise.
#[derive(Clone)]
enum Segment {
    Twin { state: [u32; 4], len: u64 },
    Plain(Md5),
}

impl Default for Md5Parts {
    fn default() -> Self {
        Md5Parts::new()
    }
}

impl std::fmt::Debug for Md5Parts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Md5Parts")
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

impl Md5Parts {
    /// An empty stream.
    pub fn new() -> Md5Parts {
        Md5Parts {
            whole: IV,
            buf: [0; 64],
            buf_len: 0,
            total: 0,
            segment: None,
        }
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Whether nothing was fed yet.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Feed bytes (to the whole and to the open segment, if any).
    pub fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        let mut twin = match &mut self.segment {
            Some(Segment::Twin { state, len }) => {
                *len += data.len() as u64;
                Some(state)
            }
            Some(Segment::Plain(md5)) => {
                md5.update(data);
                None
            }
            None => None,
        };
        if self.buf_len > 0 {
            let take = (64 - self.buf_len).min(data.len());
            self.buf[self.buf_len..self.buf_len + take].copy_from_slice(&data[..take]);
            self.buf_len += take;
            data = &data[take..];
            if self.buf_len < 64 {
                return;
            }
            let block = self.buf;
            absorb(&mut self.whole, twin.as_deref_mut(), &block);
            self.buf_len = 0;
        }
        let full = data.len() / 64 * 64;
        absorb(&mut self.whole, twin, &data[..full]);
        let rest = &data[full..];
        self.buf[..rest.len()].copy_from_slice(rest);
        self.buf_len = rest.len();
    }

    /// Start a segment at the current position (ending an open one). Segments that
    /// start on a 64-byte boundary are hashed in the same pass as the whole.
    pub fn begin_segment(&mut self) {
        self.segment = Some(if self.buf_len == 0 {
            Segment::Twin { state: IV, len: 0 }
        } else {
            Segment::Plain(Md5::new())
        });
    }

    /// End the open segment and return its MD5 (that of no bytes if none is open).
    pub fn end_segment(&mut self) -> [u8; 16] {
        match self.segment.take() {
            // Begun with an empty buffer: everything buffered now is the segment's.
            Some(Segment::Twin { state, len }) => finish(state, &self.buf[..self.buf_len], len),
            Some(Segment::Plain(md5)) => md5.finalize().into(),
            None => Md5::digest([]).into(),
        }
    }

    /// Feed one part and return its MD5 (a segment of one call). When the stream so far
    /// is a whole number of 64-byte blocks (always, for parts of a fixed size from 64
    /// bytes up) both hashes are computed in one pass.
    pub fn part(&mut self, data: &[u8]) -> [u8; 16] {
        self.begin_segment();
        self.update(data);
        self.end_segment()
    }

    /// The MD5 of everything fed.
    pub fn finalize(self) -> [u8; 16] {
        finish(self.whole, &self.buf[..self.buf_len], self.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, RngCore, SeedableRng};

    fn md5(data: &[u8]) -> [u8; 16] {
        Md5::digest(data).into()
    }

    #[test]
    fn rfc1321_vectors() {
        for (input, want) in [
            ("", "d41d8cd98f00b204e9800998ecf8427e"),
            ("a", "0cc175b9c0f1b6a831c399e269772661"),
            ("abc", "900150983cd24fb0d6963f7d28e17f72"),
            ("message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
            (
                "12345678901234567890123456789012345678901234567890123456789012345678901234567890",
                "57edf4a22be3c955ac49da2e2107b67a",
            ),
        ] {
            let mut h = Md5Parts::new();
            assert_eq!(
                hex::encode(h.part(input.as_bytes())),
                want,
                "part {input:?}"
            );
            assert_eq!(hex::encode(h.finalize()), want, "whole {input:?}");
        }
    }

    #[test]
    fn whole_and_parts_match_md5_for_any_split() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut data = vec![0u8; 300_000];
        rng.fill_bytes(&mut data);
        // Block-aligned parts (the fast path), unaligned parts (the fallback), sizes
        // around the padding boundaries, and plain updates in between.
        for round in 0..200 {
            let len = rng.random_range(0..data.len());
            let data = &data[..len];
            let mut h = Md5Parts::new();
            let mut at = 0;
            while at < len {
                let n = match round % 4 {
                    0 => 64 * rng.random_range(1..200),
                    1 => rng.random_range(1..5000),
                    2 => *[55, 56, 57, 63, 64, 65, 119, 120, 128]
                        .get(rng.random_range(0..9))
                        .unwrap_or(&1),
                    _ => 8192,
                }
                .min(len - at);
                let piece = &data[at..at + n];
                if rng.random_bool(0.8) {
                    assert_eq!(h.part(piece), md5(piece), "round {round}: part at {at}+{n}");
                } else {
                    h.update(piece);
                }
                at += n;
                assert_eq!(h.len(), at as u64);
            }
            assert_eq!(h.finalize(), md5(data), "round {round}: whole of {len}");
        }
    }

    #[test]
    fn segments_spanning_several_updates_match_md5() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut data = vec![0u8; 200_000];
        rng.fill_bytes(&mut data);
        for round in 0..100 {
            let mut h = Md5Parts::new();
            // Segments of random length (aligned or not), each fed in random pieces,
            // with stretches outside any segment between them.
            let mut at = 0;
            while at < data.len() {
                let seg_len = if round % 2 == 0 {
                    64 * rng.random_range(1..400)
                } else {
                    rng.random_range(1..20_000)
                }
                .min(data.len() - at);
                let gap = rng.random_range(0..3) * rng.random_range(0..300);
                let gap = gap.min(data.len() - at - seg_len);
                h.begin_segment();
                let mut fed = 0;
                while fed < seg_len {
                    let n = rng.random_range(1..=4096).min(seg_len - fed);
                    h.update(&data[at + fed..at + fed + n]);
                    fed += n;
                }
                assert_eq!(
                    h.end_segment(),
                    md5(&data[at..at + seg_len]),
                    "round {round}: segment at {at}+{seg_len}"
                );
                h.update(&data[at + seg_len..at + seg_len + gap]);
                at += seg_len + gap;
            }
            assert_eq!(h.finalize(), md5(&data), "round {round}: whole");
        }
    }
}
