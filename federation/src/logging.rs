//! A slog drain that forwards raft-rs's log records to `tracing`, so the store logs through
//! the same subscriber as the rest of Isthmus.

use std::fmt::{self, Write as _};

use slog::{Drain, Level, OwnedKVList, Record, KV};

/// Where raft-rs's own log lines appear.
const TARGET: &str = "isthmus_federation::raft";

/// Forwards every slog record to a `tracing` event with target `isthmus_federation::raft`.
pub(crate) struct TracingDrain;

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), slog::Never> {
        // Skip the formatting work when nobody listens at this level.
        let enabled = match record.level() {
            Level::Critical | Level::Error => {
                tracing::enabled!(target: TARGET, tracing::Level::ERROR)
            }
            Level::Warning => tracing::enabled!(target: TARGET, tracing::Level::WARN),
            Level::Info => tracing::enabled!(target: TARGET, tracing::Level::INFO),
            Level::Debug => tracing::enabled!(target: TARGET, tracing::Level::DEBUG),
            Level::Trace => tracing::enabled!(target: TARGET, tracing::Level::TRACE),
        };
        if !enabled {
            return Ok(());
        }
        let mut fields = KvString::default();
        // Formatting failures only lose context fields; the message itself is still logged.
        let _ = record.kv().serialize(record, &mut fields);
        let _ = values.serialize(record, &mut fields);
        let message = record.msg();
        let fields = fields.0;
        match record.level() {
            Level::Critical | Level::Error => {
                tracing::error!(target: TARGET, "{message}{fields}")
            }
            Level::Warning => {
                tracing::warn!(target: TARGET, "{message}{fields}")
            }
            Level::Info => {
                tracing::info!(target: TARGET, "{message}{fields}")
            }
            Level::Debug => {
                tracing::debug!(target: TARGET, "{message}{fields}")
            }
            Level::Trace => {
                tracing::trace!(target: TARGET, "{message}{fields}")
            }
        }
        Ok(())
    }
}

/// Collects slog key-values as ` key=value` pairs.
#[derive(Default)]
struct KvString(String);

impl slog::Serializer for KvString {
    fn emit_arguments(&mut self, key: slog::Key, val: &fmt::Arguments<'_>) -> slog::Result {
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

/// The logger handed to raft-rs (which adds `raft_id` to every record itself).
pub(crate) fn raft_logger() -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!())
}
