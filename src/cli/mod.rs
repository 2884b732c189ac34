//! The command-line edge: argument definitions and the subcommands' entry points.
//! Errors here are `anyhow` with context that tells the user what to fix.

pub mod aggregator;
pub mod args;
pub mod bench;
pub mod check;
pub mod collector;
pub mod demo;
mod discovery_cfg;
pub mod node;
pub mod ring;
pub mod status;

pub use args::*;
