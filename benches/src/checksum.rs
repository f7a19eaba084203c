//! The payload checksum every benchmark computes, so that each byte is provably written and read.
//!
//! A sender fills each message with one byte value (`ptr::write_bytes`, i.e. memset: the cheapest
//! way to write every byte); the receiver reads every byte with [`sum`]. Both sides accumulate
//! checksums and the parent compares them when the case ends, so a benchmark that skipped or tore
//! a payload fails instead of reporting a number.

/// Wrapping sum of `bytes` read as little-endian `u64` words, plus the trailing bytes one by one.
///
/// Reads every byte. Word-wise so that it runs near load bandwidth (the compiler vectorises it):
/// a byte-wise sum would make the large-message cases measure the checksum, not the transfer.
#[inline]
pub fn sum(bytes: &[u8]) -> u64 {
    let mut words = bytes.chunks_exact(8);
    let mut acc = 0u64;
    for w in &mut words {
        let mut le = [0u8; 8];
        le.copy_from_slice(w);
        acc = acc.wrapping_add(u64::from_le_bytes(le));
    }
    for &b in words.remainder() {
        acc = acc.wrapping_add(u64::from(b));
    }
    acc
}

/// What [`sum`] returns for `len` bytes all equal to `byte`, without touching memory.
#[inline]
pub fn pattern_sum(byte: u8, len: usize) -> u64 {
    let word = u64::from(byte).wrapping_mul(0x0101_0101_0101_0101);
    (len as u64 / 8)
        .wrapping_mul(word)
        .wrapping_add((len as u64 % 8).wrapping_mul(u64::from(byte)))
}

/// The byte a sender writes into message number `seq` (so consecutive messages differ).
#[inline]
pub fn pattern_byte(seq: u64, salt: u8) -> u8 {
    (seq as u8) ^ salt
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_sum_matches_sum() {
        for len in [0usize, 1, 7, 8, 9, 56, 64, 100, 4096, 65536] {
            for byte in [0u8, 1, 0x5a, 0xff] {
                let buf = vec![byte; len];
                assert_eq!(sum(&buf), pattern_sum(byte, len), "len {len} byte {byte}");
            }
        }
    }

    #[test]
    fn sum_sees_every_byte() {
        let mut buf = vec![0u8; 4099];
        for i in 0..buf.len() {
            buf[i] = 1;
            assert_ne!(sum(&buf), 0, "byte {i} not read");
            buf[i] = 0;
        }
    }
}
