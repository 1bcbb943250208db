//! Errors of the policy module. Each names the tensor, field or file it is about.

use std::path::PathBuf;

/// What can go wrong building, running, saving or loading the policy heads.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A config field is out of range or inconsistent with another.
    #[error("policy config: `{field}` {reason}")]
    Config {
        /// Dotted field name, e.g. `sensor.conv_channels`.
        field: String,
        /// What was expected.
        reason: String,
    },
    /// An input tensor has the wrong shape, dtype or values.
    #[error("policy input `{name}`: {reason}")]
    Input {
        /// Which input (`sensor`, `vl`, `actions`, ...).
        name: String,
        /// What was expected.
        reason: String,
    },
    /// Normalization statistics do not fit the config or hold invalid values.
    #[error("normalization stats `{name}`: {reason}")]
    Stats {
        /// Which statistics (`sensor`, `state`, `action`) and field.
        name: String,
        /// What was expected.
        reason: String,
    },
    /// A checkpoint tensor is missing, unexpected or mis-shaped.
    #[error("checkpoint {path}: tensor `{tensor}` {reason}")]
    CheckpointTensor {
        /// Checkpoint file.
        path: PathBuf,
        /// Tensor name.
        tensor: String,
        /// What was wrong and what was expected.
        reason: String,
    },
    /// A checkpoint is unreadable or its metadata is invalid.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// Checkpoint file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// No VL features were given and no VL feature source is attached.
    #[error("no VL features: the observation has none and the policy has no VL feature source")]
    NoVlFeatures,
    /// The VL feature source failed.
    #[error("VL feature source: {0}")]
    VlSource(#[source] crate::vlm::VlmError),
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}
