//! What the end-to-end tests of several crates share: running the real
//! tools that judge dmm's results (qemu-io, rsync, pjdfstest, fsx, fio...),
//! a fault-injecting source and small file systems that fill up.
//! A tool that is missing fails the test: the README's test command
//! installs them all, and a test that skips is a test that cannot fail.

use std::process::{Command, Output};

mod etcd;
mod faulty;
mod loop_mount;
mod netns;
mod records;

pub use etcd::{Etcd, EtcdMember};
pub use faulty::FaultySource;
pub use loop_mount::LoopMount;
pub use netns::{Network, enter_namespace};
pub use records::{record, records, records_writer, tail_follow};

/// A command running `name`, which must be installed.
pub fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()));
    assert!(
        found,
        "{name} is not installed; run scripts/test, which installs it"
    );
    Command::new(name)
}

/// A port of 127.0.0.1 that was free a moment ago, for a server the test
/// starts.
pub fn free_loopback_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    probe.local_addr().expect("a bound address").port()
}

/// Runs a command, failing the test with its output unless it succeeds.
pub fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The standard output of a command that must succeed.
pub fn stdout(command: &mut Command) -> String {
    String::from_utf8(run(command).stdout).expect("UTF-8 output")
}

/// The user and group id the tests run unprivileged commands as.
pub const NOBODY: u32 = 65534;

/// A command running `sh -c script` in `dir` as nobody (user and group
/// 65534, no other group), through util-linux's `setpriv`.
pub fn as_nobody(dir: &std::path::Path, script: &str) -> Command {
    let mut command = tool("setpriv");
    command
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .current_dir(dir);
    command
}

/// nbdkit serving `image` on the Unix socket `socket` through its cache
/// filter in writeback mode: killed, it loses the writes it acknowledged
/// and was not asked to flush, as a server with a write cache does in a
/// crash. Returns once the socket is there.
pub fn caching_nbdkit(socket: &std::path::Path, image: &std::path::Path) -> std::process::Child {
    let _ = std::fs::remove_file(socket);
    let child = tool("nbdkit")
        .args(["-f", "-U"])
        .arg(socket)
        .args(["--filter=cache", "file"])
        .arg(image)
        .args(["cache=writeback", "cache-on-read=false"])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("start nbdkit");
    let started = std::time::Instant::now();
    while !socket.exists() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "nbdkit did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child
}
