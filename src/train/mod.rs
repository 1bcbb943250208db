//! Training (stage 1 and Stage 2): loop, feature cache, optimizer groups, schedule, checkpoints, publication, progress.
//!
//! - [`optim`]: AdamW with parameter groups, clipping, warmup + cosine, gradient accumulation.
//! - [`state`]: exact-resume training state and the per-step seed derivation.
//! - [`runner`]: the one model-independent loop over a [`runner::TrainTask`]; with a
//!   [`crate::dist::Group`], data-parallel ([`data_parallel`]: shards and gradient all-reduce);
//!   [`launch`] starts a Stage 2 job as several ranks under torchrun.
//! - [`error`]: [`error::TrainError`], the typed errors of a training job.
//! - [`heads_job`]: stage 1, the policy heads on frozen VL features.
//! - [`oracle`]: the oracle floor's conditioning (simulator ground truth instead of VL features).
//! - [`comparison`]: untrained / stage 1 / Stage 2 / oracle errors side by side, and the verdict.
//! - [`action_error`]: the validation action error (in training-set stds, and per named dimension).
//! - [`controller`]: one job at a time on its own thread, validators, cancel, status.
//! - [`cache`] and [`drift`]: feature-cache keys and store; drift and the refresh decision.
//! - [`progress`] and [`plot`]: progress events, hub, throttle, log, bar; curves PNG.
//! - [`config`]: `config/train.yaml` and `config/vram_presets.yaml`.
//! - [`stage2`]: the Stage 2 job (LoRA on the VL model + heads) with its cache modes.
//! - [`guard`]: one training per state folder, no silent restart over an existing state.
//! - [`tensor_io`]: safetensors <-> tch with metadata.
//! - [`service`]: the fine-tuning service (requests, stages, resume) behind the trainer node;
//!   [`training_set`] compiles the episodes a request names, [`job_record`] keeps each job.
//!
//! The deployable checkpoint training publishes is [`crate::checkpoint`]'s.

pub mod action_error;
pub mod cache;
pub mod comparison;
pub mod config;
pub mod controller;
pub mod data_parallel;
pub mod drift;
pub mod error;
pub mod guard;
pub mod heads_job;
pub mod job_record;
pub mod launch;
pub mod optim;
pub mod oracle;
pub mod plot;
pub mod progress;
pub mod runner;
pub mod service;
pub mod stage2;
pub mod state;
pub mod tensor_io;
pub mod training_set;
