//! The control socket's file: binding it (mode 0600, stale-socket replacement, never stealing a
//! live one), removing it when dropped (only if it is still ours), and the server's error enum
//! (binding, and setting up the event loop).

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Errors setting up or running the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A VMM is serving on this socket.
    #[error("--api-socket {0}: a running VMM is serving on this socket; choose another path or stop that VMM")]
    InUse(PathBuf),
    /// The path exists and is not a socket: never removed.
    #[error("--api-socket {0}: the path exists and is not a socket (not removed)")]
    NotASocket(PathBuf),
    /// Checking an existing socket failed.
    #[error("--api-socket {path}: cannot check the existing socket: {source}")]
    Probe {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Binding failed.
    #[error("--api-socket {path}: cannot create the socket: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The event loop could not be set up.
    #[error("control socket event loop: {0}")]
    EventLoop(String),
}

/// The bound control socket. Dropping it removes the socket file (if it is still ours).
pub struct ApiSocket {
    listener: UnixListener,
    path: PathBuf,
    /// (st_dev, st_ino) of the socket file we created.
    identity: Option<(u64, u64)>,
}

impl ApiSocket {
    /// Binds a Unix stream socket at `path`, mode 0600. A socket file nobody serves (a dead
    /// VMM's) is replaced; one a live process accepts on is left alone ([`ServerError::InUse`]);
    /// anything that is not a socket is never touched.
    pub fn bind(path: &Path) -> Result<Self, ServerError> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(ServerError::NotASocket(path.to_path_buf()))
            }
            Ok(_) => match UnixStream::connect(path) {
                Ok(_) => return Err(ServerError::InUse(path.to_path_buf())),
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    tracing::info!("replacing stale control socket {}", path.display());
                    if let Err(e) = std::fs::remove_file(path) {
                        if e.kind() != ErrorKind::NotFound {
                            return Err(ServerError::Probe {
                                path: path.to_path_buf(),
                                source: e,
                            });
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ServerError::Probe {
                        path: path.to_path_buf(),
                        source: e,
                    })
                }
            },
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                return Err(ServerError::Probe {
                    path: path.to_path_buf(),
                    source: e,
                })
            }
        }
        let bind_err = |source| ServerError::Bind {
            path: path.to_path_buf(),
            source,
        };
        // The socket is created 0600 (umask), so no other user can connect even briefly. The
        // mask is process-wide: `vmm run` binds before the VM's threads start.
        // SAFETY: umask only swaps the process's file-creation mask.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(bind_err)?;
        let mut socket = ApiSocket {
            listener,
            path: path.to_path_buf(),
            identity: None,
        };
        let meta = std::fs::symlink_metadata(path).map_err(bind_err)?;
        socket.identity = Some((meta.dev(), meta.ino()));
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        socket.listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(socket)
    }

    /// The listening socket (non-blocking), for the event loop.
    pub(super) fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        // Only remove the file if it is still the socket we created.
        let ours = std::fs::symlink_metadata(&self.path)
            .map(|m| Some((m.dev(), m.ino())) == self.identity)
            .unwrap_or(false);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn bind_is_private_and_removed_on_drop() {
        let d = dir("bind");
        let path = d.join("s");
        let socket = ApiSocket::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A live socket is not stolen.
        assert!(matches!(ApiSocket::bind(&path), Err(ServerError::InUse(_))));
        drop(socket);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn stale_sockets_are_replaced_other_files_never() {
        let d = dir("stale");
        let path = d.join("s");
        drop(UnixListener::bind(&path).unwrap());
        let socket = ApiSocket::bind(&path).expect("a stale socket is replaced");
        drop(socket);
        let file = d.join("f");
        std::fs::write(&file, "x").unwrap();
        assert!(matches!(
            ApiSocket::bind(&file),
            Err(ServerError::NotASocket(_))
        ));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn drop_leaves_a_successor_socket_alone() {
        let d = dir("successor");
        let path = d.join("s");
        let socket = ApiSocket::bind(&path).unwrap();
        // Someone replaced the file (e.g. removed it and bound their own).
        std::fs::remove_file(&path).unwrap();
        let other = UnixListener::bind(&path).unwrap();
        drop(socket);
        assert!(path.exists(), "not ours: kept");
        drop(other);
        let _ = std::fs::remove_dir_all(&d);
    }
}
