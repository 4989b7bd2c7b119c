//! The management verbs (`create`, `start`, `stat`, …): each is one call of
//! the daemon's API over the state directory's Unix socket, and prints the
//! answer for a human, or as JSON with `--json`.

use std::time::Duration;

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use clap::{ArgAction, Args};
use dmm_daemon::{
    Client, ClientError, Endpoint, Layout, MigrationId, MigrationRecord, Report, StreamReport,
    TreeReport, Verb, View,
};
use serde_json::json;

use crate::Global;
use dmm_control::human;

/// An argument of `-p` that is not `name=value`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not name=value")]
pub struct NotAProperty(String);

/// `-p name=value`.
pub(crate) fn property(text: &str) -> Result<(String, String), NotAProperty> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| NotAProperty(text.to_owned()))?;
    Ok((name.trim().to_owned(), value.trim().to_owned()))
}

/// Create a migration and print its migid; it starts at once unless -h.
#[derive(Args)]
#[command(disable_help_flag = true)]
pub struct CreateArgs {
    /// Create the migration halted (start it later with `dmm start`).
    #[arg(short = 'h', long)]
    halted: bool,

    /// A property, e.g. -p source=/dev/sdb -p target=/dev/sdc -p strategy=lr,
    /// or for a directory tree: -p kind=tree -p source=/old -p target=/new
    /// -p access=/mnt/work (`dmm get` lists every property).
    #[arg(short = 'p', value_name = "NAME=VALUE", value_parser = property, required = true)]
    properties: Vec<(String, String)>,

    /// Print help.
    #[arg(long, action = ArgAction::Help)]
    help: Option<bool>,
}

/// Delete a migration (its state and export; -f for a running one).
#[derive(Args)]
pub struct DeleteArgs {
    /// Delete even if it is running.
    #[arg(short = 'f', long)]
    force: bool,
    migid: i64,
}

/// A verb that takes only the migid.
#[derive(Args)]
pub struct MigidArgs {
    migid: i64,
}

/// Halt a migration, keeping its copy state (--keep) or removing it
/// (--remove: the next start begins from zero).
#[derive(Args)]
#[command(group(clap::ArgGroup::new("how").required(true).args(["keep", "remove"])))]
pub struct HaltArgs {
    #[arg(long)]
    keep: bool,
    #[arg(long)]
    remove: bool,
    migid: i64,
}

/// Change properties (rate, priority, copies, switchover and logfile take
/// effect at once; the others only before the migration starts).
#[derive(Args)]
pub struct SetArgs {
    #[arg(short = 'p', value_name = "NAME=VALUE", value_parser = property, required = true)]
    properties: Vec<(String, String)>,
    migid: i64,
}

/// Show properties (all, or those named with -p) of one migration or all.
#[derive(Args)]
pub struct GetArgs {
    #[arg(short = 'p', value_name = "NAME")]
    names: Vec<String>,
    migid: Option<i64>,
}

/// Retry a tree migration's file in error now, without waiting for its
/// backoff (PATH as `dmm stat` shows it).
#[derive(Args)]
pub struct RetryArgs {
    migid: i64,
    path: String,
}

/// Show a migration's statistics; with INTERVAL (seconds), repeat until it
/// settles.
#[derive(Args)]
pub struct StatArgs {
    migid: i64,
    interval: Option<f64>,
}

pub(crate) fn client(global: &Global) -> Client {
    Client::new(Endpoint::Unix(Layout::new(&global.state_dir).api_socket()))
}

/// Turns a client error into the one line the CLI prints.
pub(crate) fn explain(err: ClientError) -> anyhow::Error {
    anyhow::anyhow!(err.to_string())
}

pub(crate) fn print_json(value: &impl serde::Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

pub async fn create(args: CreateArgs, global: &Global) -> Result<()> {
    let properties: BTreeMap<String, String> = args.properties.into_iter().collect();
    let created = client(global)
        .create(&properties, args.halted)
        .await
        .map_err(explain)?;
    if global.json {
        print_json(&created);
    } else {
        println!("{}", created.record.id);
    }
    Ok(())
}

pub async fn delete(args: DeleteArgs, global: &Global) -> Result<()> {
    let verb = Verb::Delete { force: args.force };
    client(global)
        .apply(args.migid, verb)
        .await
        .map_err(explain)?;
    if global.json {
        print_json(&json!({ "deleted": args.migid }));
    }
    Ok(())
}

/// start, pause, resume, stop, switchover, commit, rollback.
pub async fn verb(verb: Verb, args: MigidArgs, global: &Global) -> Result<()> {
    apply(verb, args.migid, global).await
}

pub async fn halt(args: HaltArgs, global: &Global) -> Result<()> {
    let verb = Verb::Halt {
        remove: args.remove,
    };
    apply(verb, args.migid, global).await
}

async fn apply(verb: Verb, id: MigrationId, global: &Global) -> Result<()> {
    let view = client(global).apply(id, verb).await.map_err(explain)?;
    if let Some(view) = view {
        report_state(&view, global);
    }
    Ok(())
}

fn report_state(view: &View, global: &Global) {
    if global.json {
        print_json(view);
    } else if let Some(position) = view.queue_position {
        println!(
            "{}: {} (position {position}; dmm queue shows the order)",
            view.record.id, view.record.state
        );
    } else {
        println!("{}: {}", view.record.id, view.record.state);
    }
}

pub async fn set(args: SetArgs, global: &Global) -> Result<()> {
    let changes: BTreeMap<String, String> = args.properties.into_iter().collect();
    let view = client(global)
        .set(args.migid, &changes)
        .await
        .map_err(explain)?;
    report_state(&view, global);
    Ok(())
}

pub async fn retry(args: RetryArgs, global: &Global) -> Result<()> {
    let view = client(global)
        .retry(args.migid, &args.path)
        .await
        .map_err(explain)?;
    report_state(&view, global);
    Ok(())
}

pub async fn get(args: GetArgs, global: &Global) -> Result<()> {
    let migrations = match args.migid {
        Some(id) => vec![client(global).get(id).await.map_err(explain)?],
        None => client(global).list().await.map_err(explain)?,
    };
    for name in &args.names {
        dmm_daemon::lookup_property(name)?;
    }
    let mut rows = Vec::new();
    for view in &migrations {
        for (name, value) in &view.effective {
            if !args.names.is_empty() && !args.names.contains(name) {
                continue;
            }
            let source = match view.record.properties.contains_key(name) {
                true => "set",
                false => "default",
            };
            rows.push((view.record.id, name, value, source));
        }
    }
    if global.json {
        let rows: Vec<_> = rows
            .iter()
            .map(|(migid, property, value, source)| {
                json!({ "migid": migid, "property": property, "value": value, "source": source })
            })
            .collect();
        print_json(&rows);
        return Ok(());
    }
    println!("{:<6} {:<11} {:<40} SOURCE", "MIGID", "PROPERTY", "VALUE");
    for (migid, property, value, source) in rows {
        println!("{migid:<6} {property:<11} {value:<40} {source}");
    }
    Ok(())
}

/// "42% of 4.0 GiB" style summary of a migration's progress.
fn progress_summary(view: &View) -> String {
    match &view.progress {
        None => "-".into(),
        Some(Report::Tree(tree)) => {
            let counts = &tree.progress.counts;
            let percent = counts.bytes_done * 100 / counts.bytes_total.max(1);
            format!("{percent}% of {}", human(counts.bytes_total))
        }
        Some(Report::Volume(volume)) => {
            let percent = volume.chunks_on_destination * 100 / volume.chunks.max(1);
            format!("{percent}% of {}", human(volume.volume_bytes))
        }
        Some(Report::Stream(store)) => {
            let settled = store.streams.len() - store.pending;
            format!("{settled}/{} streams", store.streams.len())
        }
    }
}

pub(crate) fn effective<'a>(view: &'a View, name: &str) -> &'a str {
    view.effective.get(name).map_or("", String::as_str)
}

pub async fn list(global: &Global) -> Result<()> {
    let migrations = client(global).list().await.map_err(explain)?;
    if global.json {
        print_json(&migrations);
        return Ok(());
    }
    println!(
        "{:<6} {:<7} {:<14} {:<16} SOURCE -> TARGET",
        "MIGID", "KIND", "STATE", "PROGRESS"
    );
    for view in migrations {
        let record = &view.record;
        println!(
            "{:<6} {:<7} {:<14} {:<16} {} -> {}",
            record.id,
            record.kind.as_str(),
            record.state.as_str(),
            progress_summary(&view),
            effective(&view, "source"),
            effective(&view, "target")
        );
    }
    Ok(())
}

pub async fn show(global: &Global) -> Result<()> {
    let migrations = client(global).list().await.map_err(explain)?;
    if global.json {
        print_json(&migrations);
        return Ok(());
    }
    for view in migrations {
        let record = &view.record;
        println!(
            "migration {} ({}): {}",
            record.id, record.kind, record.state
        );
        if let Some(error) = &record.error {
            println!("  error:      {error}");
        }
        if let Some(pending) = &record.pending {
            println!("  pending:    {}", pending.verb);
        }
        for (name, value) in &view.effective {
            println!("  {name:<11} {value}");
        }
        if view.progress.is_some() {
            println!("  {}", stat_line(&view));
        }
    }
    Ok(())
}

fn eta(seconds: Option<u64>) -> String {
    seconds
        .map(|s| format!(", ETA {}m{:02}s", s / 60, s % 60))
        .unwrap_or_default()
}

fn stat_line(view: &View) -> String {
    let record = &view.record;
    let p = match &view.progress {
        None => return format!("{}: {} (not running)", record.id, record.state),
        Some(Report::Tree(tree)) => return tree_stat_line(record, tree),
        Some(Report::Stream(store)) => return stream_stat_line(record, store),
        Some(Report::Volume(volume)) => volume,
    };
    let error = p
        .error
        .as_deref()
        .or(record.error.as_deref())
        .map(|e| format!(", error: {e}"))
        .unwrap_or_default();
    let (phase, activity) = (name_of(&p.phase), name_of(&p.activity));
    let doing = if phase == activity {
        phase
    } else {
        format!("{phase}, {activity}")
    };
    format!(
        "{}: {} ({doing}), {} copied, {} of {} chunks on the destination, {}/s{}, {} dirty chunks, pause {:.2} ms{error}",
        record.id,
        record.state,
        human(p.copied_bytes),
        p.chunks_on_destination,
        p.chunks,
        human(p.bytes_per_second),
        eta(p.eta_seconds),
        p.dirty_chunks,
        p.longest_pause_ms,
    )
}

/// The name a value has in the API's JSON (`switched-over`).
fn name_of(value: &impl serde::Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A tree migration's progress; per-file errors follow on their own lines.
/// A stream store's line, then one per stream: its size, what it takes
/// on its tier, and its move.
fn stream_stat_line(record: &MigrationRecord, store: &StreamReport) -> String {
    let paused = if store.paused { ", paused" } else { "" };
    let figures = &store.figures;
    let mut line = format!(
        "{}: {}{paused}, {} streams, {} moving or due, {} moves linked: {} drained, {} redirected",
        record.id,
        record.state,
        store.streams.len(),
        store.pending,
        figures.moves,
        human(figures.drained),
        human(figures.redirected),
    );
    if let Some(error) = &record.error {
        line += &format!(", error: {error}");
    }
    for stream in &store.streams {
        let moving = stream
            .moving
            .as_ref()
            .map(|(phase, to)| format!(", moving to {to}: {phase}"))
            .unwrap_or_default();
        line += &format!(
            "\n  {}: {} on {} (stored in {}){moving}",
            stream.name,
            human(stream.bytes),
            stream.tier,
            human(stream.stored)
        );
    }
    line
}

fn tree_stat_line(record: &MigrationRecord, tree: &TreeReport) -> String {
    let counts = &tree.progress.counts;
    let paused = if tree.paused { ", paused" } else { "" };
    let mut line = format!(
        "{}: {} ({}{paused}), dirs {}/{}, files {}/{}, {} of {}, {}/s{}, {} in error",
        record.id,
        record.state,
        name_of(&tree.phase),
        counts.dirs_done,
        counts.dirs_total,
        counts.files_done,
        counts.files_total,
        human(counts.bytes_done),
        human(counts.bytes_total),
        human(tree.progress.rate),
        eta(tree.progress.eta_seconds),
        counts.errors,
    );
    if let Some(error) = &record.error {
        line += &format!(", error: {error}");
    }
    for e in &tree.progress.errors {
        line += &format!(
            "\n  error: {}: {} (attempt {})",
            e.path, e.message, e.attempts
        );
    }
    line
}

pub async fn stat(args: StatArgs, global: &Global) -> Result<()> {
    if args.interval.is_some_and(|i| !(i > 0.0 && i.is_finite())) {
        bail!("INTERVAL must be a positive number of seconds");
    }
    loop {
        let view = client(global).get(args.migid).await.map_err(explain)?;
        if global.json {
            println!("{}", serde_json::to_string(&view)?);
        } else {
            println!("{}", stat_line(&view));
        }
        match args.interval {
            Some(seconds) if !view.record.state.is_settled() => {
                tokio::time::sleep(Duration::from_secs_f64(seconds)).await
            }
            _ => return Ok(()),
        }
    }
}

pub async fn log(args: MigidArgs, global: &Global) -> Result<()> {
    let events = client(global).log(args.migid).await.map_err(explain)?;
    if global.json {
        print_json(&events);
        return Ok(());
    }
    for event in events {
        println!(
            "{} {:<5} {}",
            timestamp(event.at),
            event.level,
            event.message
        );
    }
    Ok(())
}

/// RFC 3339 UTC time with milliseconds from milliseconds since the epoch.
fn timestamp(ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_dates() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp(1_795_369_959_563), "2026-11-22T17:52:39.563Z");
        assert_eq!(timestamp(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn properties_parse_as_name_equals_value() {
        assert_eq!(property("rate=10M"), Ok(("rate".into(), "10M".into())));
        assert!(property("rate").is_err());
    }
}
