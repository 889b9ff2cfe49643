//! The `sdxld` command line: a thin entry over the library's layers.

mod cli;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    cli::run(cli::Cli::parse())
}
