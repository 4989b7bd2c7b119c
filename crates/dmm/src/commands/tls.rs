//! `dmm tls`: a small PKI for NBD and the daemons' TLS (see
//! [`dmm_tls::pki`]): a cluster CA, then certificates for each node or
//! client, in the directory layout dmm, QEMU and libnbd read.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

/// Make certificates for TLS: a CA, then one directory per node or client.
#[derive(Args)]
pub struct TlsArgs {
    #[command(subcommand)]
    command: TlsCommand,
}

#[derive(Subcommand)]
enum TlsCommand {
    Init(InitArgs),
    Issue(IssueArgs),
}

/// Make a CA in DIR: ca-cert.pem (give it to every node and client) and
/// ca-key.pem (keep it there, owner-only).
#[derive(Args)]
struct InitArgs {
    dir: PathBuf,

    /// The CA's name (its certificate's common name).
    #[arg(long, default_value = "dmm cluster CA")]
    name: String,
}

/// Issue certificates for NAME, signed by the CA: server-cert.pem,
/// server-key.pem, client-cert.pem, client-key.pem and ca-cert.pem in
/// --out (default ./NAME), ready for --tls-certificates, qemu-nbd's
/// tls-creds-x509 and libnbd's --tls-certificates.
#[derive(Args)]
struct IssueArgs {
    /// The CA's directory (dmm tls init).
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,

    /// The node's or client's name: a DNS name, as peers reach it and as
    /// allow-lists name it.
    name: String,

    /// More DNS names or IP addresses the certificates are valid for.
    #[arg(long, value_name = "NAME|IP,…", value_delimiter = ',')]
    also: Vec<String>,

    /// Where to write them.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

pub fn run(args: TlsArgs) -> Result<()> {
    match args.command {
        TlsCommand::Init(init) => {
            dmm_tls::pki::init(&init.dir, &init.name)?;
            println!("{}", init.dir.join(dmm_tls::CA_CERT).display());
        }
        TlsCommand::Issue(issue) => {
            let out = issue.out.unwrap_or_else(|| PathBuf::from(&issue.name));
            dmm_tls::pki::issue(&issue.ca, &out, &issue.name, &issue.also)?;
            println!("{}", out.display());
        }
    }
    Ok(())
}
