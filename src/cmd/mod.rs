//! One file per subcommand; each turns arguments into library calls.
//!
//! Exit codes (documented in the README): 0 success, 1 runtime failure, 2 usage error (clap),
//! 3 configuration error, 4 nothing to restore.

use crate::cli::{Cli, Command};

/// Process exit codes.
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const CONFIG: u8 = 3;
    pub const NOT_FOUND: u8 = 4;
}

/// Runs the chosen subcommand and returns the process exit code.
pub fn dispatch(cli: Cli) -> u8 {
    let _ = (&cli.config, cli.log_json, cli.verbose);
    match cli.command {
        Command::Version => {
            println!("zlayer-storage {}", env!("CARGO_PKG_VERSION"));
            exit::OK
        }
        _ => {
            eprintln!("zlayer-storage: this subcommand is being built");
            exit::FAILURE
        }
    }
}
