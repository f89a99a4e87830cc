//! `zlayer-storage` binary: parse, set up logging, dispatch to one `cmd` file per subcommand.

mod cli;
mod cmd;
mod observability;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let code = cmd::dispatch(cli);
    ExitCode::from(code)
}
