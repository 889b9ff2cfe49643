//! The `sdxld` command line: a thin entry over the library's layers.

mod cli;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    sdxld::engine::device::keep_freed_tensors_in_the_heap();
    cli::run(cli::Cli::parse())
}
