//! The daemon and the management CLI, end to end: create → start → stat →
//! commit with fio writing through the export; kill -9 of the daemon while
//! several migrations run; concurrent CLI clients; the bad-input table; the
//! TCP API refusing requests without the token; `/metrics` scraped with
//! the token and read by the Prometheus client's own parser.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{DMM, Daemon, MIB, create_volume, image_with, path, run, scratch, source_image, tool};

#[test]
fn create_start_stat_commit_with_fio_writing_through_the_export() {
    let dir = scratch();
    let daemon = Daemon::start(&dir.path().join("state"), &[]);
    let (migid, _, target) = create_volume(
        &daemon,
        dir.path(),
        "",
        (48 * MIB, 7),
        &["rate=12M", "segsize=256K", "export=vm1"],
    );
    assert_eq!(migid, "1");
    let uri = daemon.export_uri("vm1");
    common::fio(&[
        "--name=daemon",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--offset=4M",
        "--size=16M",
        "--io_size=4M",
        "--randseed=5",
        "--iodepth=16",
        "--rate_iops=300",
        "--do_verify=1",
    ]);
    let stat = daemon.ok(&["stat", "1"]);
    assert!(stat.starts_with("1: "), "{stat}");
    daemon.wait_state("1", &["switched-over"], Duration::from_secs(60));
    let listed = daemon.ok(&["list"]);
    assert!(listed.contains("switched-over"), "{listed}");
    daemon.ok(&["commit", "1"]);
    assert_eq!(daemon.state_of("1"), "committed");
    let log = daemon.ok(&["log", "1"]);
    assert!(log.contains("committed"), "{log}");
    // fio's data is in the target image itself.
    common::fio(&[
        "--name=daemon",
        "--ioengine=psync",
        &format!("--filename={}", path(&target)),
        "--offset=4M",
        "--size=16M",
        "--io_size=4M",
        "--randseed=5",
        "--verify_only",
    ]);
    assert!(
        daemon.stop().success(),
        "SIGTERM stops the daemon with status 0"
    );
}

#[test]
fn kill_9_of_the_daemon_while_migrations_run_loses_nothing() {
    let dir = scratch();
    let state = dir.path().join("state");
    let daemon = Daemon::start(&state, &[]);
    let mut pairs = Vec::new();
    for (i, strategy) in ["lr", "mirror", "redirect", "auto"].iter().enumerate() {
        let strategy = format!("strategy={strategy}");
        let (_, source, target) = create_volume(
            &daemon,
            dir.path(),
            &i.to_string(),
            (32 * MIB, i as u8 * 40),
            &[&strategy, "rate=8M", "segsize=256K"],
        );
        pairs.push((source, target));
    }
    std::thread::sleep(Duration::from_millis(2500));
    // Write through one export while the daemon dies: nothing acknowledged
    // with FUA may be lost.
    let writes: Vec<String> = (0..8)
        .map(|k| format!("write -f -P {} {}M 64k", 200 + k, k * 3 + 1))
        .collect();
    let uri = daemon.export_uri("1");
    let mut qemu_io = tool("qemu-io");
    qemu_io.args(["-f", "raw"]);
    for write in &writes {
        qemu_io.args(["-c", write]);
    }
    run(qemu_io.arg(&uri));
    daemon.kill();

    let daemon = Daemon::start(&state, &[]);
    for migid in ["1", "2", "3", "4"] {
        daemon.wait_state(migid, &["switched-over"], Duration::from_secs(90));
        daemon.ok(&["commit", migid]);
    }
    let log = daemon.ok(&["log", "2"]);
    assert!(log.contains("daemon restart"), "{log}");
    assert!(daemon.stop().success());
    // The untouched volumes equal their sources; the written one has the
    // writes (and the rest of its source).
    for (source, target) in &pairs[1..] {
        run(Command::new(DMM).arg("verify").arg(source).arg(target));
        run(tool("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(source)
            .arg(target));
    }
    let checks: Vec<String> = (0..8)
        .map(|k| format!("read -P {} {}M 64k", 200 + k, k * 3 + 1))
        .collect();
    common::qemu_io_checks(
        path(&pairs[0].1),
        true,
        &checks,
        "FUA write lost across the daemon crash",
    );
}

#[test]
fn concurrent_cli_clients_all_get_answers() {
    let dir = scratch();
    let daemon = Daemon::start(&dir.path().join("state"), &[]);
    create_volume(&daemon, dir.path(), "", (32 * MIB, 3), &["rate=4M"]);
    let state = daemon.state.clone();
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let state = state.clone();
            std::thread::spawn(move || {
                for round in 0..10 {
                    let args: Vec<String> = match (i + round) % 4 {
                        0 => vec!["list".into()],
                        1 => vec!["stat".into(), "1".into()],
                        2 => vec!["get".into(), "-p".into(), "rate".into(), "1".into()],
                        _ => vec![
                            "set".into(),
                            "-p".into(),
                            format!("rate={}M", 4 + i),
                            "1".into(),
                        ],
                    };
                    let output = Command::new(DMM)
                        .arg("--state-dir")
                        .arg(&state)
                        .args(&args)
                        .output()
                        .unwrap();
                    assert!(
                        output.status.success(),
                        "{args:?}: {}",
                        String::from_utf8_lossy(&output.stderr)
                    );
                }
            })
        })
        .collect();
    for client in clients {
        client.join().expect("a CLI client failed");
    }
    let rate = daemon.json(&["get", "-p", "rate", "1"]);
    assert!(rate[0]["value"].as_str().unwrap().ends_with('M'));
}

#[test]
fn bad_input_is_refused_with_one_line_and_changes_nothing() {
    let dir = scratch();
    let state = dir.path().join("state");
    // Daemon not running.
    let output = Command::new(DMM)
        .arg("--state-dir")
        .arg(&state)
        .arg("list")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("not running") && stderr.trim().lines().count() == 1,
        "{stderr}"
    );

    let daemon = Daemon::start(&state, &[]);
    let source = source_image(dir.path(), "source.raw", 16 * MIB, 1);
    let target = image_with(dir.path(), "target.raw", 16 * MIB, &[]);
    let (src, tgt) = (
        format!("source={}", path(&source)),
        format!("target={}", path(&target)),
    );
    daemon.ok(&["create", "-h", "-p", &src, "-p", &tgt]);
    let before = daemon.ok(&["--json", "list"]);
    let onto_itself = format!("target={}", path(&source));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["create", "-p", &src, "-p", &tgt, "-p", "speed=9"],
            "unknown property",
        ),
        (
            vec!["create", "-p", &src, "-p", &tgt, "-p", "strategy=fast"],
            "precopy, mirror",
        ),
        (
            vec!["create", "-p", &src, "-p", &tgt, "-p", "segsize=3K"],
            "power of two",
        ),
        (vec!["create", "-p", &src], "missing property target"),
        (
            vec!["create", "-p", &src, "-p", "target=/nonexistent/x.raw"],
            "/nonexistent/x.raw",
        ),
        (vec!["create", "-p", &src, "-p", &onto_itself], "same file"),
        (vec!["set", "-p", "rate=fast", "1"], "not a size"),
        (vec!["set", "-p", "colour=blue", "1"], "unknown property"),
        (vec!["stat", "99"], "no migration 99"),
        (vec!["start", "abc"], "invalid value"),
        (vec!["pause", "1"], "pause is valid when running"),
        (vec!["commit", "1"], "verification passed"),
        (vec!["switchover", "1"], "switchover is valid when"),
        (vec!["halt", "1"], "--keep"),
        (vec!["get", "-p", "colour", "1"], "unknown property"),
    ];
    for (args, expected) in cases {
        let output = daemon.cli(&args);
        assert!(!output.status.success(), "{args:?} must fail");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let first = stderr.lines().next().unwrap_or_default();
        assert!(
            first.contains(expected),
            "{args:?}: the first line names the problem: {stderr}"
        );
    }
    assert_eq!(
        daemon.ok(&["--json", "list"]),
        before,
        "the catalog changed"
    );
    // The catalog is a plain SQLite file.
    let catalog = state.join("catalog.db");
    assert!(catalog.exists());
}

#[test]
fn the_tcp_api_needs_the_token() {
    let dir = scratch();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "correct-horse-battery-staple\n").unwrap();
    let address = format!("127.0.0.1:{}", dmm_testkit::free_loopback_port());
    let daemon = Daemon::start(
        &dir.path().join("state"),
        &["--listen", &address, "--token-file", path(&token_file)],
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        use dmm_daemon::{Client, ClientError, Endpoint};
        for token in ["", "wrong-token-wrong-token"] {
            let client = Client::new(Endpoint::Tcp {
                address: address.clone(),
                token: token.into(),
            });
            let refusals = [
                ("/api/migrations", client.list().await.err()),
                ("/api/openapi.json", client.openapi().await.err()),
                ("/api/health", client.health().await.err()),
            ];
            for (path, refused) in refusals {
                match refused {
                    Some(ClientError::Refused { status, .. }) => {
                        assert_eq!(status.as_u16(), 401, "{path}")
                    }
                    other => panic!("{path} with token {token:?}: {other:?}"),
                }
            }
        }
        let client = Client::new(Endpoint::Tcp {
            address: address.clone(),
            token: "correct-horse-battery-staple".into(),
        });
        let list = client.list().await.expect("authorized");
        assert!(list.is_empty());
        assert_eq!(client.health().await.unwrap().status, "ok");
        let spec = client.openapi().await.unwrap();
        assert_eq!(spec["openapi"], "3.1.0");
        for route in [
            "/api/migrations",
            "/api/migrations/{id}",
            "/api/migrations/{id}/{verb}",
            "/api/events",
            "/api/config",
            "/api/queue",
        ] {
            assert!(
                spec["paths"].get(route).is_some(),
                "{route} missing from the OpenAPI document"
            );
        }
    });
    // Without a token file, --listen is refused.
    let output = Command::new(DMM)
        .args(["daemon", "--listen", "127.0.0.1:1"])
        .arg("--state-dir")
        .arg(dir.path().join("other"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    drop(daemon);
}

#[test]
fn a_second_daemon_on_the_same_state_dir_is_refused() {
    let dir = scratch();
    let daemon = Daemon::start(&dir.path().join("state"), &[]);
    let output = Command::new(DMM)
        .arg("daemon")
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("another dmm daemon"), "{stderr}");
    assert!(daemon.stop().success());
}

/// `dmm halt --remove` killed between its intent and its act: the
/// restarted daemon finishes removing the copy state, and the next start
/// begins from zero.
#[test]
fn halt_remove_cut_by_kill_9_after_its_intent_finishes_on_restart() {
    let dir = scratch();
    let state = dir.path().join("state");
    let daemon = Daemon::start_with(&state, &[], |mut command| {
        command.env(dmm_daemon::CRASH_AFTER_INTENT, "halt --remove");
        command
    });
    let (_, source, target) = create_volume(&daemon, dir.path(), "", (16 * MIB, 7), &["rate=4M"]);
    std::thread::sleep(Duration::from_millis(1500));
    daemon.ok(&["stop", "1"]);
    let copy_state = state.join("volumes/1");
    assert!(copy_state.exists(), "the migration has copy state");
    let output = daemon.cli(&["halt", "--remove", "1"]);
    assert!(!output.status.success(), "the daemon died during the verb");
    daemon.kill();
    assert!(copy_state.exists(), "killed before the act");

    let daemon = Daemon::start(&state, &[]);
    assert_eq!(daemon.state_of("1"), "halted");
    assert!(!copy_state.exists(), "the restart finished removing it");
    let log = daemon.ok(&["log", "1"]);
    assert!(
        log.contains("finishing halt --remove interrupted by a daemon restart"),
        "{log}"
    );
    daemon.ok(&["set", "-p", "rate=0", "1"]);
    daemon.ok(&["start", "1"]);
    daemon.wait_state("1", &["switched-over"], Duration::from_secs(60));
    daemon.ok(&["commit", "1"]);
    assert!(daemon.stop().success());
    run(tool("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&source)
        .arg(&target));
}

/// Runs a CLI verb and returns how long it took.
fn timed(daemon: &Daemon, args: &[&str]) -> Duration {
    let started = std::time::Instant::now();
    daemon.ok(args);
    started.elapsed()
}

/// A migration throttled to 256 KiB/s answers stop, halt and delete -f
/// within 2 s: a copy waiting for its bandwidth is dropped, not awaited.
#[test]
fn verbs_answer_within_2s_whatever_the_rate_limit() {
    let dir = scratch();
    let state = dir.path().join("state");
    let daemon = Daemon::start(&state, &[]);
    create_volume(&daemon, dir.path(), "", (64 * MIB, 3), &["rate=256K"]);
    let limit = Duration::from_secs(2);
    for verb in [
        &["stop", "1"][..],
        &["halt", "--keep", "1"],
        &["delete", "-f", "1"],
    ] {
        std::thread::sleep(Duration::from_millis(1500));
        let took = timed(&daemon, verb);
        assert!(took < limit, "{verb:?} took {took:?}");
        if verb[0] != "delete" {
            daemon.ok(&["start", "1"]);
        }
    }
    let list = daemon.json(&["list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
    assert!(daemon.stop().success());
}

/// A CA and certificates for localhost and 127.0.0.1 from `dmm tls`, in
/// the layout `--tls-certificates` reads; returns the CA's file.
fn certificates(dir: &std::path::Path) -> std::path::PathBuf {
    let ca = dir.with_extension("ca");
    for args in [
        vec!["tls", "init", path(&ca)],
        vec![
            "tls",
            "issue",
            "--ca",
            path(&ca),
            "localhost",
            "--also",
            "127.0.0.1",
            "--out",
            path(dir),
        ],
    ] {
        let output = Command::new(DMM).args(&args).output().unwrap();
        assert!(output.status.success(), "dmm {args:?}: {output:?}");
    }
    dir.join("ca-cert.pem")
}

/// curl's status line and body for `url`, with extra arguments.
fn curl(url: &str, args: &[&str]) -> (bool, String) {
    let output = tool("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[test]
fn the_tcp_api_speaks_tls_to_curl_and_needs_it_off_loopback() {
    let dir = scratch();
    let token = "correct-horse-battery-staple";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    let certs = dir.path().join("certs");
    let ca = certificates(&certs);
    let address = format!("127.0.0.1:{}", dmm_testkit::free_loopback_port());
    let state = dir.path().join("state");
    let daemon = Daemon::start(
        &state,
        &[
            "--listen",
            &address,
            "--token-file",
            path(&token_file),
            "--tls-certificates",
            path(&certs),
        ],
    );
    let url = format!("https://{address}/api/health");
    let bearer = format!("Authorization: Bearer {token}");
    let trust = ["--cacert", path(&ca)];
    // A real client, verifying the certificate, with the token: served.
    let (ok, answer) = curl(&url, &[&trust[..], &["-H", &bearer]].concat());
    assert!(
        ok && answer.contains("\"ok\"") && answer.ends_with("200"),
        "{answer}"
    );
    // TLS 1.2 too.
    let (ok, answer) = curl(
        &url,
        &[&trust[..], &["--tls-max", "1.2", "-H", &bearer]].concat(),
    );
    assert!(ok && answer.ends_with("200"), "TLS 1.2: {answer}");
    // Plain HTTP to the TLS port gets nothing, token or not.
    let (ok, answer) = curl(&format!("http://{address}/api/health"), &["-H", &bearer]);
    assert!(
        !ok && !answer.contains("\"ok\""),
        "plain text was served: {answer}"
    );
    // A client that does not trust the certificate stops before sending.
    let (ok, answer) = curl(&url, &["-H", &bearer]);
    assert!(!ok, "an unverified server was trusted: {answer}");
    // Wrong tokens: 401, then 429 once an address has used up its tries,
    // even with the right token; every refusal is logged.
    for attempt in 0..10 {
        let (_, answer) = curl(
            &url,
            &[&trust[..], &["-H", "Authorization: Bearer wrong"]].concat(),
        );
        assert!(answer.ends_with("401"), "attempt {attempt}: {answer}");
    }
    let (_, answer) = curl(&url, &[&trust[..], &["-H", &bearer, "-i"]].concat());
    assert!(
        answer.ends_with("429") && answer.to_lowercase().contains("retry-after"),
        "{answer}"
    );
    let log = std::fs::read_to_string(state.with_extension("log")).unwrap();
    assert!(
        log.contains("wrong bearer token") && log.contains("127.0.0.1"),
        "{log}"
    );
    drop(daemon);

    // Off loopback, plain text is refused at start, with the reason.
    let output = Command::new(DMM)
        .args([
            "daemon",
            "--listen",
            "0.0.0.0:0",
            "--token-file",
            path(&token_file),
        ])
        .arg("--state-dir")
        .arg(dir.path().join("other"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("without TLS"),
        "{stderr}"
    );
}

#[test]
fn an_unprivileged_user_cannot_use_the_api_socket() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch();
    let state = dir.path().join("state");
    let daemon = Daemon::start(&state, &[]);
    // Every directory on the way is open: only the socket's mode protects.
    for open in [dir.path(), &state] {
        std::fs::set_permissions(open, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let as_nobody = |program: &str, args: &[&str]| {
        tool("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", program])
            .args(args)
            .output()
            .unwrap()
    };
    let socket = state.join("api.sock");
    let curl = as_nobody(
        "curl",
        &[
            "-sS",
            "--unix-socket",
            path(&socket),
            "http://dmm/api/migrations",
        ],
    );
    let stderr = String::from_utf8_lossy(&curl.stderr);
    assert_eq!(
        curl.status.code(),
        Some(7),
        "nobody reached the API: {stderr}"
    );
    // Because of the socket's mode: nobody may not write to it.
    let writable = as_nobody("test", &["-w", path(&socket)]);
    assert!(
        !writable.status.success(),
        "the API socket is open to others"
    );
    let list = as_nobody(DMM, &["list", "--state-dir", path(&state)]);
    let stderr = String::from_utf8_lossy(&list.stderr);
    assert!(!list.status.success(), "nobody listed the migrations");
    assert!(
        stderr.lines().count() == 1 && stderr.contains("api.sock"),
        "{stderr}"
    );
    // Its owner still can.
    assert!(daemon.ok(&["list"]).starts_with("MIGID"));
}

/// A sample of a scrape: its name, labels and value.
type Sample = (String, serde_json::Map<String, serde_json::Value>, f64);

/// The samples of a `/metrics` text, as the Prometheus Python client's own
/// parser reads them.
fn prometheus_samples(text: &str) -> Vec<Sample> {
    const PARSE: &str = "import json, sys
from prometheus_client.parser import text_string_to_metric_families
print(json.dumps([[s.name, s.labels, s.value]
    for f in text_string_to_metric_families(sys.stdin.read()) for s in f.samples]))";
    // Debian's python, which has Debian's prometheus_client.
    let mut parser = Command::new("/usr/bin/python3")
        .args(["-c", PARSE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (scripts/install-test-deps installs python3-prometheus-client)");
    use std::io::Write;
    parser
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = parser.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the Prometheus parser refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    let parsed: Vec<Sample> = serde_json::from_slice(&output.stdout).unwrap();
    parsed
}

/// The value of the sample `name` whose labels include `labels`.
fn sample(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).and_then(|x| x.as_str()) == Some(v))
        })
        .map(|(_, _, value)| *value)
}

#[test]
fn metrics_are_scraped_with_the_token_and_read_by_the_prometheus_parser() {
    let dir = scratch();
    let token = "correct-horse-battery-staple";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    let address = format!("127.0.0.1:{}", dmm_testkit::free_loopback_port());
    let daemon = Daemon::start(
        &dir.path().join("state"),
        &["--listen", &address, "--token-file", path(&token_file)],
    );
    let url = format!("http://{address}/metrics");
    let bearer = format!("Authorization: Bearer {token}");
    let scrapes = std::cell::Cell::new(0);
    let scrape = || {
        scrapes.set(scrapes.get() + 1);
        let (ok, answer) = curl(&url, &["-H", &bearer]);
        let (body, code) = answer.rsplit_once('\n').unwrap();
        assert!(ok && code == "200", "scrape: {answer}");
        prometheus_samples(body)
    };
    let (ok, answer) = curl(&url, &[]);
    assert!(ok && answer.ends_with("\n401"), "no token: {answer}");

    let (migid, source, target) = create_volume(
        &daemon,
        dir.path(),
        "",
        (32 * MIB, 3),
        &["rate=8M", "segsize=256K"],
    );
    let id = [("migid", migid.as_str())];
    let started = std::time::Instant::now();
    let (first, copied) = loop {
        let samples = scrape();
        let copied = sample(&samples, "dmm_migration_copied_bytes_total", &id).unwrap_or(0.0);
        if copied > 0.0 {
            break (samples, copied);
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "nothing copied in 30 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let info = [
        ("migid", migid.as_str()),
        ("kind", "volume"),
        ("source", path(&source)),
        ("target", path(&target)),
        ("strategy", "auto"),
    ];
    assert_eq!(sample(&first, "dmm_migration_info", &info), Some(1.0));
    let running = [("migid", migid.as_str()), ("state", "running")];
    assert_eq!(sample(&first, "dmm_migration_state", &running), Some(1.0));
    let created = [("migid", migid.as_str()), ("state", "created")];
    assert_eq!(sample(&first, "dmm_migration_state", &created), Some(0.0));
    let volumes_running = [("kind", "volume"), ("state", "running")];
    assert_eq!(
        sample(&first, "dmm_migrations", &volumes_running),
        Some(1.0)
    );
    assert_eq!(
        sample(&first, "dmm_migration_size_bytes", &id),
        Some((32 * MIB) as f64)
    );

    std::thread::sleep(Duration::from_millis(1500));
    let second = scrape();
    let later = sample(&second, "dmm_migration_copied_bytes_total", &id).unwrap();
    assert!(
        later > copied,
        "the copy counter moves: {copied} then {later}"
    );
    let metrics_route = [("route", "/metrics"), ("method", "GET"), ("code", "200")];
    // Every scrape but the one under way.
    let timed = sample(
        &second,
        "dmm_api_request_duration_seconds_count",
        &metrics_route,
    );
    assert_eq!(timed, Some(f64::from(scrapes.get() - 1)), "scrapes timed");

    daemon.wait_state(&migid, &["switched-over"], Duration::from_secs(60));
    daemon.ok(&["commit", &migid]);
    let last = scrape();
    let committed = [("migid", migid.as_str()), ("state", "committed")];
    assert_eq!(sample(&last, "dmm_migration_state", &committed), Some(1.0));
    let ended = [("kind", "volume"), ("state", "committed")];
    assert_eq!(
        sample(&last, "dmm_migration_duration_seconds_count", &ended),
        Some(1.0)
    );
    let took = sample(&last, "dmm_migration_duration_seconds_sum", &ended).unwrap();
    assert!(
        // 4 s at the rate, less the limiter's first burst.
        (2.0..120.0).contains(&took),
        "32 MiB at 8 MiB/s took {took} s"
    );
    drop(daemon);
}

#[test]
fn a_schedule_decides_the_rate_and_a_new_one_applies_at_once() {
    let dir = scratch();
    let daemon = Daemon::start(&dir.path().join("state"), &[]);
    // 1 MiB/s all day: the timetable decides, not `rate` (no limit).
    let (migid, _, _) = create_volume(
        &daemon,
        dir.path(),
        "",
        (32 * MIB, 4),
        &["schedule=00:00,1M"],
    );
    std::thread::sleep(Duration::from_secs(4));
    let stat = daemon.json(&["stat", &migid]);
    assert_eq!(stat["state"], "running", "{stat}");
    let copied = stat["progress"]["copied_bytes"].as_u64().unwrap();
    assert!(copied < 8 * MIB, "1 MiB/s for 4 s copied {copied} bytes");
    // A timetable out of order is refused with one line naming it.
    let refused = daemon.cli(&["set", &migid, "-p", "schedule=19:00,1M 08:00,2M"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("schedule"),
        "{stderr}"
    );
    // Lifting the limit in the timetable applies at once.
    daemon.ok(&["set", &migid, "-p", "schedule=00:00,off"]);
    daemon.wait_state(&migid, &["switched-over"], Duration::from_secs(20));
    assert!(daemon.stop().success());
}

#[test]
fn maxrunning_queues_starts_in_an_order_the_admin_sets_and_both_survive_a_restart() {
    let dir = scratch();
    let state = dir.path().join("state");
    let daemon = Daemon::start(&state, &[]);
    daemon.ok(&["config", "maxrunning=1"]);
    let shown = daemon.ok(&["config"]);
    assert!(shown.contains("maxrunning  1"), "{shown}");
    let refused = daemon.cli(&["config", "maxrunning=0"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("from 1"),
        "{stderr}"
    );
    let mut ids = Vec::new();
    for name in ["a", "b", "c"] {
        let volume = (16 * MIB, 3);
        ids.push(create_volume(&daemon, dir.path(), name, volume, &["rate=1M"]).0);
    }
    assert_eq!(daemon.state_of(&ids[0]), "running");
    assert_eq!(daemon.state_of(&ids[1]), "queued");
    let queue = daemon.json(&["queue"]);
    assert_eq!(queue["queued"], serde_json::json!([2, 3]), "{queue}");
    let moved = daemon.ok(&["queue", &ids[2], "1"]);
    assert!(
        moved.contains("1 running (maxrunning 1), 2 queued"),
        "{moved}"
    );
    let lines: Vec<&str> = moved.lines().skip(2).collect();
    assert!(
        lines[0].starts_with("1    3 ") && lines[1].starts_with("2    2 "),
        "{moved}"
    );
    let refused = daemon.cli(&["queue", &ids[0], "1"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("not queued"), "{stderr}");
    // Restarted: the limit, the queue and its order hold.
    assert!(daemon.stop().success());
    let daemon = Daemon::start(&state, &[]);
    assert_eq!(daemon.json(&["queue"])["queued"], serde_json::json!([3, 2]));
    assert_eq!(daemon.state_of(&ids[0]), "running");
    // The running one stops: the head of the queue starts within a second
    // or two, the other waits.
    daemon.ok(&["stop", &ids[0]]);
    daemon.wait_state(&ids[2], &["running"], Duration::from_secs(5));
    assert_eq!(daemon.state_of(&ids[1]), "queued");
    let log = daemon.ok(&["log", &ids[1]]);
    assert!(log.contains("queued: it starts when a slot frees"), "{log}");
    daemon.ok(&["config", "maxrunning=unlimited"]);
    daemon.wait_state(&ids[1], &["running"], Duration::from_secs(5));
    assert!(daemon.stop().success());
}
