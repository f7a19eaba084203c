//! Bounds-checked little-endian cursors over a frame body. Private to the codec.

use super::{DecodeError, MsgType};

/// Reads a body front to back. Every read is checked against the body's end; running out
/// names the field that did not fit.
pub(super) struct Rd<'a> {
    body: &'a [u8],
    pos: usize,
    msg_type: MsgType,
}

impl<'a> Rd<'a> {
    pub(super) fn new(body: &'a [u8], msg_type: MsgType) -> Self {
        Rd {
            body,
            pos: 0,
            msg_type,
        }
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let rest = &self.body[self.pos..];
        if rest.len() < n {
            return Err(DecodeError::Truncated {
                msg_type: self.msg_type,
                field,
                needed: n,
                available: rest.len(),
            });
        }
        self.pos += n;
        Ok(&rest[..n])
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    pub(super) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(super) fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    pub(super) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    pub(super) fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// A u16 length, then that many bytes of UTF-8, at most `max` of them. The length is
    /// checked against `max` before the bytes are looked at.
    pub(super) fn str(&mut self, field: &'static str, max: usize) -> Result<&'a str, DecodeError> {
        let len = usize::from(self.u16(field)?);
        if len > max {
            return Err(DecodeError::StringTooLong { field, len, max });
        }
        let bytes = self.take(len, field)?;
        core::str::from_utf8(bytes).map_err(|e| DecodeError::BadUtf8 {
            field,
            valid_up_to: e.valid_up_to(),
        })
    }

    /// Everything left in the body (a payload). Borrowed, never copied.
    pub(super) fn rest(&mut self) -> &'a [u8] {
        let rest = &self.body[self.pos..];
        self.pos = self.body.len();
        rest
    }

    /// The rest of the body as UTF-8 (a STATS_REPLY chunk).
    pub(super) fn rest_str(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        core::str::from_utf8(self.rest()).map_err(|e| DecodeError::BadUtf8 {
            field,
            valid_up_to: e.valid_up_to(),
        })
    }

    /// Ends the body: bytes left over are an error, not ignored.
    pub(super) fn finish(self) -> Result<(), DecodeError> {
        let extra = self.body.len() - self.pos;
        if extra != 0 {
            return Err(DecodeError::TrailingBytes {
                msg_type: self.msg_type,
                extra,
            });
        }
        Ok(())
    }
}

/// Writes a frame into a buffer the caller sized with the frame's encoded length. Running past
/// the end is a bug in the length computation, not a peer fault, so it panics (loudly).
pub(super) struct Wr<'b> {
    buf: &'b mut [u8],
    pos: usize,
}

impl<'b> Wr<'b> {
    pub(super) fn new(buf: &'b mut [u8]) -> Self {
        Wr { buf, pos: 0 }
    }

    pub(super) fn bytes(&mut self, bytes: &[u8]) {
        let end = self.pos + bytes.len();
        self.buf[self.pos..end].copy_from_slice(bytes);
        self.pos = end;
    }

    pub(super) fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }

    pub(super) fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }

    pub(super) fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }

    pub(super) fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }

    /// A string whose length the caller already checked against its limit (and so fits a u16).
    pub(super) fn str(&mut self, s: &str) {
        debug_assert!(s.len() <= usize::from(u16::MAX));
        self.u16(s.len() as u16);
        self.bytes(s.as_bytes());
    }

    pub(super) fn pos(&self) -> usize {
        self.pos
    }
}
