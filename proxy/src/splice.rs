//! Zero-copy relaying for tunnels on Linux: bytes move socket → pipe → socket with
//! `splice(2)` and never enter user space. A direction borrows a pipe from a per-thread
//! pool while bytes flow; readiness comes from tokio, so a direction waits without a thread.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// The pipe capacity asked for: four times the default, so a busy direction moves a quarter
/// as many splice calls per byte. Pipes are held only while bytes flow, so idle tunnels pay
/// nothing; if the kernel refuses (the per-user pipe limit), the pipe keeps its default size.
const PIPE_SIZE: usize = 256 * 1024;

/// How much one splice call moves at most: a pipe's capacity bounds it anyway.
const CHUNK: usize = PIPE_SIZE;

/// A non-blocking pipe that carries one direction of a tunnel.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: `write` is an open pipe descriptor; F_SETPIPE_SZ takes an int size. A
        // failure leaves the pipe as it was, which still works, so the result is not needed.
        unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            )
        };
        Ok(Pipe { read, write })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call; null offsets mean
    // "use the file position", which is what sockets and pipes require.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Pipes kept per worker thread for the next burst; more than this are closed.
const POOL_MAX: usize = 64;

thread_local! {
    /// Empty pipes ready for reuse. Per thread, so taking one needs no lock.
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

fn take_pipe() -> io::Result<Pipe> {
    match POOL.with(|pool| pool.borrow_mut().pop()) {
        Some(pipe) => Ok(pipe),
        None => Pipe::new(),
    }
}

/// Returns an empty pipe to this thread's pool.
fn give_back(pipe: Pipe) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL_MAX {
            pool.push(pipe);
        }
    });
}

/// Moves bytes from `src` to `dst` through a pipe until `src` reaches end of stream, then
/// shuts down the write side of `dst`. Adds every byte moved to `moved`.
///
/// A pipe is held only while bytes flow: when `src` has nothing more to read, the (drained)
/// pipe goes back to the pool, so thousands of idle tunnels hold only their two sockets. A
/// pipe is always drained before the next read, so a full pipe never looks like an idle
/// socket, and a pipe that failed mid-transfer is closed, never reused.
pub async fn relay(src: &TcpStream, dst: &TcpStream, moved: &AtomicU64) -> io::Result<()> {
    let mut held: Option<Pipe> = None;
    loop {
        if held.is_none() {
            src.readable().await?;
        }
        let pipe = match held.take() {
            Some(pipe) => pipe,
            None => take_pipe()?,
        };
        let n = match src.try_io(Interest::READABLE, || {
            splice(src.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK)
        }) {
            Ok(0) => {
                give_back(pipe);
                // End of stream: pass the half-close on so the other side sees it too.
                let _ = socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write);
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                give_back(pipe);
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), left)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        moved.fetch_add(n as u64, Ordering::Relaxed);
        held = Some(pipe);
    }
}
