//! Logging setup shared by every binary: `tracing` with an `RUST_LOG`-style env filter.

use tracing_subscriber::EnvFilter;

/// Installs a stderr `tracing` subscriber; `RUST_LOG` overrides `default_filter`.
/// Calling it twice is harmless (the second call keeps the first subscriber).
pub fn init(default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}
