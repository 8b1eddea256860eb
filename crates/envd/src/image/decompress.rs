//! The layer stream's compression: gzip (flate2), zstd (ruzstd, pure Rust, so the static guest
//! build links no C library) or none, named or detected from the first bytes.

use std::io::{self, BufRead, BufReader, Read};

use ruzstd::decoding::FrameDecoder;
use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};

/// How a layer is compressed (`--compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    /// Detect from the magic bytes.
    Auto,
    Gzip,
    Zstd,
    /// A plain tar.
    None,
}

/// Why the layer stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DecompressError {
    #[error("read the layer's first bytes")]
    Peek(#[source] io::Error),
    #[error("open the zstd stream")]
    Zstd(#[source] FrameDecoderError),
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// What the first bytes of a stream say it is: gzip, zstd, or (anything else) a plain tar.
pub(super) fn detect(magic: &[u8]) -> Compression {
    if magic.starts_with(&ZSTD_MAGIC) {
        Compression::Zstd
    } else if magic.starts_with(&GZIP_MAGIC) {
        Compression::Gzip
    } else {
        Compression::None
    }
}

/// Wraps `input` in the decoder `compression` names (or, for `Auto`, its magic bytes say).
pub(super) fn open<'a, R: Read + 'a>(
    mut input: R,
    compression: Compression,
) -> Result<Box<dyn Read + 'a>, DecompressError> {
    // Read the magic bytes whole (a pipe may deliver fewer per read), then put them back.
    let mut magic = Vec::with_capacity(ZSTD_MAGIC.len());
    (&mut input)
        .take(ZSTD_MAGIC.len() as u64)
        .read_to_end(&mut magic)
        .map_err(DecompressError::Peek)?;
    let compression = match compression {
        Compression::Auto => detect(&magic),
        named => named,
    };
    let input = BufReader::with_capacity(1 << 20, io::Cursor::new(magic).chain(input));
    Ok(match compression {
        // Multi-member: concatenated gzip members are one stream (estargz layers are built so).
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
        Compression::Zstd => Box::new(ZstdFrames::new(input)?),
        Compression::None | Compression::Auto => Box::new(input),
    })
}

/// A zstd stream of any number of frames (skippable ones skipped), each checked against its
/// content checksum when it has one. ruzstd's `StreamingDecoder` reads only one frame, and
/// `zstd:chunked` layers are many.
struct ZstdFrames<R: BufRead> {
    source: R,
    decoder: FrameDecoder,
    in_frame: bool,
}

impl<R: BufRead> ZstdFrames<R> {
    fn new(mut source: R) -> Result<Self, DecompressError> {
        let mut decoder = FrameDecoder::new();
        decoder.init(&mut source).map_err(DecompressError::Zstd)?;
        Ok(ZstdFrames {
            source,
            decoder,
            in_frame: true,
        })
    }

    /// Starts the next data frame; false at the end of the stream.
    fn next_frame(&mut self) -> io::Result<bool> {
        loop {
            if self.source.fill_buf()?.is_empty() {
                return Ok(false);
            }
            match self.decoder.reset(&mut self.source) {
                Ok(()) => return Ok(true),
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                    length,
                    ..
                })) => {
                    let skipped =
                        io::copy(&mut (&mut self.source).take(length.into()), &mut io::sink())?;
                    if skipped != u64::from(length) {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "zstd stream ends inside a skippable frame",
                        ));
                    }
                }
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
        }
    }

    fn check_frame_checksum(&self) -> io::Result<()> {
        match (
            self.decoder.get_checksum_from_data(),
            self.decoder.get_calculated_checksum(),
        ) {
            (Some(stored), Some(computed)) if stored != computed => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "zstd frame checksum mismatch",
            )),
            _ => Ok(()),
        }
    }
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.in_frame {
                if !self.next_frame()? {
                    return Ok(0);
                }
                self.in_frame = true;
            }
            while self.decoder.can_collect() == 0 && !self.decoder.is_finished() {
                self.decoder
                    .decode_blocks(
                        &mut self.source,
                        ruzstd::decoding::BlockDecodingStrategy::UptoBlocks(1),
                    )
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            }
            let n = self.decoder.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            // Finished and drained: this frame is done.
            self.check_frame_checksum()?;
            self.in_frame = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(mut r: impl Read) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        r.read_to_end(&mut out)?;
        Ok(out)
    }

    fn zstd(data: &[u8]) -> Vec<u8> {
        ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
    }

    #[test]
    fn detects_by_magic() {
        assert_eq!(detect(&[0x1f, 0x8b, 8, 0]), Compression::Gzip);
        assert_eq!(detect(&ZSTD_MAGIC), Compression::Zstd);
        assert_eq!(detect(b"etc/"), Compression::None);
        assert_eq!(detect(&[0x28, 0xb5]), Compression::None);
        assert_eq!(detect(&[]), Compression::None);
    }

    #[test]
    fn auto_opens_each_kind() {
        let data = b"hello layer".repeat(1000);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &data).unwrap();
        let gz = gz.finish().unwrap();
        for input in [gz, zstd(&data), data.clone()] {
            let out = read_all(open(&input[..], Compression::Auto).unwrap()).unwrap();
            assert_eq!(out, data);
        }
    }

    #[test]
    fn zstd_reads_every_frame_and_skips_skippable_ones() {
        let mut input = zstd(b"first frame, ");
        // A skippable frame: magic 0x184D2A50..5F, a little-endian length, then that many bytes.
        input.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 9, 9, 9]);
        input.extend(zstd(b"second frame"));
        let out = read_all(open(&input[..], Compression::Zstd).unwrap()).unwrap();
        assert_eq!(out, b"first frame, second frame");
    }

    #[test]
    fn corrupt_zstd_is_an_error_not_a_short_stream() {
        let mut input = zstd(&b"some data that compresses ".repeat(100));
        let len = input.len();
        input.truncate(len - 3);
        if let Ok(reader) = open(&input[..], Compression::Zstd) {
            assert!(read_all(reader).is_err());
        }
    }
}
