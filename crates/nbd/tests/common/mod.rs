//! Helpers shared by the NBD integration tests: an in-process dmm server,
//! external servers (qemu-nbd, nbdkit) as child processes, and a raw
//! protocol client for feeding the server bytes our real client never
//! sends.

#![allow(dead_code)]

pub mod raw;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use dmm_nbd::{Export, ExportTable, Server, ServerConfig};
use dmm_store::BlockStore;

/// A dmm server on a Unix socket in a temporary directory.
pub struct TestServer {
    pub server: Arc<Server>,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start(exports: Vec<Export>) -> TestServer {
        let table = Arc::new(ExportTable::new());
        for export in exports {
            table.insert(export).expect("unique export names");
        }
        let server = Arc::new(Server::new(table, ServerConfig::default()));
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("nbd.sock");
        let listener = dmm_nbd::bind_unix(&socket).expect("bind");
        let serving = server.clone();
        tokio::spawn(async move { serving.serve_unix(listener).await });
        TestServer {
            server,
            socket,
            _dir: dir,
        }
    }

    /// Serves one store as the default export named "disk".
    pub async fn single(store: Arc<dyn BlockStore>) -> TestServer {
        TestServer::start(vec![Export::new("disk", store)]).await
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }
}

/// A child process killed when dropped, with the directory it works in.
pub struct ChildGuard {
    child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ChildGuard {
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }
}

/// Starts an external NBD server (`program args…`, where the argument
/// `{socket}` is replaced by the socket path) and waits for its socket.
pub fn spawn_server(program: &str, args: &[&str], dir: tempfile::TempDir) -> ChildGuard {
    let socket = dir.path().join("server.sock");
    let args: Vec<String> = args
        .iter()
        .map(|a| a.replace("{socket}", &socket.display().to_string()))
        .collect();
    let child = Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{program} is required by this test (scripts/test installs it): {e}")
        });
    let guard = ChildGuard { child, dir, socket };
    wait_for_socket(&guard.socket);
    guard
}

pub fn wait_for_socket(path: &Path) {
    for _ in 0..200 {
        if path.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("{} did not appear", path.display());
}

/// Creates a sparse raw image of `size` bytes.
pub fn sparse_image(dir: &Path, size: u64) -> PathBuf {
    let path = dir.join("image.raw");
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(size))
        .expect("create image");
    path
}
