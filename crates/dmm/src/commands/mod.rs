//! One module per `dmm` subcommand.

pub mod serve;
