//! [`TrainError`]: the errors of a training job (stage 1, Stage 2 and the loop that runs them),
//! each with its source kept, and [`TrainError::OutOfMemory`], which the loop recovers from by
//! halving the micro-batch.

use std::error::Error as StdError;
use std::path::PathBuf;

use crate::checkpoint::deploy::DeployError;
use crate::checkpoint::publish::PublishError;
use crate::dataset::reader::ReaderError;
use crate::memory::MemoryError;
use crate::policy::PolicyError;
use crate::train::cache::CacheError;
use crate::train::config::ConfigError;
use crate::train::drift::DriftError;
use crate::train::optim::OptimError;
use crate::train::plot::PlotError;
use crate::train::state::StateError;
use crate::vlm::grad_checkpoint::CheckpointError;
use crate::vlm::lora::LoraError;
use crate::vlm::peft::PeftError;
use crate::vlm::VlmError;

/// What can stop a training job.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The accelerator ran out of memory; the step can be redone with a smaller micro-batch.
    #[error("out of memory: {source}")]
    OutOfMemory {
        /// The libtorch error (possibly wrapped by the model that raised it).
        source: Box<dyn StdError + Send + Sync>,
    },
    /// libtorch reported another error.
    #[error("libtorch: {0}")]
    Torch(#[source] tch::TchError),
    /// The VL model failed.
    #[error(transparent)]
    Vlm(VlmError),
    /// The policy heads failed.
    #[error(transparent)]
    Policy(PolicyError),
    /// Injecting or reading LoRA weights failed.
    #[error(transparent)]
    Lora(LoraError),
    /// Writing the PEFT adapter failed.
    #[error(transparent)]
    Peft(PeftError),
    /// The checkpointed backward pass failed.
    #[error(transparent)]
    GradCheckpoint(CheckpointError),
    /// The compiled dataset could not be read.
    #[error(transparent)]
    Dataset(#[from] ReaderError),
    /// The feature or vision cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// Drift measurement failed.
    #[error(transparent)]
    Drift(#[from] DriftError),
    /// A deploy description (stage-1 checkpoint) is unreadable.
    #[error(transparent)]
    Deploy(#[from] DeployError),
    /// The optimizer rejected its parameters, a gradient or its state.
    #[error(transparent)]
    Optim(#[from] OptimError),
    /// The resumable training state could not be written or read.
    #[error(transparent)]
    State(#[from] StateError),
    /// Publishing a deployable checkpoint failed.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The curves plot could not be written.
    #[error(transparent)]
    Plot(#[from] PlotError),
    /// The job configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Accelerator memory could not be measured or released.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A data-parallel collective failed (a rank stopped, the timeout passed).
    #[error("data-parallel training: {0}")]
    Distributed(#[from] crate::dist::DistError),
    /// A file or folder operation failed.
    #[error("{action} `{path}`: {source}")]
    Io {
        /// What was being done (`create folder`, `read`, ...).
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// An input does not fit the job (empty split, mismatched checkpoint, bad setting).
    #[error("{what}: {reason}")]
    Invalid {
        /// The file, folder, key or value concerned.
        what: String,
        /// What is wrong and what was expected.
        reason: String,
    },
    /// The loop stopped in `phase` at (`epoch`, optimizer `step`) because of `source`.
    #[error("{phase} (epoch {epoch}, step {step}): {source}")]
    At {
        /// Where in the loop: `begin_epoch`, `loss`, `validate`, `publish`, ...
        phase: &'static str,
        /// Epoch (0-based).
        epoch: u64,
        /// Optimizer steps completed.
        step: u64,
        /// The cause.
        source: Box<TrainError>,
    },
}

impl From<crate::checkpoint::model_id::ModelIdError> for TrainError {
    fn from(e: crate::checkpoint::model_id::ModelIdError) -> Self {
        TrainError::Io { action: e.action, path: e.path, source: e.source }
    }
}

impl TrainError {
    /// An [`TrainError::Invalid`].
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        TrainError::Invalid { what: what.into(), reason: reason.into() }
    }

    /// An [`TrainError::Io`] maker for `map_err`.
    pub fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| TrainError::Io { action, path, source }
    }

    /// This error located in the loop.
    pub fn at(self, phase: &'static str, epoch: u64, step: u64) -> Self {
        TrainError::At { phase, epoch, step, source: Box::new(self) }
    }

    /// Whether this is (or, located in the loop, wraps) [`TrainError::OutOfMemory`].
    pub fn is_out_of_memory(&self) -> bool {
        match self {
            TrainError::OutOfMemory { .. } => true,
            TrainError::At { source, .. } => source.is_out_of_memory(),
            _ => false,
        }
    }

    /// A panic caught in a training pass: [`TrainError::OutOfMemory`] when its message reports a
    /// libtorch out-of-memory, otherwise the payload back (to continue unwinding).
    pub fn from_panic(payload: Box<dyn std::any::Any + Send>) -> Result<Self, Box<dyn std::any::Any + Send>> {
        match panic_text(payload.as_ref()) {
            Some(text) if says_out_of_memory(text) => {
                Ok(TrainError::OutOfMemory { source: Box::new(OpPanic(text.to_string())) })
            }
            _ => Err(payload),
        }
    }

    /// `e` as [`TrainError::OutOfMemory`] when a libtorch error in its source chain reports an
    /// out-of-memory condition, otherwise `wrap(e)`. This is the one place that reads libtorch
    /// messages: libtorch raises out-of-memory (`CUDA out of memory. Tried to allocate ...`,
    /// `DefaultCPUAllocator: can't allocate memory`) as a plain `c10::Error` whose only mark is its
    /// text, so the text is what identifies it.
    fn classify<E: StdError + Send + Sync + 'static>(e: E, wrap: impl FnOnce(E) -> Self) -> Self {
        if torch_out_of_memory(&e) {
            TrainError::OutOfMemory { source: Box::new(e) }
        } else {
            wrap(e)
        }
    }
}

/// Whether a libtorch error text reports out-of-memory: CUDA's allocator (`CUDA out of memory`)
/// or the CPU allocator (`not enough memory`, `can't allocate memory`).
pub(crate) fn says_out_of_memory(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    ["out of memory", "not enough memory", "can't allocate memory"].iter().any(|m| text.contains(m))
}

/// The message of a panic payload (`panic!` with a message, or `unwrap` of an error).
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> Option<&str> {
    payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied())
}

/// A panic of a tch op (its infallible ops unwrap libtorch's errors), kept as the source of
/// [`TrainError::OutOfMemory`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OpPanic(String);

/// Whether a [`tch::TchError`] in `e`'s source chain (`e` included) says out of memory.
fn torch_out_of_memory(e: &(dyn StdError + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<tch::TchError>() {
            if says_out_of_memory(&t.to_string()) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

impl From<tch::TchError> for TrainError {
    fn from(e: tch::TchError) -> Self {
        TrainError::classify(e, TrainError::Torch)
    }
}

impl From<VlmError> for TrainError {
    fn from(e: VlmError) -> Self {
        TrainError::classify(e, TrainError::Vlm)
    }
}

impl From<PolicyError> for TrainError {
    fn from(e: PolicyError) -> Self {
        TrainError::classify(e, TrainError::Policy)
    }
}

impl From<LoraError> for TrainError {
    fn from(e: LoraError) -> Self {
        TrainError::classify(e, TrainError::Lora)
    }
}

impl From<PeftError> for TrainError {
    fn from(e: PeftError) -> Self {
        TrainError::classify(e, TrainError::Peft)
    }
}

impl From<CheckpointError> for TrainError {
    fn from(e: CheckpointError) -> Self {
        TrainError::classify(e, TrainError::GradCheckpoint)
    }
}

#[cfg(test)]
mod tests {
    use tch::Kind;

    use super::*;

    #[test]
    fn libtorch_out_of_memory_is_classified_directly_and_through_a_wrapper() {
        let oom = || tch::TchError::Torch("CUDA out of memory. Tried to allocate 2.00 GiB".into());
        assert!(matches!(TrainError::from(oom()), TrainError::OutOfMemory { .. }));
        assert!(matches!(TrainError::from(VlmError::Torch(oom())), TrainError::OutOfMemory { .. }));
        assert!(matches!(TrainError::from(PolicyError::Torch(oom())), TrainError::OutOfMemory { .. }));
        let other = TrainError::from(tch::TchError::Torch("shape '[2, 3]' is invalid".into()));
        assert!(matches!(other, TrainError::Torch(_)), "{other:?}");
        assert!(!other.is_out_of_memory());
        assert!(TrainError::from(oom()).at("loss", 1, 7).is_out_of_memory());
    }

    #[test]
    fn a_real_cpu_allocation_failure_is_out_of_memory_as_error_and_as_panic() {
        let huge = || (Kind::Uint8, tch::Device::Cpu);
        let e = tch::Tensor::f_empty([1i64 << 60], huge()).unwrap_err();
        assert!(TrainError::from(e).is_out_of_memory());
        let payload = std::panic::catch_unwind(|| tch::Tensor::empty([1i64 << 60], huge())).unwrap_err();
        assert!(TrainError::from_panic(payload).expect("an out-of-memory panic").is_out_of_memory());
        let other = std::panic::catch_unwind(|| tch::Tensor::zeros([2], huge()).view([3])).unwrap_err();
        assert!(TrainError::from_panic(other).is_err(), "a shape panic is not out of memory");
    }

    #[test]
    fn located_errors_name_phase_epoch_step_and_keep_the_source() {
        let e = TrainError::invalid("dataset `d`", "0 train samples").at("preparing", 0, 0);
        assert_eq!(e.to_string(), "preparing (epoch 0, step 0): dataset `d`: 0 train samples");
        assert!(e.source().is_some());
    }
}
