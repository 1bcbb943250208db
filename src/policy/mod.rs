//! Policy heads: sensor encoder, fusion, diffusion action expert, and the whole VLA policy.
//!
//! - [`config`]: sizes (reference defaults), fusion variant, noise schedule settings.
//! - [`normalize`]: per-dimension statistics the dataset compiler fills.
//! - [`heads::PolicyHeads`]: the trainable heads with loss and DDIM sampling.
//! - [`vla::VlaPolicy`]: heads plus an optional [`vla::VlFeatureSource`] (the VL backbone).
//! - [`checkpoint`]: stage-1 / stage-2 safetensors checkpoints with JSON metadata.
//! - [`sync_bn`]: BatchNorm statistics over every rank of a data-parallel run.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod expert;
pub mod fusion;
pub mod heads;
pub mod layers;
pub mod normalize;
pub mod schedule;
pub mod sensor;
pub mod sync_bn;
pub mod vla;

pub use checkpoint::{CheckpointStage, HeadsFileMeta};
pub use config::{ActionExpertConfig, DiffusionConfig, FusionConfig, FusionKind, PolicyConfig, SensorEncoderConfig};
pub use error::PolicyError;
pub use heads::{CondInput, NamedParam, ParamGroups, PolicyHeads, VlInput};
pub use normalize::{FeatureStats, NormMode, NormStats, Normalizer};
pub use schedule::{NoiseRng, NoiseSchedule};
pub use vla::{Observation, PolicyBatch, VlFeatureSource, VlObservation, VlaPolicy};
