//! This node's verbs: `dmm config` (settings such as `maxrunning`),
//! `dmm queue` (the migrations waiting for a slot, and their order),
//! `dmm peers` (the other daemons this one knows), and in a cluster on
//! etcd `dmm nodes` (every node, up or down, and what it owns) and
//! `dmm where` (which node owns a volume).

use std::collections::BTreeMap;

use anyhow::Result;
use clap::Args;
use dmm_control::human;
use serde_json::json;

use super::admin::{client, effective, explain, print_json, property};
use crate::Global;

/// Show the daemon's settings, or change them (e.g. maxrunning=2;
/// maxrunning=unlimited restores the default). They persist in the catalog.
#[derive(Args)]
pub struct ConfigArgs {
    #[arg(value_name = "NAME=VALUE", value_parser = property)]
    changes: Vec<(String, String)>,
}

/// Show the migrations waiting for a slot under maxrunning, in the order
/// they start; with MIGID and POSITION, move one (1: next to start).
#[derive(Args)]
pub struct QueueArgs {
    #[arg(requires = "position")]
    migid: Option<i64>,
    position: Option<usize>,
}

pub async fn config(args: ConfigArgs, global: &Global) -> Result<()> {
    let client = client(global);
    let settings = match args.changes.is_empty() {
        true => client.settings().await,
        false => {
            let changes: BTreeMap<String, String> = args.changes.into_iter().collect();
            client.configure(&changes).await
        }
    }
    .map_err(explain)?;
    if global.json {
        print_json(&settings);
        return Ok(());
    }
    println!("{:<11} {:<10} {:<8} MEANING", "SETTING", "VALUE", "SOURCE");
    for (name, shown) in settings {
        let source = if shown.default { "default" } else { "set" };
        println!("{name:<11} {:<10} {source:<8} {}", shown.value, shown.help);
    }
    Ok(())
}

pub async fn queue(args: QueueArgs, global: &Global) -> Result<()> {
    let client = client(global);
    let queue = match (args.migid, args.position) {
        (Some(id), Some(position)) => client.move_in_queue(id, position).await,
        _ => client.queue().await,
    }
    .map_err(explain)?;
    if global.json {
        print_json(&json!(queue));
        return Ok(());
    }
    println!(
        "{} running (maxrunning {}), {} queued",
        queue.running,
        queue.maxrunning,
        queue.queued.len()
    );
    if queue.queued.is_empty() {
        return Ok(());
    }
    println!("{:<4} {:<6} {:<7} SOURCE -> TARGET", "POS", "MIGID", "KIND");
    for (at, &id) in queue.queued.iter().enumerate() {
        let view = client.get(id).await.map_err(explain)?;
        println!(
            "{:<4} {id:<6} {:<7} {} -> {}",
            at + 1,
            view.record.kind.as_str(),
            effective(&view, "source"),
            effective(&view, "target")
        );
    }
    Ok(())
}

/// Show which node of the cluster owns a volume (by its export name), its
/// fencing token, and the move between nodes under way if any.
#[derive(Args)]
pub struct WhereArgs {
    volume: String,
}

/// List the nodes of the cluster (--etcd): each up or down, its addresses
/// and free space, the volumes it owns; and whether this node is fenced.
pub async fn nodes(global: &Global) -> Result<()> {
    let view = client(global).cluster_nodes().await.map_err(explain)?;
    if global.json {
        print_json(&view);
        return Ok(());
    }
    let fence = match view.fenced {
        true => "FENCED: it serves none of its volumes until its lease is renewed",
        false => "serving",
    };
    println!(
        "this node: {} ({fence}); refused: {} while fenced, {} not its own, {} stale tokens",
        view.node, view.refused_fenced, view.refused_not_owner, view.refused_stale
    );
    println!(
        "{:<14} {:<5} {:<22} {:<22} {:>10} VOLUMES",
        "NODE", "STATE", "API", "NBD", "FREE"
    );
    for node in view.nodes {
        let record = node.record.as_ref();
        let address = |a: Option<&String>| a.map_or("-".to_owned(), String::clone);
        let free = record.map_or("-".to_owned(), |r| human(r.free_bytes));
        println!(
            "{:<14} {:<5} {:<22} {:<22} {:>10} {}",
            node.name,
            if node.up { "up" } else { "down" },
            address(record.and_then(|r| r.api.as_ref())),
            address(record.and_then(|r| r.nbd.as_ref())),
            free,
            node.owns.join(",")
        );
    }
    Ok(())
}

/// Which node owns a volume.
pub async fn whereabouts(args: WhereArgs, global: &Global) -> Result<()> {
    let found = client(global)
        .whereabouts(&args.volume)
        .await
        .map_err(explain)?;
    if global.json {
        print_json(&found);
        return Ok(());
    }
    let Some(owner) = found.owner else {
        println!("{}: no node owns it", found.volume);
        return Ok(());
    };
    let state = if found.owner_up { "up" } else { "down" };
    println!(
        "{}: owned by {} ({state}), token {}",
        found.volume, owner.node, owner.token
    );
    if let Some(moving) = owner.moving {
        println!(
            "moving from {} to {}: {}",
            moving.from,
            moving.to,
            moving.phase.as_str()
        );
    }
    Ok(())
}

/// List the peer daemons (--peer), each asked over mutual TLS who it is.
pub async fn peers(global: &Global) -> Result<()> {
    let peers = client(global).peers().await.map_err(explain)?;
    if global.json {
        print_json(&peers);
        return Ok(());
    }
    println!(
        "{:<16} {:<24} {:<6} {:<10} NBD",
        "PEER", "ADDRESS", "STATE", "VERSION"
    );
    for peer in peers {
        match (&peer.hello, &peer.error) {
            (Some(hello), None) => {
                let tls = if hello.nbd_tls_required { " (TLS)" } else { "" };
                let nbd = hello.nbd.as_deref().unwrap_or("-");
                println!(
                    "{:<16} {:<24} {:<6} {:<10} {nbd}{tls}",
                    peer.name, peer.address, "up", hello.version
                );
            }
            (_, error) => println!(
                "{:<16} {:<24} {:<6} {:<10} {}",
                peer.name,
                peer.address,
                "down",
                "-",
                error.as_deref().unwrap_or("")
            ),
        }
    }
    Ok(())
}
