//! Showing a migration's progress: a progress bar on a terminal, JSON lines
//! with `--json`, a line per phase change otherwise, and the final report.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use dmm_volume::{Migration, Progress};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use dmm_control::human;

/// How progress is shown.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Json,
    Bar,
    Lines,
}

impl Style {
    pub fn pick(json: bool) -> Style {
        if json {
            Style::Json
        } else if std::io::stderr().is_terminal() {
            Style::Bar
        } else {
            Style::Lines
        }
    }
}

/// A JSON line: the event name, then the progress fields.
#[derive(Serialize)]
struct Line<'a> {
    event: &'a str,
    #[serde(flatten)]
    progress: &'a Progress,
}

pub fn json_line(event: &str, progress: &Progress) -> String {
    serde_json::to_string(&Line { event, progress }).unwrap_or_default()
}

fn describe(progress: &Progress) -> String {
    let activity = serde_json::to_string(&progress.activity).unwrap_or_default();
    let phase = serde_json::to_string(&progress.phase).unwrap_or_default();
    format!(
        "{}: {}",
        phase.trim_matches('"'),
        activity.trim_matches('"')
    )
}

/// Shows progress until stopped.
pub struct Reporter {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Reporter {
    /// Stops showing progress (and clears the bar).
    pub async fn stop(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }
}

/// Starts showing progress.
pub fn spawn(migration: Arc<Migration>, style: Style) -> Reporter {
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let bar = (style == Style::Bar).then(|| {
            let bar = ProgressBar::new(1);
            bar.set_style(
                ProgressStyle::with_template("{prefix:>24} [{bar:20}] {percent:>3}% {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar
        });
        let mut last = String::new();
        let mut tick = 0u64;
        loop {
            let progress = migration.progress().await;
            match style {
                Style::Json if tick.is_multiple_of(4) => {
                    println!("{}", json_line("progress", &progress))
                }
                Style::Json => {}
                Style::Bar => {
                    let bar = bar.as_ref().expect("bar");
                    bar.set_length(progress.chunks.max(1));
                    bar.set_position(progress.chunks_on_destination);
                    bar.set_prefix(describe(&progress));
                    bar.set_message(bar_message(&progress));
                }
                Style::Lines => {
                    let now = describe(&progress);
                    if now != last {
                        eprintln!("dmm: {now}");
                        last = now;
                    }
                }
            }
            tick += 1;
            tokio::select! {
                _ = stopped.changed() => break,
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
    });
    Reporter { stop, task }
}

fn bar_message(progress: &Progress) -> String {
    let eta = progress
        .eta_seconds
        .map(|s| format!(" ETA {}m{:02}s", s / 60, s % 60))
        .unwrap_or_default();
    format!(
        "{} {}/s{eta} {} dirty",
        human(progress.copied_bytes),
        human(progress.bytes_per_second),
        progress.dirty_chunks
    )
}

/// The end-of-migration report, for humans.
pub fn summary(progress: &Progress, allocated: u64) -> String {
    let redundancy = if allocated > 0 {
        format!("{:.2}", progress.copied_bytes as f64 / allocated as f64)
    } else {
        "n/a".into()
    };
    let verification = match (progress.verified_chunks, progress.mismatches.len()) {
        (0, _) => "not run".to_owned(),
        (n, 0) => format!(
            "{n} chunks compared (data with BLAKE3, holes by the allocation maps), all equal"
        ),
        (n, bad) => format!(
            "{n} chunks compared, {bad} differ (first at offset {})",
            progress.mismatches[0]
        ),
    };
    format!(
        "  strategy:      {} (last mode {})\n\
         \x20 time:          {:.2} s\n\
         \x20 copied:        {} of data for {} allocated in a {} volume (copy redundancy {redundancy})\n\
         \x20 clients:       {} reads and {} writes during the migration; {} written to the destination by clients\n\
         \x20 switchover:    clients held for {:.2} ms at most\n\
         \x20 verification:  {verification}",
        progress.strategy,
        progress.mode,
        progress.elapsed_seconds,
        human(progress.copied_bytes),
        human(allocated),
        human(progress.volume_bytes),
        progress.client_reads,
        progress.client_writes,
        human(progress.client_destination_bytes),
        progress.longest_pause_ms,
    )
}
