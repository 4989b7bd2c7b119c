//! `dmm ui`: the dashboard's login. The daemon serves the page; this asks
//! it for a one-time login URL, prints it, and opens it in the desktop's
//! browser when there is one (as `rclone gui` does).

use std::process::{Command, Stdio};

use anyhow::Result;
use clap::Args;

use super::admin::{client, explain};
use crate::Global;

/// Open the web dashboard: prints a login URL that works once (and opens
/// it in the browser when the session has a desktop).
#[derive(Args)]
pub struct UiArgs {
    /// Serve the dashboard on this loopback address (default: the daemon's
    /// --listen address if it has one, else a port the system picks on
    /// 127.0.0.1).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// Only print the URL.
    #[arg(long)]
    no_browser: bool,
}

pub async fn run(args: UiArgs, global: &Global) -> Result<()> {
    let url = client(global)
        .login_url(args.listen.as_deref())
        .await
        .map_err(explain)?;
    println!("{url}");
    if !args.no_browser && has_desktop() {
        open_browser(&url);
    }
    Ok(())
}

fn has_desktop() -> bool {
    ["DISPLAY", "WAYLAND_DISPLAY"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
}

/// Hands the URL to the desktop's opener; the URL is printed either way.
fn open_browser(url: &str) {
    let opened = Command::new("xdg-open")
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    if let Err(err) = opened {
        eprintln!("could not open a browser ({err}): open the URL above");
    }
}
