//! Logging setup: text or JSON to stderr; `RUST_LOG` wins over flags, flags over the config.

use tracing_subscriber::EnvFilter;

/// How chatty a command is by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One-shot commands print their own summary; logs start at warnings.
    OneShot,
    /// Daemons have only their logs to tell what they do.
    Daemon,
}

/// Installs the global subscriber once.
pub fn init(json: bool, verbose: u8, config_filter: Option<&str>, kind: Kind) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(default_filter(verbose, config_filter, kind)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

fn default_filter(verbose: u8, config_filter: Option<&str>, kind: Kind) -> &str {
    let levels: &[&'static str] = match kind {
        Kind::OneShot => &["warn", "info", "debug", "trace"],
        Kind::Daemon => &["info", "debug", "trace"],
    };
    match (verbose, config_filter) {
        (0, Some(f)) => f,
        (v, _) => levels[usize::from(v).min(levels.len() - 1)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbosity_config_and_kind_pick_the_filter() {
        assert_eq!(default_filter(0, None, Kind::OneShot), "warn");
        assert_eq!(default_filter(0, None, Kind::Daemon), "info");
        assert_eq!(
            default_filter(0, Some("debug,h2=warn"), Kind::OneShot),
            "debug,h2=warn"
        );
        assert_eq!(default_filter(1, Some("error"), Kind::OneShot), "info");
        assert_eq!(default_filter(9, None, Kind::OneShot), "trace");
        assert_eq!(default_filter(1, None, Kind::Daemon), "debug");
    }
}
