//! Errors of the policy runtime.

use std::path::PathBuf;

/// Everything the runtime, a model or a loader can report. Each names the checkpoint, input or
/// field it is about and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A checkpoint folder is unusable (missing or corrupt file, manifest or hash mismatch).
    #[error("checkpoint `{dir}`: {reason}")]
    Checkpoint {
        /// The checkpoint folder.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint does not fit this runtime (shapes, cameras, base model).
    #[error("checkpoint {version}: incompatible {field}: runtime expects {expected}, checkpoint has {actual}")]
    Incompatible {
        /// Checkpoint version.
        version: String,
        /// The mismatching field.
        field: String,
        /// What the runtime is configured for.
        expected: String,
        /// What the checkpoint declares.
        actual: String,
    },
    /// A model failed to compute features or actions.
    #[error("model {version}: {reason}")]
    Model {
        /// Checkpoint version of the model.
        version: String,
        /// What failed.
        reason: String,
    },
    /// A model produced a NaN or infinite action value.
    #[error("model {version}: non-finite action value {value} at step {step}, dimension {dim}")]
    NonFinite {
        /// Checkpoint version of the model.
        version: String,
        /// Step index in the chunk.
        step: usize,
        /// Action dimension.
        dim: usize,
        /// The offending value.
        value: f32,
    },
    /// A model produced a chunk of the wrong size.
    #[error("model {version}: action chunk of {actual} values, expected {horizon} x {action_dim}")]
    ActionShape {
        /// Checkpoint version of the model.
        version: String,
        /// Values produced.
        actual: usize,
        /// Expected steps.
        horizon: usize,
        /// Expected values per step.
        action_dim: usize,
    },
    /// An input message is unusable (wrong size, unknown camera, non-finite sample, time going back).
    #[error("input `{name}`: {reason}")]
    Input {
        /// Camera, sensor or state input name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// An operator command was refused (unknown version, nothing to roll back to, loop stopped).
    #[error("operator command `{command}`: {reason}")]
    Operator {
        /// The command.
        command: String,
        /// Why it was refused.
        reason: String,
    },
    /// The runtime configuration is invalid.
    #[error("runtime config `{field}`: {reason}")]
    Config {
        /// The field.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A runtime thread could not be started.
    #[error("starting thread `{name}`: {source}")]
    Thread {
        /// Thread name.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
}
