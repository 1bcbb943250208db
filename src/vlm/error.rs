//! Errors of the Qwen2.5-VL module: each names the file, tensor or field it is about.

use std::path::PathBuf;

/// Everything that can go wrong loading or running the vision-language model.
#[derive(Debug, thiserror::Error)]
pub enum VlmError {
    /// A file could not be read.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        error: std::io::Error,
    },
    /// `config.json` is not valid or misses a field.
    #[error("config {path}: {msg}")]
    Config {
        /// The config file (or a description of where it came from).
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A safetensors file is corrupt or truncated.
    #[error("safetensors {path}: {msg}")]
    Safetensors {
        /// The weight file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A tensor the model needs is missing from the checkpoint.
    #[error("missing tensor `{name}` (expected shape {expected:?}) in {dir}")]
    MissingTensor {
        /// Tensor name in the transformers>=4.52 layout.
        name: String,
        /// The shape the config implies.
        expected: Vec<i64>,
        /// The model directory.
        dir: PathBuf,
    },
    /// A tensor has another shape than the config implies.
    #[error("tensor `{name}` in {file}: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// Tensor name as stored.
        name: String,
        /// The file holding it.
        file: PathBuf,
        /// The shape the config implies.
        expected: Vec<i64>,
        /// The shape stored.
        found: Vec<i64>,
    },
    /// A tensor is stored with a dtype that is not a floating point weight type.
    #[error("tensor `{name}` in {file}: dtype {found} is not a weight dtype (expected F32, F16 or BF16)")]
    WrongDtype {
        /// Tensor name as stored.
        name: String,
        /// The file holding it.
        file: PathBuf,
        /// The stored dtype.
        found: String,
    },
    /// The checkpoint holds tensors the model does not have (another architecture or config).
    #[error("unexpected tensor(s) in {dir} not used by this config: {names:?}")]
    UnexpectedTensors {
        /// The model directory.
        dir: PathBuf,
        /// The first few unexpected names.
        names: Vec<String>,
    },
    /// An image could not be decoded or has an unusable size.
    #[error("image {what}: {msg}")]
    Image {
        /// The file or frame.
        what: String,
        /// What is wrong.
        msg: String,
    },
    /// The tokenizer could not be loaded or failed to encode.
    #[error("tokenizer {what}: {msg}")]
    Tokenizer {
        /// The file or text.
        what: String,
        /// What is wrong.
        msg: String,
    },
    /// Inputs handed to the model are inconsistent (shapes, token counts, dtype).
    #[error("invalid model input: {0}")]
    Input(String),
    /// An error raised by libtorch.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// The checkpointed backward pass failed.
    #[error("gradient checkpointing: {0}")]
    Checkpoint(#[from] super::grad_checkpoint::CheckpointError),
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, VlmError>;
