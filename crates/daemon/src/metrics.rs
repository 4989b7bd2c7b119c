//! `GET /metrics`: the daemon's migrations in the Prometheus text format
//! (version 0.0.4), on the API's listeners and behind the same token.
//!
//! A scrape builds its metrics afresh from the catalog (which migrations
//! exist, their state and times) and the open engines' reports (bytes,
//! rates, client I/O), so no number is kept twice and a migration deleted
//! from the catalog leaves the scrape with it. The one thing kept between
//! scrapes is [`Requests`], the durations of the API's own requests, which
//! nothing else records.
//!
//! Conventions of the Prometheus ecosystem: base units (bytes, seconds),
//! counters end in `_total`, a migration's state is a labelled gauge (1 for
//! the state it is in, 0 for the others, as kube-state-metrics does), and
//! its kind, source and target are the labels of an `_info` gauge rather
//! than of every series.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State as Shared};
use axum::middleware::Next;
use axum::response::Response;
use dmm_catalog::{Kind, MigrationRecord, State};
use prometheus_client::encoding::{EncodeLabelSet, prometheus_text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::engine::Report;
use crate::error::{Error, ErrorKind, Result};
use crate::supervisor::Supervisor;

/// The `Content-Type` of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Labels of every per-migration series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Migration {
    migid: String,
    kind: String,
}

/// Labels of `dmm_migration_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Info {
    migid: String,
    kind: String,
    source: String,
    target: String,
    strategy: String,
}

/// Labels of `dmm_migration_state`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InState {
    migid: String,
    kind: String,
    state: String,
}

/// Labels of the daemon-wide counts by kind and state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindState {
    kind: String,
    state: String,
}

/// Labels of an API request's duration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    /// The route as the router declares it (`/api/migrations/{id}`), so
    /// that migration ids do not multiply the series.
    route: String,
    code: String,
}

type Seconds = Gauge<f64, AtomicU64>;

fn duration_buckets() -> Histogram {
    // 1 s to about 12 days, ×4 a step.
    Histogram::new(exponential_buckets(1.0, 4.0, 11))
}

fn request_buckets() -> Histogram {
    // 0.5 ms to about 8 s, ×2 a step.
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

/// Durations of the API's requests, by method, route and status code.
pub struct Requests {
    seconds: Family<RequestLabels, Histogram, fn() -> Histogram>,
}

impl Default for Requests {
    fn default() -> Requests {
        Requests {
            seconds: Family::new_with_constructor(request_buckets),
        }
    }
}

/// Axum middleware (a route layer, so that the route is known): times
/// each request that reaches a route.
pub async fn track(
    Shared(requests): Shared<Arc<Requests>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let response = next.run(request).await;
    let labels = RequestLabels {
        method,
        route,
        code: response.status().as_u16().to_string(),
    };
    requests
        .seconds
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}

/// One scrape's metrics, registered in a registry of their own.
struct Scrape {
    registry: Registry,
    info: Family<Info, Gauge>,
    state: Family<InState, Gauge>,
    migrations: Family<KindState, Gauge>,
    durations: Family<KindState, Histogram, fn() -> Histogram>,
    errors: Family<Migration, Gauge>,
    size: Family<Migration, Gauge>,
    done: Family<Migration, Gauge>,
    copied: Family<Migration, Counter>,
    rate: Family<Migration, Gauge>,
    eta: Family<Migration, Gauge>,
    reads: Family<Migration, Counter>,
    writes: Family<Migration, Counter>,
    dirty: Family<Migration, Gauge>,
    pause: Family<Migration, Seconds>,
    verified: Family<Migration, Counter>,
    mismatches: Family<Migration, Gauge>,
    files: Family<Migration, Gauge>,
    files_done: Family<Migration, Gauge>,
    dirs: Family<Migration, Gauge>,
    dirs_done: Family<Migration, Gauge>,
}

/// A count as a gauge's value.
fn int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Scrape {
    fn new(requests: &Requests) -> Scrape {
        let mut s = Scrape {
            registry: Registry::default(),
            info: Family::default(),
            state: Family::default(),
            migrations: Family::default(),
            durations: Family::new_with_constructor(duration_buckets),
            errors: Family::default(),
            size: Family::default(),
            done: Family::default(),
            copied: Family::default(),
            rate: Family::default(),
            eta: Family::default(),
            reads: Family::default(),
            writes: Family::default(),
            dirty: Family::default(),
            pause: Family::default(),
            verified: Family::default(),
            mismatches: Family::default(),
            files: Family::default(),
            files_done: Family::default(),
            dirs: Family::default(),
            dirs_done: Family::default(),
        };
        let r = &mut s.registry;
        let (bytes, seconds) = (Unit::Bytes, Unit::Seconds);
        r.register(
            "dmm_migration_info",
            "A migration's kind, source, target and strategy (always 1)",
            s.info.clone(),
        );
        r.register(
            "dmm_migration_state",
            "1 for the state a migration is in, 0 for the others",
            s.state.clone(),
        );
        r.register(
            "dmm_migrations",
            "Migrations in the catalog, by kind and state",
            s.migrations.clone(),
        );
        r.register_with_unit("dmm_migration_duration", "Time from creation to the last change of state of migrations that ended (committed, rolled back, halted or failed)", seconds.clone(), s.durations.clone());
        r.register(
            "dmm_migration_errors",
            "What needs the admin: entries in error (trees), plus 1 while the migration has failed",
            s.errors.clone(),
        );
        r.register_with_unit(
            "dmm_migration_size",
            "Bytes to migrate: the volume's size, or the tree's files' bytes known so far",
            bytes.clone(),
            s.size.clone(),
        );
        r.register_with_unit(
            "dmm_migration_done",
            "Bytes whose current data is on the target",
            bytes.clone(),
            s.done.clone(),
        );
        r.register_with_unit(
            "dmm_migration_copied",
            "Data bytes written to the target by the copy, over every run",
            bytes,
            s.copied.clone(),
        );
        r.register_with_unit(
            "dmm_migration_rate",
            "Copy rate over the last seconds",
            Unit::Other("bytes_per_second".into()),
            s.rate.clone(),
        );
        r.register_with_unit(
            "dmm_migration_eta",
            "Estimated time left for the copy, when it can be estimated",
            seconds.clone(),
            s.eta.clone(),
        );
        r.register(
            "dmm_volume_client_reads",
            "Client read requests served by the volume's virtual device",
            s.reads.clone(),
        );
        r.register(
            "dmm_volume_client_writes",
            "Client write requests served by the volume's virtual device",
            s.writes.clone(),
        );
        r.register(
            "dmm_volume_dirty_chunks",
            "Chunks copied and changed since, waiting for another copy",
            s.dirty.clone(),
        );
        r.register_with_unit(
            "dmm_volume_longest_switchover_pause",
            "Longest time clients were held at a switchover",
            seconds.clone(),
            s.pause.clone(),
        );
        r.register(
            "dmm_volume_verified_chunks",
            "Chunks compared between source and destination",
            s.verified.clone(),
        );
        r.register(
            "dmm_migration_mismatches",
            "Chunks (volumes) or files (trees) found different by verification",
            s.mismatches.clone(),
        );
        r.register(
            "dmm_tree_files",
            "Files found in the source tree so far",
            s.files.clone(),
        );
        r.register(
            "dmm_tree_files_done",
            "Files whose data and metadata are on the target",
            s.files_done.clone(),
        );
        r.register(
            "dmm_tree_dirs",
            "Directories found in the source tree so far",
            s.dirs.clone(),
        );
        r.register(
            "dmm_tree_dirs_done",
            "Directories whose entries are all known and on the target",
            s.dirs_done.clone(),
        );
        r.register_with_unit(
            "dmm_api_request_duration",
            "Time to answer an API request, by method, route and status code",
            seconds,
            requests.seconds.clone(),
        );
        for kind in Kind::ALL {
            for state in State::ALL {
                s.migrations.get_or_create(&kind_state(kind, state)).set(0);
            }
        }
        s
    }

    /// Adds one migration, with its engine's report if it is open.
    fn add(&self, record: &MigrationRecord, report: Option<&Report>) {
        let kind = record.kind.as_str().to_owned();
        let id = Migration {
            migid: record.id.to_string(),
            kind: kind.clone(),
        };
        let property = |name: &str| record.properties.get(name).cloned().unwrap_or_default();
        let info = Info {
            migid: id.migid.clone(),
            kind: kind.clone(),
            source: property("source"),
            target: property("target"),
            strategy: crate::properties::effective(&record.properties, record.kind)
                .remove("strategy")
                .unwrap_or_default(),
        };
        self.info.get_or_create(&info).set(1);
        for state in State::ALL {
            let labels = InState {
                migid: id.migid.clone(),
                kind: kind.clone(),
                state: state.as_str().to_owned(),
            };
            self.state
                .get_or_create(&labels)
                .set(i64::from(state == record.state));
        }
        self.migrations
            .get_or_create(&kind_state(record.kind, record.state))
            .inc();
        if record.state.has_ended() {
            let seconds = (record.updated_at - record.created_at).max(0) as f64 / 1e3;
            self.durations
                .get_or_create(&kind_state(record.kind, record.state))
                .observe(seconds);
        }
        let failed = i64::from(record.state == State::Failed);
        match report {
            Some(Report::Volume(volume)) => {
                let done = volume
                    .chunks_on_destination
                    .saturating_mul(volume.chunk_bytes);
                self.errors.get_or_create(&id).set(failed);
                self.size.get_or_create(&id).set(int(volume.volume_bytes));
                self.done
                    .get_or_create(&id)
                    .set(int(done.min(volume.volume_bytes)));
                self.copied.get_or_create(&id).inc_by(volume.copied_bytes);
                self.rate
                    .get_or_create(&id)
                    .set(int(volume.bytes_per_second));
                if let Some(eta) = volume.eta_seconds {
                    self.eta.get_or_create(&id).set(int(eta));
                }
                self.reads.get_or_create(&id).inc_by(volume.client_reads);
                self.writes.get_or_create(&id).inc_by(volume.client_writes);
                self.dirty.get_or_create(&id).set(int(volume.dirty_chunks));
                self.pause
                    .get_or_create(&id)
                    .set(volume.longest_pause_ms / 1e3);
                self.verified
                    .get_or_create(&id)
                    .inc_by(volume.verified_chunks);
                self.mismatches
                    .get_or_create(&id)
                    .set(int(volume.mismatches.len() as u64));
            }
            Some(Report::Tree(tree)) => {
                let counts = &tree.progress.counts;
                self.errors
                    .get_or_create(&id)
                    .set(int(counts.errors).saturating_add(failed));
                self.size.get_or_create(&id).set(int(counts.bytes_total));
                self.done.get_or_create(&id).set(int(counts.bytes_done));
                self.copied.get_or_create(&id).inc_by(counts.bytes_written);
                self.rate.get_or_create(&id).set(int(tree.progress.rate));
                if let Some(eta) = tree.progress.eta_seconds {
                    self.eta.get_or_create(&id).set(int(eta));
                }
                self.files.get_or_create(&id).set(int(counts.files_total));
                self.files_done
                    .get_or_create(&id)
                    .set(int(counts.files_done));
                self.dirs.get_or_create(&id).set(int(counts.dirs_total));
                self.dirs_done.get_or_create(&id).set(int(counts.dirs_done));
                self.mismatches
                    .get_or_create(&id)
                    .set(int(tree.mismatches.len() as u64));
            }
            Some(Report::Stream(stream)) => {
                let bytes: u64 = stream.streams.iter().map(|s| s.bytes).sum();
                self.errors.get_or_create(&id).set(failed);
                self.size.get_or_create(&id).set(int(bytes));
                self.copied
                    .get_or_create(&id)
                    .inc_by(stream.figures.drained + stream.figures.redirected);
                self.files
                    .get_or_create(&id)
                    .set(int(stream.streams.len() as u64));
                self.files_done
                    .get_or_create(&id)
                    .set(int((stream.streams.len() - stream.pending) as u64));
            }
            None => {
                self.errors.get_or_create(&id).set(failed);
            }
        }
    }
}

fn kind_state(kind: Kind, state: State) -> KindState {
    KindState {
        kind: kind.as_str().to_owned(),
        state: state.as_str().to_owned(),
    }
}

/// The text of a scrape: every migration in the catalog, with the report
/// of those whose engine is open, and the API's request durations.
pub async fn render(supervisor: &Supervisor, requests: &Requests) -> Result<String> {
    let mut scrape = Scrape::new(requests);
    if let Some(limit) = supervisor.max_running()? {
        let gauge = Gauge::<i64>::default();
        gauge.set(i64::from(limit));
        scrape.registry.register(
            "dmm_maxrunning",
            "How many migrations may copy or verify at once (absent: no limit)",
            gauge,
        );
    }
    for record in supervisor.catalog().list()? {
        // A migration deleted since the listing has no report: skip it.
        let Ok(report) = supervisor.progress(record.id).await else {
            continue;
        };
        scrape.add(&record, report.as_ref());
    }
    let mut text = String::new();
    prometheus_text::encode(&mut text, &scrape.registry)
        .map_err(|_| Error::new(ErrorKind::Failed, "encode the metrics"))?;
    Ok(text)
}
