//! `tracing` events of a node go through rcutils logging: printed on the console as every ROS 2
//! node prints, and published on /rosout under the node's logger name.

use std::fmt::Write as _;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

/// Installs the subscriber for node logger `logger`; `RUST_LOG` overrides `default_filter`.
pub fn init(logger: &str, default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let _ = tracing_subscriber::registry().with(filter).with(RcutilsLayer { logger: logger.to_string() }).try_init();
}

struct RcutilsLayer {
    logger: String,
}

/// The event's message followed by its other fields as `name=value`.
#[derive(Default)]
struct Text(String);

impl Visit for Text {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

impl<S: Subscriber> Layer<S> for RcutilsLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut text = Text::default();
        event.record(&mut text);
        let meta = event.metadata();
        let severity = match *meta.level() {
            Level::ERROR => r2r::LogSeverity::Error,
            Level::WARN => r2r::LogSeverity::Warn,
            Level::INFO => r2r::LogSeverity::Info,
            _ => r2r::LogSeverity::Debug,
        };
        r2r::log(&text.0, &self.logger, meta.file().unwrap_or(""), meta.line().unwrap_or(0), severity);
    }
}
