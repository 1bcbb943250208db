//! Core types -> vla_finetune_msgs messages. Pure functions, no ROS calls.

use super::interfaces::msg;
use crate::checkpoint::publish::Published;
use crate::train::progress::ProgressEvent;
use r2r::builtin_interfaces::msg::Time;

/// A ROS time from Unix nanoseconds.
pub fn time_from_ns(ns: i64) -> Time {
    Time { sec: ns.div_euclid(1_000_000_000) as i32, nanosec: ns.rem_euclid(1_000_000_000) as u32 }
}

/// TrainingProgress from a trainer progress event stamped `stamp` (unknown numbers become NaN / 0).
pub fn progress_msg(ev: &ProgressEvent, stamp: Time) -> msg::TrainingProgress {
    let f = |v: Option<f64>| v.map(|x| x as f32).unwrap_or(f32::NAN);
    let cache_state = if ev.cache.building {
        if ev.cache.refreshes > 0 {
            "refreshing"
        } else {
            "building"
        }
    } else if ev.cache.entries > 0 {
        "ready"
    } else {
        "cold"
    };
    msg::TrainingProgress {
        stamp,
        job_id: ev.job_id.clone(),
        phase: ev.phase.as_str().to_string(),
        stage: ev.stage,
        epoch: ev.epoch as u32,
        total_epochs: ev.total_epochs as u32,
        step: ev.step,
        total_steps: ev.total_steps,
        loss: f(ev.loss),
        lr: f(ev.lr),
        samples_per_second: f(ev.samples_per_s),
        data_time_s: ev.data_time_s as f32,
        compute_time_s: ev.compute_time_s as f32,
        peak_accel_bytes: ev.peak_accel_mem_bytes.unwrap_or(0),
        peak_host_bytes: ev.peak_host_mem_bytes.unwrap_or(0),
        cache_mode: ev.cache.mode.clone(),
        cache_state: cache_state.to_string(),
        cache_hit_rate: ev.cache.hit_rate as f32,
        cache_drift: ev.cache.drift.unwrap_or(0.0) as f32,
        eta_s: f(ev.eta_s),
        message: ev.message.clone(),
    }
}

/// CheckpointInfo for a published checkpoint, stamped `stamp`. Per-dimension validation errors are the manifest
/// metrics named `val_action_error/<dim>`; `val_loss` is the metric of that name.
pub fn checkpoint_msg(p: &Published, job_id: &str, stamp: Time) -> msg::CheckpointInfo {
    let m = &p.manifest;
    let per_dim: Vec<(&String, &f64)> = m.metrics.iter().filter(|(k, _)| k.starts_with("val_action_error/")).collect();
    let info_u64 = |k: &str| m.info.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    msg::CheckpointInfo {
        stamp,
        version: p.version.clone(),
        path: std::fs::canonicalize(&p.dir).unwrap_or_else(|_| p.dir.clone()).display().to_string(),
        manifest_sha256: p.manifest_sha256.clone(),
        base_model_id: m.base_model_id.clone(),
        job_id: job_id.to_string(),
        epoch: info_u64("epoch") as u32,
        step: info_u64("global_step"),
        val_loss: m.metrics.get("val_loss").map(|v| *v as f32).unwrap_or(f32::NAN),
        val_action_error: per_dim.iter().map(|(_, v)| **v as f32).collect(),
        val_action_error_names: per_dim
            .iter()
            .map(|(k, _)| k.trim_start_matches("val_action_error/").to_string())
            .collect(),
    }
}
