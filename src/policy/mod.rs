//! Policy heads: sensor encoder, fusion, diffusion action expert, and the whole VLA policy.
//!
//! - [`config`]: sizes (reference defaults), fusion variant, noise schedule settings.
//! - [`normalize`]: per-dimension statistics the dataset compiler fills.
//! - [`heads::PolicyHeads`]: the trainable heads with loss and DDIM sampling.
//! - [`vla::VlaPolicy`]: heads plus an optional [`vla::VlFeatureSource`] (the VL backbone).
//! - [`heads_file`]: the heads file (`heads.safetensors`), stage 1 or 2, with JSON metadata.
//! - [`sync_bn`]: BatchNorm statistics over every rank of a data-parallel run.

pub mod config;
pub mod error;
pub mod expert;
pub mod fusion;
pub mod heads;
pub mod heads_file;
pub mod layers;
pub mod normalize;
pub mod schedule;
pub mod sensor;
pub mod sync_bn;
pub mod vla;

pub use config::{ActionExpertConfig, DiffusionConfig, FusionConfig, FusionKind, PolicyConfig, SensorEncoderConfig};
pub use error::PolicyError;
pub use heads::{CondInput, HeadsVar, ParamGroups, PolicyHeads, VlInput};
pub use heads_file::{CheckpointStage, HeadsFileMeta};
pub use normalize::{FeatureStats, NormMode, NormStats, Normalizer};
pub use schedule::{NoiseRng, NoiseSchedule};
pub use vla::{ObservationBatch, PolicyBatch, VlFeatureSource, VlObservation, VlaPolicy};
