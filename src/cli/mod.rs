//! The command-line edge: argument definitions and the subcommands' entry points.

pub mod args;
pub use args::*;
