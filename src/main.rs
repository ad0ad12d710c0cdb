//! The `tern` command line: run, chat, perplexity, tokenize, info, bench.
//!
//! This binary is the only place that chooses a backend (see `cli::select_backend`). Errors are
//! printed with their whole cause chain and exit with status 1; usage errors exit with status 2.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::init_logging(args.verbose);
    match cli::dispatch(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
