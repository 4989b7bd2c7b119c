//! One module per `dmm` subcommand.

pub mod demo;
pub mod migrate;
pub mod serve;
pub mod verify;
