//! `zlayer-storage forget ID [--yes]`: drop an identity's layer from the store through the
//! running daemon (which refuses while it holds the identity or has layers of it queued).

use std::io::{BufRead, IsTerminal, Write};

use anyhow::Context;
use zlayer_storage::Config;
use zlayer_storage::control::client;
use zlayer_storage::proto::control::ForgetRequest;

use super::exit;
use crate::cli::ForgetArgs;

pub async fn run(config: &Config, args: ForgetArgs) -> anyhow::Result<u8> {
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            eprintln!(
                "zlayer-storage: forget {} needs --yes when stdin is not a terminal",
                args.id
            );
            return Ok(exit::USAGE);
        }
        eprint!(
            "forget {}: its manifest is deleted from the store and its layers are collected by gc \
             after the grace period. Type the identity to confirm: ",
            args.id
        );
        std::io::stderr().flush().ok();
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer).ok();
        if answer.trim() != args.id {
            eprintln!("not confirmed; nothing changed");
            return Ok(exit::USAGE);
        }
    }
    // Forgetting an identity twice is the same as once, so a lost connection is retried.
    let reply = client::call(&config.snapshotter.control_socket, |mut c| {
        let identity = args.id.clone();
        async move { c.forget(ForgetRequest { identity }).await }
    })
    .await
    .with_context(|| format!("forget of {} failed", args.id))?;
    if reply.removed {
        println!(
            "{}: forgotten (blobs go at the next gc after gc_grace_secs)",
            args.id
        );
    } else {
        println!("{}: the store had no manifest for it", args.id);
    }
    Ok(exit::OK)
}
