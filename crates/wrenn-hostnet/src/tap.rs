//! Persistent tap devices, as `ip tuntap add <name> mode tap` makes them. The kernel creates
//! tun/tap devices only through `/dev/net/tun` (rtnetlink refuses `tun` links), so this is an
//! ioctl; the device belongs to the network namespace of the thread that opens the file.

use std::io;
use std::os::fd::AsRawFd;

/// Creates tap `name` in the calling thread's network namespace, without packet information
/// headers and persistent, so it outlives this call until QEMU attaches to it.
pub(crate) fn create_tap(name: &str) -> io::Result<()> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: `ifreq` is plain old data (a name and a union of integers and addresses), for
    // which all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    // TUN_EXCL: fail rather than attach to an existing device of that name.
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_TUN_EXCL) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `ifreq`, which `req` is, for the whole call; the
    // name is NUL-terminated (shorter than IFNAMSIZ, the rest zeroes).
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &raw mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETPERSIST takes its argument by value; no memory is shared.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // Closing `tun` leaves the persistent device behind.
    Ok(())
}

/// What a child process needs to attach to an existing tap: its name, NUL-padded, checked
/// before the fork.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttachRequest {
    name: [libc::c_char; libc::IFNAMSIZ],
}

/// Checks `name` and prepares [`attach_to_fd`].
pub(crate) fn attach_request(name: &str) -> io::Result<AttachRequest> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    let mut req = AttachRequest {
        name: [0; libc::IFNAMSIZ],
    };
    for (slot, byte) in req.name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    Ok(req)
}

/// Opens `/dev/net/tun`, attaches it to the tap of `req` in the calling thread's namespace (as
/// QEMU does: no packet information, virtio-net headers) and moves it to descriptor `fd`,
/// which stays open across exec. Only syscalls: callable between fork and exec.
pub(crate) fn attach_to_fd(req: &AttachRequest, fd: std::os::fd::RawFd) -> io::Result<()> {
    // SAFETY: a NUL-terminated literal path; the flags make no other demands.
    let tun = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if tun < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `ifreq` is plain old data, for which all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    ifr.ifr_name = req.name;
    ifr.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `ifreq` for the call; the name is NUL-terminated.
    // dup2 and close act on descriptors only.
    unsafe {
        if libc::ioctl(tun, libc::TUNSETIFF, &raw mut ifr) < 0
            || (tun != fd && libc::dup2(tun, fd) < 0)
        {
            let e = io::Error::last_os_error();
            libc::close(tun);
            return Err(e);
        }
        if tun != fd {
            libc::close(tun);
        } else {
            // Opened with O_CLOEXEC: keep it across exec.
            libc::fcntl(fd, libc::F_SETFD, 0);
        }
    }
    Ok(())
}
