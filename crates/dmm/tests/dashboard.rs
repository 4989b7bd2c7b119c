//! The dashboard in a real browser: Debian's chromium, driven through
//! chromedriver (WebDriver, fantoccini), against a real daemon. A newcomer's
//! path: log in with the URL `dmm ui` prints, create a volume migration
//! from the form, watch it move, pause it, change its rate and see the
//! chart follow, resume, commit; then restart the daemon, find it in the
//! history (duration, bytes, verification), and read the catalog's
//! tables. Requests without the cookie get 401. An admin's path: limit
//! the migrations running at once, reorder the queue, see CLI changes
//! within a second, retry a tree's file in error. A stream store created
//! from the form shows where each stream is. In a cluster on etcd: the
//! Nodes page lists the nodes and where each volume lives. The tests
//! save screenshots in `target/screenshots/` (the README shows them).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, MIB, image_with, path, scratch, source_image, tool};
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

/// A chromedriver on a free port, stopped on drop.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Driver {
        let port = dmm_testkit::free_loopback_port();
        let child = tool("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (scripts/install-test-deps installs chromium-driver)");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "chromedriver did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Driver { child, port }
    }

    async fn browser(&self) -> Client {
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                         "--disable-gpu", "--window-size=1280,1000"],
            },
        });
        let serde_json::Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits up to `limit` for `check` to give `Some`, naming `what` if not.
async fn until<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(started.elapsed() < limit, "waited {limit:?} for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An attribute of the first element matching `css`, if there is one.
async fn attribute(browser: &Client, css: &str, name: &str) -> Option<String> {
    let element = browser.find(Locator::Css(css)).await.ok()?;
    element.attr(name).await.ok().flatten()
}

/// Clicks the first element matching `css` once there is one (found
/// again if the page replaced it between the look and the click).
async fn click(browser: &Client, css: &str) {
    until(
        &format!("a click on {css}"),
        Duration::from_secs(10),
        || async {
            let element = browser.find(Locator::Css(css)).await.ok()?;
            match element.click().await {
                Ok(()) => Some(()),
                Err(err) if err.to_string().contains("stale element") => None,
                Err(err) => panic!("click {css}: {err}"),
            }
        },
    )
    .await;
}

async fn fill(browser: &Client, css: &str, text: &str) {
    let element = browser.find(Locator::Css(css)).await.unwrap();
    element.clear().await.unwrap();
    element.send_keys(text).await.unwrap();
}

/// Waits until the migration page shows `state`.
async fn shows_state(browser: &Client, state: &str, limit: Duration) {
    until(&format!("state {state}"), limit, || async {
        (attribute(browser, "#state", "data-state").await.as_deref() == Some(state)).then_some(())
    })
    .await;
}

/// The copy rate of the rate chart's newest point (bytes/s).
async fn charted_rate(browser: &Client) -> Option<f64> {
    let last = attribute(browser, "#chart-rate", "data-last").await?;
    serde_json::from_str::<serde_json::Value>(&last).ok()?["rate"].as_f64()
}

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn status_of(url: &str) -> String {
    let output = tool("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", url])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The Done tab's row of migration 1 shows how long it ran, the bytes it
/// copied and what verification found (64 MiB of data in 96 MiB: holes
/// are not copied; verified).
async fn history_row_is_complete(browser: &Client) {
    let field = |name: &'static str| async move {
        let css = format!("tr[data-id='1'] [data-field='{name}']");
        browser
            .find(Locator::Css(&css))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    assert_eq!(field("copied").await, "64.0 MiB");
    let verification = field("verification").await;
    assert!(
        verification.contains("chunks verified, all equal"),
        "{verification}"
    );
    let ran = field("duration").await;
    assert!(ran.ends_with('s'), "{ran}");
}

#[test]
fn a_newcomer_creates_watches_controls_and_commits_a_migration_from_the_page() {
    let dir = scratch();
    let state = dir.path().join("state");
    let source = source_image(dir.path(), "source.raw", 96 * MIB, 9);
    let target = image_with(dir.path(), "target.raw", 96 * MIB, &[]);
    let daemon = Daemon::start(&state, &[]);
    let login = daemon.ok(&["ui", "--no-browser"]).trim().to_owned();
    let base = login.split("/ui/login").next().unwrap().to_owned();
    assert!(base.starts_with("http://127.0.0.1:"), "{login}");
    // Nothing without the cookie, not even the list.
    assert_eq!(status_of(&format!("{base}/api/migrations")), "401");
    assert_eq!(status_of(&format!("{base}/metrics")), "401");

    let driver = Driver::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let browser = runtime.block_on(driver.browser());
    let outcome = runtime.block_on(async {
        // Before logging in the page says how to.
        browser.goto(&base).await.unwrap();
        let text = browser
            .find(Locator::Css("body"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(text.contains("dmm ui"), "{text}");

        browser.goto(&login).await.unwrap();
        until("the overview", Duration::from_secs(15), || async {
            browser.find(Locator::Css("#migrations")).await.ok()
        })
        .await;
        // The code works once: a second browser could not reuse it.
        assert_eq!(status_of(&login), "401");

        // Create from the form; a bad value is refused next to its field.
        click(&browser, "#nav-create").await;
        until("the form", Duration::from_secs(10), || async {
            browser.find(Locator::Css("#field-source")).await.ok()
        })
        .await;
        fill(&browser, "#field-source", path(&source)).await;
        fill(&browser, "#field-target", path(&target)).await;
        fill(&browser, "#field-rate", "fast").await;
        click(&browser, "#submit").await;
        let refusal = until("the rate's error", Duration::from_secs(10), || async {
            let text = browser
                .find(Locator::Css("#error-rate"))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            (!text.is_empty()).then_some(text)
        })
        .await;
        assert!(refusal.contains("rate"), "{refusal}");
        fill(&browser, "#field-rate", "1M").await;
        click(&browser, "#submit").await;
        until("the migration's page", Duration::from_secs(15), || async {
            let url = browser.current_url().await.ok()?;
            (url.fragment() == Some("/m/1")).then_some(())
        })
        .await;
        shows_state(&browser, "running", Duration::from_secs(15)).await;

        // The chart shows the limited rate once the limiter's first burst
        // has left its window.
        let rate = until(
            "the 1M limit on the chart",
            Duration::from_secs(30),
            || async {
                charted_rate(&browser)
                    .await
                    .filter(|rate| *rate > 0.0 && *rate < 2.0 * MIB as f64)
            },
        )
        .await;
        std::fs::write(
            screenshots().join("migration.png"),
            browser.screenshot().await.unwrap(),
        )
        .unwrap();

        click(&browser, "[data-verb='pause']").await;
        shows_state(&browser, "paused", Duration::from_secs(10)).await;
        fill(&browser, "#set-rate", "16M").await;
        click(&browser, "#apply").await;
        until(
            "rate=16M in the properties",
            Duration::from_secs(10),
            || async {
                let text = browser
                    .find(Locator::Css("#main"))
                    .await
                    .ok()?
                    .text()
                    .await
                    .ok()?;
                text.contains("16M").then_some(())
            },
        )
        .await;
        click(&browser, "[data-verb='resume']").await;
        // The chart follows the new limit.
        let faster = until(
            "a faster copy on the chart",
            Duration::from_secs(30),
            || async {
                charted_rate(&browser)
                    .await
                    .filter(|rate| *rate > 4.0 * MIB as f64)
            },
        )
        .await;

        shows_state(&browser, "switched-over", Duration::from_secs(60)).await;
        click(&browser, "[data-verb='commit']").await;
        browser
            .accept_alert()
            .await
            .expect("commit asks for confirmation");
        shows_state(&browser, "committed", Duration::from_secs(30)).await;

        click(&browser, "a[href='#/']").await;
        click(&browser, "[data-tab='done']").await;
        until(
            "the committed migration in Done",
            Duration::from_secs(10),
            || async {
                let state = attribute(&browser, "tr[data-id='1'] .state", "data-state").await?;
                (state == "committed").then_some(())
            },
        )
        .await;
        history_row_is_complete(&browser).await;
        std::fs::write(
            screenshots().join("overview.png"),
            browser.screenshot().await.unwrap(),
        )
        .unwrap();
        (rate, faster)
    });
    let (slow, fast) = outcome;
    println!("charted rate: {slow:.0} B/s at 1M, {fast:.0} B/s at 16M");
    drop(daemon);

    // After a restart the finished migration is still listed, and a new
    // login URL is needed.
    let daemon = Daemon::start(&state, &[]);
    let login = daemon.ok(&["ui", "--no-browser"]).trim().to_owned();
    runtime.block_on(async {
        browser.goto(&login).await.unwrap();
        click(&browser, "[data-tab='done']").await;
        until(
            "the history after a restart",
            Duration::from_secs(15),
            || async {
                let state = attribute(&browser, "tr[data-id='1'] .state", "data-state").await?;
                (state == "committed").then_some(())
            },
        )
        .await;
        history_row_is_complete(&browser).await;
        // The catalog's tables, read-only, for error recovery.
        click(&browser, "#nav-catalog").await;
        let events = until(
            "the catalog's events table",
            Duration::from_secs(10),
            || async {
                let table = browser
                    .find(Locator::Css("[data-table='events']"))
                    .await
                    .ok()?;
                table.text().await.ok()
            },
        )
        .await;
        assert!(events.contains("committed"), "{events}");
        browser.close().await.unwrap();
    });
    assert!(daemon.stop().success());
    // The data is the source's.
    common::assert_same_images(&source, &target);
}

/// A stream store from the form: the kind's own fields, a stream written
/// through its access point moving to the dense tier on the page, then
/// committed from it.
#[test]
fn a_stream_store_is_created_from_the_page_and_shows_where_each_stream_is() {
    let dir = scratch();
    let state = dir.path().join("state");
    let access = dir.path().join("access");
    std::fs::create_dir(&access).unwrap();
    let orbit = format!("fast:{0}/fast,dense:{0}/dense:zstd", path(dir.path()));
    let daemon = Daemon::start(&state, &[]);
    let login = daemon.ok(&["ui", "--no-browser"]).trim().to_owned();
    let driver = Driver::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let browser = runtime.block_on(driver.browser());
    runtime.block_on(async {
        browser.goto(&login).await.unwrap();
        click(&browser, "#nav-create").await;
        click(&browser, "#field-kind option[value='stream']").await;
        until(
            "the stream store's fields",
            Duration::from_secs(10),
            || async { browser.find(Locator::Css("#field-orbit")).await.ok() },
        )
        .await;
        assert!(
            browser.find(Locator::Css("#field-source")).await.is_err(),
            "a stream store has no source field"
        );
        fill(&browser, "#field-orbit", &orbit).await;
        fill(&browser, "#field-access", path(&access)).await;
        click(&browser, "#submit").await;
        until("the store's page", Duration::from_secs(15), || async {
            let url = browser.current_url().await.ok()?;
            (url.fragment() == Some("/m/1")).then_some(())
        })
        .await;
        until("the access point", Duration::from_secs(15), || async {
            common::is_mountpoint(&access).then_some(())
        })
        .await;
        let mut log = std::fs::File::create(access.join("app.log")).unwrap();
        std::io::Write::write_all(&mut log, dmm_testkit::records(2000).as_bytes()).unwrap();
        log.sync_all().unwrap();
        // Closed: a commit unmounts only an access point nobody uses.
        drop(log);
        until(
            "app.log on the dense tier",
            Duration::from_secs(30),
            || async {
                let text = text_of(&browser, "#main").await?;
                (text.contains("app.log")
                    && text.contains("· dense (")
                    && !text.contains("→ dense"))
                .then_some(())
            },
        )
        .await;
        shows_state(&browser, "switched-over", Duration::from_secs(30)).await;
        std::fs::write(
            screenshots().join("streams.png"),
            browser.screenshot().await.unwrap(),
        )
        .unwrap();
        click(&browser, "[data-verb='commit']").await;
        browser
            .accept_alert()
            .await
            .expect("commit asks for confirmation");
        shows_state(&browser, "committed", Duration::from_secs(30)).await;
        browser.close().await.unwrap();
    });
    assert!(!common::is_mountpoint(&access), "committed: unmounted");
    assert!(daemon.stop().success());
}

/// The text of the first element matching `css`, if there is one.
async fn text_of(browser: &Client, css: &str) -> Option<String> {
    browser
        .find(Locator::Css(css))
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// The migids the page's queue lists, in order.
async fn queued_on_page(browser: &Client) -> Vec<String> {
    let Ok(items) = browser.find_all(Locator::Css("#queue li[data-id]")).await else {
        return Vec::new();
    };
    let mut ids = Vec::new();
    for item in items {
        if let Ok(Some(id)) = item.attr("data-id").await {
            ids.push(id);
        }
    }
    ids
}

/// Waits until the overview row of `migid` shows `state`; returns how
/// long that took.
async fn row_shows(browser: &Client, migid: &str, state: &str) -> Duration {
    let started = Instant::now();
    let css = format!("tr[data-id='{migid}'] .state");
    until(
        &format!("{migid} {state} in the overview"),
        Duration::from_secs(10),
        || async {
            (attribute(browser, &css, "data-state").await.as_deref() == Some(state)).then_some(())
        },
    )
    .await;
    started.elapsed()
}

/// The admin limits how many migrations run at once and reorders the queue
/// from the page; changes made elsewhere (the CLI) show within a second; a
/// tree migration's page charts its files and directories and retries a
/// file in error at the click of its button, long before its backoff.
#[test]
fn the_queue_is_limited_and_reordered_and_a_tree_file_is_retried_from_the_page() {
    let d = common::dirs();
    let real = d.state.with_file_name("real");
    std::fs::create_dir(&real).unwrap();
    for i in 0..4u8 {
        let dir = real.join(format!("d{i}"));
        std::fs::create_dir(&dir).unwrap();
        for f in 0..10u8 {
            std::fs::write(dir.join(format!("f{f}")), common::pattern(64 << 10, i ^ f)).unwrap();
        }
    }
    std::fs::write(real.join("bad"), common::pattern(2 << 20, 77)).unwrap();
    let source = dmm_testkit::FaultySource::mount(&real, &d.source);
    source.fail_reads("bad", 1 << 20);
    let volumes = scratch();
    let daemon = Daemon::start(&d.state, &[]);
    let login = daemon.ok(&["ui", "--no-browser"]).trim().to_owned();

    let driver = Driver::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let browser = runtime.block_on(driver.browser());
    let seen = runtime.block_on(async {
        browser.goto(&login).await.unwrap();
        click(&browser, "[data-tab='running']").await;
        fill(&browser, "#maxrunning", "1").await;
        click(&browser, "#set-maxrunning").await;
        until(
            "maxrunning=1 in the daemon",
            Duration::from_secs(10),
            || async {
                daemon
                    .ok(&["config"])
                    .contains("maxrunning  1 ")
                    .then_some(())
            },
        )
        .await;

        // Three starts: one runs, two wait, listed in order within a second.
        for tag in ["1", "2", "3"] {
            common::create_volume(&daemon, volumes.path(), tag, (32 * MIB, 5), &["rate=1M"]);
        }
        let started = Instant::now();
        until("the queue on the page", Duration::from_secs(10), || async {
            (queued_on_page(&browser).await == ["2", "3"]).then_some(())
        })
        .await;
        let queue_seen = started.elapsed();
        // A pause from the CLI shows within a second.
        daemon.ok(&["pause", "1"]);
        let pause_seen = row_shows(&browser, "1", "paused").await;
        daemon.ok(&["resume", "1"]);
        row_shows(&browser, "1", "running").await;

        // 3 moves ahead of 2: the daemon's queue follows.
        click(&browser, "#queue li[data-id='3'] button.up").await;
        until("3 ahead of 2", Duration::from_secs(10), || async {
            (queued_on_page(&browser).await == ["3", "2"]).then_some(())
        })
        .await;
        assert_eq!(daemon.json(&["queue"])["queued"], json!([3, 2]));
        std::fs::write(
            screenshots().join("queue.png"),
            browser.screenshot().await.unwrap(),
        )
        .unwrap();
        // The running one stops: 3 starts, 2 still waits.
        daemon.ok(&["stop", "1"]);
        row_shows(&browser, "3", "running").await;
        assert_eq!(queued_on_page(&browser).await, ["2"]);
        // No limit: 2 starts too.
        fill(&browser, "#maxrunning", "").await;
        click(&browser, "#set-maxrunning").await;
        row_shows(&browser, "2", "running").await;
        for migid in ["2", "3"] {
            daemon.ok(&["stop", migid]);
        }

        // A tree whose source fails reading one file.
        let migid = common::create_tree(&daemon, &d, &[]);
        browser
            .goto(&format!(
                "{}#/m/{migid}",
                login.split("/ui/login").next().unwrap()
            ))
            .await
            .unwrap();
        let row = "#errors-card tr[data-path='bad']";
        // Backed off to 8 s after its fourth attempt.
        until(
            "bad in error four times",
            Duration::from_secs(60),
            || async {
                let attempts = text_of(&browser, &format!("{row} td:nth-child(3)")).await?;
                (attempts.trim().parse::<u32>().ok()? >= 4).then_some(())
            },
        )
        .await;
        let chart = attribute(&browser, "#chart-io", "data-last").await.unwrap();
        let chart: serde_json::Value = serde_json::from_str(&chart).unwrap();
        assert!(chart["files"].as_f64().unwrap() >= 40.0, "{chart}");
        assert!(chart["dirs"].as_f64().unwrap() >= 4.0, "{chart}");
        source.heal();
        click(&browser, &format!("{row} button.retry")).await;
        let retried = Instant::now();
        until(
            "bad retried and copied",
            Duration::from_secs(20),
            || async {
                let hidden = attribute(&browser, "#errors-card", "hidden").await;
                hidden.is_some().then_some(())
            },
        )
        .await;
        let retry_took = retried.elapsed();
        shows_state(&browser, "switched-over", Duration::from_secs(60)).await;
        browser.close().await.unwrap();
        (queue_seen, pause_seen, retry_took)
    });
    let (queue_seen, pause_seen, retry_took) = seen;
    println!(
        "queue shown {queue_seen:?} after the starts, pause {pause_seen:?} after the CLI, \
         file retried {retry_took:?} after the click"
    );
    assert!(pause_seen < Duration::from_secs(1), "{pause_seen:?}");
    assert!(
        retry_took < Duration::from_secs(6),
        "the retry did not wait for the 8 s backoff: {retry_took:?}"
    );
    let log = daemon.ok(&["log", &daemon_tree_migid(&daemon)]);
    assert!(log.contains("retrying bad now"), "{log}");
    assert!(daemon.stop().success());
    drop(source);
}

/// The tree migration's migid (the only one of its kind).
fn daemon_tree_migid(daemon: &Daemon) -> String {
    let list = daemon.json(&["list"]);
    let tree = list
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["kind"] == "tree")
        .unwrap();
    tree["id"].to_string()
}

#[test]
fn the_nodes_page_shows_the_cluster_and_where_each_volume_lives() {
    let dir = scratch();
    let etcd = dmm_testkit::Etcd::start();
    let certs = common::certificates(dir.path(), &["node-a", "node-b"]);
    let a_api = format!("127.0.0.1:{}", dmm_testkit::free_loopback_port());
    let b_api = format!("127.0.0.1:{}", dmm_testkit::free_loopback_port());
    let endpoint = etcd.endpoint();
    let cluster = ["--etcd", &endpoint, "--lease-ttl", "3s"];
    let start = |name: &str, certs: &Path, api: &str, peer: String| {
        common::peer_daemon(dir.path(), name, certs, api, &peer, &cluster)
    };
    let a = start("node-a", &certs[0], &a_api, format!("node-b={b_api}"));
    let b = start("node-b", &certs[1], &b_api, format!("node-a={a_api}"));
    let source = source_image(dir.path(), "vm1.raw", 8 * MIB, 3);
    let target = image_with(dir.path(), "vm1-copy.raw", 8 * MIB, &[]);
    a.daemon.ok(&[
        "create",
        "-p",
        &format!("source={}", path(&source)),
        "-p",
        &format!("target={}", path(&target)),
        "-p",
        "export=vm1",
        "-p",
        "switchover=manual",
    ]);
    // On a loopback listener of its own: the TCP API's TLS certificate is
    // not one the browser knows.
    let dashboard = format!("127.0.0.1:{}", dmm_testkit::free_loopback_port());
    let login = a
        .daemon
        .ok(&["ui", "--no-browser", "--listen", &dashboard])
        .trim()
        .to_owned();

    let driver = Driver::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let browser = runtime.block_on(driver.browser());
    runtime.block_on(async {
        browser.goto(&login).await.unwrap();
        // The link shows on a daemon that is in a cluster.
        until("the Nodes link", Duration::from_secs(15), || async {
            let link = browser.find(Locator::Css("#nav-nodes")).await.ok()?;
            link.is_displayed().await.ok()?.then_some(())
        })
        .await;
        click(&browser, "#nav-nodes").await;
        until("both nodes up", Duration::from_secs(15), || async {
            let a = attribute(&browser, "tr[data-node='node-a']", "data-up").await?;
            let b = attribute(&browser, "tr[data-node='node-b']", "data-up").await?;
            (a == "true" && b == "true").then_some(())
        })
        .await;
        let owner = attribute(&browser, "tr[data-volume='vm1']", "data-owner").await;
        assert_eq!(owner.as_deref(), Some("node-a"));
        let this = text_of(&browser, "#this-node").await.unwrap_or_default();
        assert!(
            this.contains("node-a") && this.contains("serving"),
            "{this}"
        );
        std::fs::write(
            screenshots().join("nodes.png"),
            browser.screenshot().await.unwrap(),
        )
        .unwrap();
        // A node that stops is gone from the list once it left.
        assert!(b.daemon.stop().success());
        until("node-b gone", Duration::from_secs(15), || async {
            let row = browser.find(Locator::Css("tr[data-node='node-b']")).await;
            row.is_err().then_some(())
        })
        .await;
        browser.close().await.unwrap();
    });
    assert!(a.daemon.stop().success());
}
