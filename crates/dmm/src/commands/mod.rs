//! One module per `dmm` subcommand (the management verbs share `admin`).

pub mod admin;
pub mod daemon;
pub mod demo;
pub mod migrate;
pub mod node;
pub mod serve;
pub mod tls;
pub mod ui;
pub mod verify;
