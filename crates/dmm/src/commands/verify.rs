//! `dmm verify`: compare two stores chunk by chunk.

use std::sync::Arc;

use anyhow::{Result, bail};
use clap::Args;
use dmm_store::{BlockStore, reads_as_zero};
use futures::stream::{self, StreamExt, TryStreamExt};
use serde::Serialize;

use crate::Global;
use dmm_control::human;
use dmm_control::parse_size;
use dmm_nbd::{Access, open_store};

/// Compare two stores chunk by chunk; exit 1 naming the first differing
/// offsets if they differ.
///
/// A and B are image files, block devices or NBD URIs. The first
/// `size(A)` bytes are compared (B may be larger); ranges both stores
/// report as holes or zeroes are not read.
#[derive(Args)]
pub struct VerifyArgs {
    a: String,
    b: String,

    /// Comparison unit.
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_size)]
    segsize: u64,
}

#[derive(Serialize)]
struct Outcome {
    identical: bool,
    bytes_compared: u64,
    bytes_read: u64,
    differing_chunks: u64,
    /// The first differing byte offsets, one per differing chunk (at most
    /// 16).
    first_differences: Vec<u64>,
}

/// The first byte offset where the two stores differ within a range, if
/// any, and how many bytes were read.
async fn compare(
    a: &dyn BlockStore,
    b: &dyn BlockStore,
    offset: u64,
    len: u64,
) -> Result<(Option<u64>, u64)> {
    if reads_as_zero(a, offset, len).await? && reads_as_zero(b, offset, len).await? {
        return Ok((None, 0));
    }
    let (left, right) =
        tokio::try_join!(a.read(offset, len as usize), b.read(offset, len as usize))?;
    let first = left.iter().zip(&right).position(|(x, y)| x != y);
    Ok((first.map(|i| offset + i as u64), 2 * len))
}

pub async fn run(args: VerifyArgs, global: &Global) -> Result<()> {
    if !args.segsize.is_power_of_two() || args.segsize < 4096 {
        bail!("segsize must be a power of two of at least 4 KiB");
    }
    let read_only = Access {
        read_only: true,
        fall_back_to_read_only: false,
    };
    let a = open_store(&args.a, read_only).await?.store;
    let b = open_store(&args.b, read_only).await?.store;
    if b.size() < a.size() {
        bail!(
            "{} is smaller than {} ({} < {} bytes)",
            args.b,
            args.a,
            b.size(),
            a.size()
        );
    }
    let size = a.size();
    let chunks = size.div_ceil(args.segsize);
    let (a, b): (Arc<dyn BlockStore>, Arc<dyn BlockStore>) = (a, b);
    let results: Vec<(Option<u64>, u64)> = stream::iter(0..chunks)
        .map(|chunk| {
            let (a, b) = (a.clone(), b.clone());
            let offset = chunk * args.segsize;
            let len = args.segsize.min(size - offset);
            async move { compare(&*a, &*b, offset, len).await }
        })
        .buffered(8)
        .try_collect()
        .await?;
    let differences: Vec<u64> = results.iter().filter_map(|(d, _)| *d).collect();
    let outcome = Outcome {
        identical: differences.is_empty(),
        bytes_compared: size,
        bytes_read: results.iter().map(|(_, r)| r).sum(),
        differing_chunks: differences.len() as u64,
        first_differences: differences.iter().take(16).copied().collect(),
    };
    if global.json {
        println!("{}", serde_json::to_string(&outcome)?);
    } else if outcome.identical {
        println!(
            "identical: {} compared ({} read, the rest holes on both sides)",
            human(size),
            human(outcome.bytes_read)
        );
    }
    if !outcome.identical {
        let shown: Vec<String> = outcome
            .first_differences
            .iter()
            .map(|o| o.to_string())
            .collect();
        bail!(
            "{} and {} differ in {} chunks, first at byte offsets {}",
            args.a,
            args.b,
            outcome.differing_chunks,
            shown.join(", ")
        );
    }
    Ok(())
}
