//! Pseudo-terminals: the master side envd keeps, read and written asynchronously.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, ReadBuf};

/// A terminal size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Size {
    pub(crate) cols: u16,
    pub(crate) rows: u16,
}

impl Size {
    /// The size a request asked for; values beyond what a terminal can hold are clamped.
    pub(crate) fn from_proto(size: Option<wrenn_proto::process::pty::Size>) -> Size {
        let size = size.unwrap_or_default();
        let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        Size {
            cols: clamp(size.cols),
            rows: clamp(size.rows),
        }
    }

    fn winsize(self) -> libc::winsize {
        libc::winsize {
            ws_row: self.rows,
            ws_col: self.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        }
    }
}

/// The master side of a PTY (shared by the output reader and input writers).
#[derive(Clone)]
pub(crate) struct Master(Arc<AsyncFd<OwnedFd>>);

/// Opens a PTY pair with the window size set. The slave goes to the child as its stdio.
pub(crate) fn open(size: Size) -> io::Result<(Master, OwnedFd)> {
    let pair = nix::pty::openpty(&size.winsize(), None)?;
    // Neither end may leak into other children; the slave reaches ours through dup2 onto 0-2,
    // which clears the flag on the copies.
    for fd in [&pair.master, &pair.slave] {
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    }
    let flags = OFlag::from_bits_truncate(fcntl(&pair.master, FcntlArg::F_GETFL)?);
    fcntl(&pair.master, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    // SAFETY: an `OwnedFd` is an open descriptor that stays open and the same until the
    // `AsyncFd` (its owner from here on) drops it.
    let master = unsafe { AsyncFd::register(pair.master) }?;
    Ok((Master(Arc::new(master)), pair.slave))
}

impl Master {
    /// Sets the window size; the kernel sends SIGWINCH to the terminal's foreground group.
    pub(crate) fn resize(&self, size: Size) -> io::Result<()> {
        let ws = size.winsize();
        // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, which points to a live,
        // initialized local; the fd is an open PTY master owned by `self`.
        let rc = unsafe { libc::ioctl(self.0.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Writes all of `data` as terminal input, waiting while the terminal's buffer is full.
    pub(crate) async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.0.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }

    /// A reader of the terminal's output.
    pub(crate) fn reader(&self) -> Reader {
        Reader(self.0.clone())
    }
}

/// Terminal output as an [`AsyncRead`]. `EIO` (every slave closed) reads as end of file.
pub(crate) struct Reader(Arc<AsyncFd<OwnedFd>>);

impl AsyncRead for Reader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard
                .try_io(|fd| nix::unistd::read(fd.get_ref(), unfilled).map_err(io::Error::from))
            {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {}
            }
        }
    }
}
