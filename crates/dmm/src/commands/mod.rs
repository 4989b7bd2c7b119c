//! One module per `dmm` subcommand.

pub mod demo;
pub mod serve;
