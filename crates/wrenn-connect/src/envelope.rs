//! Connect streaming envelopes: `[flags: u8][length: u32 big-endian][payload]`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The payload is compressed with the stream's `Connect-Content-Encoding`.
pub const FLAG_COMPRESSED: u8 = 0x01;
/// The envelope is the end-of-stream message (always JSON).
pub const FLAG_END_STREAM: u8 = 0x02;

const HEADER_LEN: usize = 5;

/// Frames one envelope.
pub fn encode(flags: u8, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(HEADER_LEN + payload.len());
    buf.put_u8(flags);
    buf.put_u32(u32::try_from(payload.len()).expect("envelope payload under 4 GiB"));
    buf.put_slice(payload);
    buf.freeze()
}

/// One decoded envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub flags: u8,
    pub payload: Bytes,
}

/// Why a byte stream is not a valid sequence of envelopes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("message of {size} bytes is larger than the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("stream ended inside an envelope ({0} bytes left over)")]
    Truncated(usize),
}

/// Incremental decoder: feed it body chunks, take out whole envelopes.
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    limit: usize,
}

impl Decoder {
    pub fn new(limit: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            limit,
        }
    }

    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next whole envelope, `Ok(None)` when more bytes are needed.
    pub fn next_envelope(&mut self) -> Result<Option<Envelope>, EnvelopeError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let size =
            u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if size > self.limit {
            return Err(EnvelopeError::TooLarge {
                size,
                limit: self.limit,
            });
        }
        if self.buf.len() < HEADER_LEN + size {
            return Ok(None);
        }
        let flags = self.buf.get_u8();
        self.buf.advance(4);
        let payload = self.buf.split_to(size).freeze();
        Ok(Some(Envelope { flags, payload }))
    }

    /// Call at end of input: leftover bytes mean a truncated envelope.
    pub fn finish(&self) -> Result<(), EnvelopeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(EnvelopeError::Truncated(self.buf.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_across_chunk_boundaries() {
        let mut wire = encode(0, b"hello").to_vec();
        wire.extend_from_slice(&encode(FLAG_END_STREAM, b"{}"));
        let mut d = Decoder::new(1024);
        let mut got = Vec::new();
        for byte in wire {
            d.push(&[byte]);
            while let Some(e) = d.next_envelope().unwrap() {
                got.push(e);
            }
        }
        d.finish().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(&got[0].payload[..], b"hello");
        assert_eq!(got[1].flags, FLAG_END_STREAM);
    }

    #[test]
    fn oversized_and_truncated_envelopes_are_errors() {
        let mut d = Decoder::new(4);
        d.push(&encode(0, b"12345"));
        assert_eq!(
            d.next_envelope(),
            Err(EnvelopeError::TooLarge { size: 5, limit: 4 })
        );

        let mut d = Decoder::new(1024);
        d.push(&encode(0, b"12345")[..7]);
        assert_eq!(d.next_envelope(), Ok(None));
        assert_eq!(d.finish(), Err(EnvelopeError::Truncated(7)));
    }
}
