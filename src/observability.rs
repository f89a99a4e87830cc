//! Logging setup: text or JSON to stderr, `RUST_LOG` wins over flags and config.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber once.
pub fn init(json: bool, verbose: u8, config_filter: Option<&str>) {
    let default = match verbose {
        0 => config_filter.unwrap_or("info"),
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
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
