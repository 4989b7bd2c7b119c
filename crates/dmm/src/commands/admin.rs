//! The management verbs (`create`, `start`, `stat`, …): each is one call of
//! the daemon's API over the state directory's Unix socket, and prints the
//! answer for a human, or as JSON with `--json`.

use std::time::Duration;

use anyhow::{Result, bail};
use clap::{ArgAction, Args};
use dmm_daemon::Layout;
use dmm_daemon::client::{Client, ClientError, Endpoint};
use serde_json::{Value, json};

use crate::Global;
use dmm_control::human;

/// `-p name=value`.
fn property(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not name=value"))?;
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

/// Show a migration's statistics; with INTERVAL (seconds), repeat until it
/// settles.
#[derive(Args)]
pub struct StatArgs {
    migid: i64,
    interval: Option<f64>,
}

fn client(global: &Global) -> Client {
    Client::new(Endpoint::Unix(Layout::new(&global.state_dir).api_socket()))
}

/// Turns a client error into the one line the CLI prints.
fn explain(err: ClientError) -> anyhow::Error {
    anyhow::anyhow!(err.to_string())
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

pub async fn create(args: CreateArgs, global: &Global) -> Result<()> {
    let properties: serde_json::Map<String, Value> = args
        .properties
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let body = json!({ "properties": properties, "halted": args.halted });
    let created = client(global)
        .post("/api/migrations", Some(body))
        .await
        .map_err(explain)?;
    if global.json {
        print_json(&created);
    } else {
        println!("{}", created["id"]);
    }
    Ok(())
}

pub async fn delete(args: DeleteArgs, global: &Global) -> Result<()> {
    let path = format!("/api/migrations/{}?force={}", args.migid, args.force);
    client(global)
        .call(hyper::Method::DELETE, &path, None)
        .await
        .map_err(explain)?;
    if global.json {
        print_json(&json!({ "deleted": args.migid }));
    }
    Ok(())
}

/// start, pause, resume, stop, switchover, commit, rollback.
pub async fn verb(verb: &str, args: MigidArgs, global: &Global) -> Result<()> {
    let path = format!("/api/migrations/{}/{verb}", args.migid);
    let migration = client(global).post(&path, None).await.map_err(explain)?;
    report_state(&migration, global);
    Ok(())
}

pub async fn halt(args: HaltArgs, global: &Global) -> Result<()> {
    let path = format!("/api/migrations/{}/halt?remove={}", args.migid, args.remove);
    let migration = client(global).post(&path, None).await.map_err(explain)?;
    report_state(&migration, global);
    Ok(())
}

fn report_state(migration: &Value, global: &Global) {
    if global.json {
        print_json(migration);
    } else {
        println!("{}: {}", migration["id"], text(&migration["state"]));
    }
}

pub async fn set(args: SetArgs, global: &Global) -> Result<()> {
    let changes: serde_json::Map<String, Value> = args
        .properties
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let path = format!("/api/migrations/{}/properties", args.migid);
    let migration = client(global)
        .call(hyper::Method::PATCH, &path, Some(Value::Object(changes)))
        .await
        .map_err(explain)?;
    report_state(&migration, global);
    Ok(())
}

pub async fn get(args: GetArgs, global: &Global) -> Result<()> {
    let migrations = match args.migid {
        Some(id) => vec![
            client(global)
                .get(&format!("/api/migrations/{id}"))
                .await
                .map_err(explain)?,
        ],
        None => list_all(global).await?,
    };
    for name in &args.names {
        dmm_daemon::lookup_property(name)?;
    }
    let mut rows = Vec::new();
    for migration in &migrations {
        let effective = migration["effective"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        for (name, value) in effective {
            if !args.names.is_empty() && !args.names.contains(&name) {
                continue;
            }
            let source = if migration["properties"].get(&name).is_some() {
                "set"
            } else {
                "default"
            };
            rows.push(json!({ "migid": migration["id"], "property": name, "value": value, "source": source }));
        }
    }
    if global.json {
        print_json(&Value::Array(rows));
        return Ok(());
    }
    println!("{:<6} {:<11} {:<40} SOURCE", "MIGID", "PROPERTY", "VALUE");
    for row in rows {
        println!(
            "{:<6} {:<11} {:<40} {}",
            text(&row["migid"]),
            text(&row["property"]),
            text(&row["value"]),
            text(&row["source"])
        );
    }
    Ok(())
}

async fn list_all(global: &Global) -> Result<Vec<Value>> {
    let all = client(global)
        .get("/api/migrations")
        .await
        .map_err(explain)?;
    Ok(all.as_array().cloned().unwrap_or_default())
}

fn text(value: &Value) -> String {
    value
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| value.to_string())
}

/// "42% of 4.0 GiB" style summary of a migration's progress.
fn progress_summary(migration: &Value) -> String {
    let progress = &migration["progress"];
    if progress.is_null() {
        return "-".into();
    }
    if progress["kind"] == "tree" {
        let total = progress["bytes_total"].as_u64().unwrap_or(0);
        let done = progress["bytes_done"].as_u64().unwrap_or(0);
        return format!("{}% of {}", done * 100 / total.max(1), human(total));
    }
    let chunks = progress["chunks"].as_u64().unwrap_or(0).max(1);
    let done = progress["chunks_on_destination"].as_u64().unwrap_or(0);
    format!(
        "{}% of {}",
        done * 100 / chunks,
        human(progress["volume_bytes"].as_u64().unwrap_or(0))
    )
}

pub async fn list(global: &Global) -> Result<()> {
    let migrations = list_all(global).await?;
    if global.json {
        print_json(&Value::Array(migrations));
        return Ok(());
    }
    println!(
        "{:<6} {:<7} {:<14} {:<16} SOURCE -> TARGET",
        "MIGID", "KIND", "STATE", "PROGRESS"
    );
    for m in migrations {
        println!(
            "{:<6} {:<7} {:<14} {:<16} {} -> {}",
            text(&m["id"]),
            text(&m["kind"]),
            text(&m["state"]),
            progress_summary(&m),
            text(&m["effective"]["source"]),
            text(&m["effective"]["target"])
        );
    }
    Ok(())
}

pub async fn show(global: &Global) -> Result<()> {
    let migrations = list_all(global).await?;
    if global.json {
        print_json(&Value::Array(migrations));
        return Ok(());
    }
    for m in migrations {
        println!(
            "migration {} ({}): {}",
            m["id"],
            text(&m["kind"]),
            text(&m["state"])
        );
        if let Some(error) = m["error"].as_str() {
            println!("  error:      {error}");
        }
        if let Some(pending) = m["pending"].as_object() {
            println!("  pending:    {}", text(&pending["operation"].clone()));
        }
        for (name, value) in m["effective"].as_object().cloned().unwrap_or_default() {
            println!("  {name:<11} {}", text(&value));
        }
        if !m["progress"].is_null() {
            println!("  {}", stat_line(&m));
        }
    }
    Ok(())
}

fn eta(p: &Value) -> String {
    p["eta_seconds"]
        .as_u64()
        .map(|s| format!(", ETA {}m{:02}s", s / 60, s % 60))
        .unwrap_or_default()
}

fn stat_line(m: &Value) -> String {
    let p = &m["progress"];
    if p.is_null() {
        return format!("{}: {} (not running)", m["id"], text(&m["state"]));
    }
    if p["kind"] == "tree" {
        return tree_stat_line(m);
    }
    let eta = eta(p);
    let error = p["error"]
        .as_str()
        .or(m["error"].as_str())
        .map(|e| format!(", error: {e}"))
        .unwrap_or_default();
    let (phase, activity) = (text(&p["phase"]), text(&p["activity"]));
    let doing = if phase == activity {
        phase
    } else {
        format!("{phase}, {activity}")
    };
    format!(
        "{}: {} ({doing}), {} copied, {} of {} chunks on the destination, {}/s{eta}, {} dirty chunks, pause {:.2} ms{error}",
        m["id"],
        text(&m["state"]),
        human(p["copied_bytes"].as_u64().unwrap_or(0)),
        p["chunks_on_destination"],
        p["chunks"],
        human(p["bytes_per_second"].as_u64().unwrap_or(0)),
        p["dirty_chunks"],
        p["longest_pause_ms"].as_f64().unwrap_or(0.0),
    )
}

/// A tree migration's progress; per-file errors follow on their own lines.
fn tree_stat_line(m: &Value) -> String {
    let p = &m["progress"];
    let count = |name: &str| p[name].as_u64().unwrap_or(0);
    let paused = if p["paused"] == true { ", paused" } else { "" };
    let mut line = format!(
        "{}: {} ({}{paused}), dirs {}/{}, files {}/{}, {} of {}, {}/s{}, {} in error",
        m["id"],
        text(&m["state"]),
        text(&p["phase"]),
        count("dirs_done"),
        count("dirs_total"),
        count("files_done"),
        count("files_total"),
        human(count("bytes_done")),
        human(count("bytes_total")),
        human(count("rate")),
        eta(p),
        count("errors"),
    );
    if let Some(error) = m["error"].as_str() {
        line += &format!(", error: {error}");
    }
    for e in p["errors"].as_array().into_iter().flatten() {
        line += &format!(
            "\n  error: {}: {} (attempt {})",
            text(&e["path"]),
            text(&e["message"]),
            e["attempts"]
        );
    }
    line
}

pub async fn stat(args: StatArgs, global: &Global) -> Result<()> {
    if args.interval.is_some_and(|i| !(i > 0.0 && i.is_finite())) {
        bail!("INTERVAL must be a positive number of seconds");
    }
    let path = format!("/api/migrations/{}", args.migid);
    loop {
        let migration = client(global).get(&path).await.map_err(explain)?;
        if global.json {
            println!("{}", serde_json::to_string(&migration)?);
        } else {
            println!("{}", stat_line(&migration));
        }
        let settled = matches!(
            migration["state"].as_str(),
            Some("committed" | "rolled-back" | "halted" | "stopped" | "failed" | "switched-over")
        );
        match args.interval {
            Some(seconds) if !settled => tokio::time::sleep(Duration::from_secs_f64(seconds)).await,
            _ => return Ok(()),
        }
    }
}

pub async fn log(args: MigidArgs, global: &Global) -> Result<()> {
    let path = format!("/api/migrations/{}/log", args.migid);
    let events = client(global).get(&path).await.map_err(explain)?;
    if global.json {
        print_json(&events);
        return Ok(());
    }
    for event in events.as_array().cloned().unwrap_or_default() {
        let at = event["at"].as_i64().unwrap_or(0);
        println!(
            "{} {:<5} {}",
            timestamp(at),
            text(&event["level"]),
            text(&event["message"])
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
