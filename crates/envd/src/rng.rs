//! Reseeding the guest's RNG after a snapshot restore.
//!
//! Every sandbox restored from one memory snapshot starts with the same kernel RNG state.
//! vmgenid (where the kernel has it) makes the kernel reseed, but leaves a window, and
//! bookworm's 6.1 cloud kernel lacks it; so the host sends fresh entropy with `/init` and envd
//! credits it to the input pool (`RNDADDENTROPY`) and forces the CRNG to reseed from it
//! (`RNDRESEEDCRNG`), before any user code runs again.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

/// `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Why the RNG could not be reseeded.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("open /dev/random")]
    Open(#[source] std::io::Error),
    #[error("RNDADDENTROPY")]
    AddEntropy(#[source] std::io::Error),
    #[error("RNDRESEEDCRNG")]
    Reseed(#[source] std::io::Error),
    #[error("entropy must be 16 to 4096 bytes, got {0}")]
    BadLength(usize),
}

/// Mixes `entropy` into the kernel's input pool, credits it, and reseeds the CRNG from it.
pub fn reseed(entropy: &[u8]) -> Result<(), RngError> {
    if !(16..=4096).contains(&entropy.len()) {
        return Err(RngError::BadLength(entropy.len()));
    }
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let words = entropy.len().div_ceil(4);
    let mut info = vec![0u32; 2 + words];
    info[0] = (entropy.len() * 8) as u32;
    info[1] = entropy.len() as u32;
    for (i, chunk) in entropy.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(w);
    }
    let random = OpenOptions::new()
        .write(true)
        .open("/dev/random")
        .map_err(RngError::Open)?;
    // SAFETY: `info` is a live, properly aligned rand_pool_info whose buf_size matches the
    // bytes that follow the header; the kernel only reads it.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if rc != 0 {
        return Err(RngError::AddEntropy(std::io::Error::last_os_error()));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) };
    if rc != 0 {
        return Err(RngError::Reseed(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_too_little_or_too_much_entropy() {
        assert!(matches!(reseed(&[0; 8]), Err(RngError::BadLength(8))));
        assert!(matches!(
            reseed(&vec![0; 5000]),
            Err(RngError::BadLength(5000))
        ));
    }
}
