//! Test doubles for the policy runtime: a small linear action model stored as a checkpoint folder
//! (config.json + weights.safetensors + a manifest.json in the trainer's publication format with
//! sha256 of every file), and a loader that verifies and loads such folders.
//!
//! Model: VL features = mean R, G, B (/255) of each camera; head input x = [VL features, mean of
//! each sensor channel over the window, state]; action chunk = W x + b (`horizon*action_dim` rows).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use vla_finetune::dataset::episode::RgbImage;
use vla_finetune::runtime::*;

/// The checkpoint's config.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FakeConfig {
    pub version: String,
    pub base_model_id: String,
    pub cameras: Vec<String>,
    pub sensor_channels: usize,
    pub sensor_window: usize,
    pub state_dim: usize,
    pub horizon: usize,
    pub action_dim: usize,
    pub step_period_s: f32,
}

impl FakeConfig {
    pub fn features(&self) -> usize {
        3 * self.cameras.len() + self.sensor_channels + self.state_dim
    }
    pub fn rows(&self) -> usize {
        self.horizon * self.action_dim
    }
    pub fn io(&self) -> IoSpec {
        IoSpec {
            cameras: self.cameras.clone(),
            sensor_channels: self.sensor_channels,
            sensor_window: self.sensor_window,
            state_dim: self.state_dim,
            horizon: self.horizon,
            action_dim: self.action_dim,
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Writes a checkpoint folder `<root>/<version>` with weights `w` (rows x features, row-major)
/// and bias `b`, and its manifest; does not touch `latest`.
pub fn write_checkpoint(root: &Path, cfg: &FakeConfig, w: &[f32], b: &[f32]) -> PathBuf {
    let dir = root.join(&cfg.version);
    std::fs::create_dir_all(&dir).unwrap();
    let config = serde_json::to_vec_pretty(cfg).unwrap();
    let wb: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    let bb: Vec<u8> = b.iter().flat_map(|v| v.to_le_bytes()).collect();
    let rows = b.len();
    let tensors = vec![
        ("weight", TensorView::new(Dtype::F32, vec![rows, w.len() / rows.max(1)], &wb).unwrap()),
        ("bias", TensorView::new(Dtype::F32, vec![rows], &bb).unwrap()),
    ];
    let weights = safetensors::serialize(tensors, &None).unwrap();
    let mut files = Vec::new();
    for (name, bytes) in [("config.json", &config), ("weights.safetensors", &weights)] {
        std::fs::write(dir.join(name), bytes).unwrap();
        files.push(serde_json::json!({"path": name, "sha256": sha256_hex(bytes), "size": bytes.len()}));
    }
    let manifest = serde_json::json!({
        "format_version": 1,
        "version": cfg.version,
        "created": "2026-11-27T00:00:00Z",
        "base_model_id": cfg.base_model_id,
        "metrics": {},
        "info": {},
        "files": files,
    });
    std::fs::write(dir.join("manifest.json"), serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    dir
}

/// Points `<root>/latest` at `version` the way the trainer's publisher does (write + rename).
pub fn set_latest(root: &Path, version: &str) {
    let tmp = root.join("latest.tmp");
    std::fs::write(&tmp, format!("{version}\n")).unwrap();
    std::fs::rename(tmp, root.join("latest")).unwrap();
}

/// Weights of a model whose every action value is `sensor channel 0 mean * gain + offset`.
pub fn sensor_model(cfg: &FakeConfig, gain: f32, offset: f32) -> (Vec<f32>, Vec<f32>) {
    let f = cfg.features();
    let mut w = vec![0.0; cfg.rows() * f];
    for r in 0..cfg.rows() {
        w[r * f + 3 * cfg.cameras.len()] = gain;
    }
    (w, vec![offset; cfg.rows()])
}

/// Weights of a model whose every action value is the mean red value (/255) of camera 0.
pub fn vision_model(cfg: &FakeConfig) -> (Vec<f32>, Vec<f32>) {
    let f = cfg.features();
    let mut w = vec![0.0; cfg.rows() * f];
    for r in 0..cfg.rows() {
        w[r * f] = 1.0;
    }
    (w, vec![0.0; cfg.rows()])
}

/// Knobs shared by the loader and every model it loads.
#[derive(Default)]
pub struct Knobs {
    /// Simulated compute per head step, µs, added to a manual clock.
    pub act_cost_us: AtomicU64,
    /// Real sleep per VL pass, ms.
    pub vl_sleep_ms: AtomicU64,
    /// While set, VL passes on the refresh thread wait at the gate.
    pub gate_closed: Mutex<bool>,
    pub gate: Condvar,
    /// VL passes on the refresh thread so far.
    pub vl_passes: AtomicU64,
}

impl Knobs {
    pub fn close_gate(&self) {
        *self.gate_closed.lock().unwrap() = true;
    }
    pub fn open_gate(&self) {
        *self.gate_closed.lock().unwrap() = false;
        self.gate.notify_all();
    }
}

pub struct FakeLoader {
    pub knobs: Arc<Knobs>,
    /// Advanced by the head step's simulated cost (deterministic tests).
    pub manual: Option<Arc<ManualClock>>,
}

struct FakeEncoder {
    knobs: Arc<Knobs>,
}

impl VlEncoder for FakeEncoder {
    fn features(&mut self, obs: &Observation) -> Result<VlFeatures, RuntimeError> {
        let on_refresh_thread = std::thread::current().name() == Some("vla-vl-refresh");
        if on_refresh_thread {
            let mut closed = self.knobs.gate_closed.lock().unwrap();
            while *closed {
                closed = self.knobs.gate.wait(closed).unwrap();
            }
            drop(closed);
            self.knobs.vl_passes.fetch_add(1, Ordering::SeqCst);
        }
        std::thread::sleep(Duration::from_millis(self.knobs.vl_sleep_ms.load(Ordering::SeqCst)));
        let mut f = Vec::new();
        for frame in &obs.frames {
            let n = (frame.image.width * frame.image.height) as f64;
            for ch in 0..3 {
                let s: f64 = frame.image.data.iter().skip(ch).step_by(3).map(|&v| v as f64).sum();
                f.push((s / n / 255.0) as f32);
            }
        }
        Ok(VlFeatures::new(f))
    }
}

struct FakeModel {
    cfg: FakeConfig,
    w: Vec<f32>,
    b: Vec<f32>,
    knobs: Arc<Knobs>,
    manual: Option<Arc<ManualClock>>,
}

impl ActionModel for FakeModel {
    fn version(&self) -> &str {
        &self.cfg.version
    }

    fn act_with(&mut self, features: &VlFeatures, obs: &Observation) -> Result<ActionChunk, RuntimeError> {
        let vl = features.get::<Vec<f32>>().ok_or_else(|| RuntimeError::Model {
            version: self.cfg.version.clone(),
            reason: "VL features are not a Vec<f32>".into(),
        })?;
        let mut x = vl.clone();
        let (t, c) = (obs.sensor.samples(), obs.sensor.channels);
        let mut mean = vec![0.0f64; c];
        for i in 0..t {
            for (m, v) in mean.iter_mut().zip(obs.sensor.sample(i)) {
                *m += *v as f64;
            }
        }
        x.extend(mean.iter().map(|m| (m / t as f64) as f32));
        if let Some(s) = &obs.state {
            x.extend(s.values.iter().map(|&v| v as f32));
        }
        let f = x.len();
        if f * self.cfg.rows() != self.w.len() {
            return Err(RuntimeError::Model {
                version: self.cfg.version.clone(),
                reason: format!("{f} input features for weight of {} values", self.w.len()),
            });
        }
        let values = (0..self.cfg.rows())
            .map(|r| self.w[r * f..(r + 1) * f].iter().zip(&x).map(|(a, b)| a * b).sum::<f32>() + self.b[r])
            .collect();
        if let Some(clock) = &self.manual {
            clock.advance(Duration::from_micros(self.knobs.act_cost_us.load(Ordering::SeqCst)));
        }
        Ok(ActionChunk {
            version: String::new(),
            horizon: self.cfg.horizon,
            action_dim: self.cfg.action_dim,
            step_period_s: self.cfg.step_period_s,
            values,
        })
    }
}

#[derive(Deserialize)]
struct ManifestFile {
    path: String,
    sha256: String,
    size: u64,
}

#[derive(Deserialize)]
struct Manifest {
    version: String,
    base_model_id: String,
    files: Vec<ManifestFile>,
}

fn ckpt_err(dir: &Path, reason: String) -> RuntimeError {
    RuntimeError::Checkpoint { dir: dir.to_path_buf(), reason }
}

impl ModelLoader for FakeLoader {
    fn verify(&self, dir: &Path) -> Result<CheckpointMeta, RuntimeError> {
        let mbytes =
            std::fs::read(dir.join("manifest.json")).map_err(|e| ckpt_err(dir, format!("manifest.json: {e}")))?;
        let m: Manifest = serde_json::from_slice(&mbytes).map_err(|e| ckpt_err(dir, format!("manifest.json: {e}")))?;
        for f in &m.files {
            let bytes = std::fs::read(dir.join(&f.path)).map_err(|e| ckpt_err(dir, format!("{}: {e}", f.path)))?;
            let sha = sha256_hex(&bytes);
            if bytes.len() as u64 != f.size || sha != f.sha256 {
                return Err(ckpt_err(
                    dir,
                    format!(
                        "file `{}` has sha256 {sha} ({} bytes), manifest says {} ({} bytes)",
                        f.path,
                        bytes.len(),
                        f.sha256,
                        f.size
                    ),
                ));
            }
        }
        let cfg = read_config(dir)?;
        if cfg.version != m.version {
            return Err(ckpt_err(dir, format!("config.json says version {}, manifest {}", cfg.version, m.version)));
        }
        Ok(CheckpointMeta {
            version: m.version,
            base_model_id: m.base_model_id,
            io: cfg.io(),
            manifest_sha256: sha256_hex(&mbytes),
        })
    }

    fn load(&self, dir: &Path, _meta: &CheckpointMeta) -> Result<LoadedModel, RuntimeError> {
        let cfg = read_config(dir)?;
        let bytes = std::fs::read(dir.join("weights.safetensors"))
            .map_err(|e| ckpt_err(dir, format!("weights.safetensors: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| ckpt_err(dir, format!("weights.safetensors: {e}")))?;
        let get = |name: &str, shape: Vec<usize>| -> Result<Vec<f32>, RuntimeError> {
            let t = st.tensor(name).map_err(|e| ckpt_err(dir, format!("tensor `{name}`: {e}")))?;
            if t.shape() != shape.as_slice() || t.dtype() != Dtype::F32 {
                return Err(ckpt_err(
                    dir,
                    format!("tensor `{name}` is {:?} {:?}, expected F32 {shape:?}", t.dtype(), t.shape()),
                ));
            }
            Ok(t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        };
        let w = get("weight", vec![cfg.rows(), cfg.features()])?;
        let b = get("bias", vec![cfg.rows()])?;
        Ok(LoadedModel {
            encoder: Box::new(FakeEncoder { knobs: self.knobs.clone() }),
            model: Box::new(FakeModel { cfg, w, b, knobs: self.knobs.clone(), manual: self.manual.clone() }),
        })
    }
}

fn read_config(dir: &Path) -> Result<FakeConfig, RuntimeError> {
    let bytes = std::fs::read(dir.join("config.json")).map_err(|e| ckpt_err(dir, format!("config.json: {e}")))?;
    serde_json::from_slice(&bytes).map_err(|e| ckpt_err(dir, format!("config.json: {e}")))
}

/// A solid-colour RGB8 image.
pub fn solid(width: u32, height: u32, rgb: [u8; 3]) -> RgbImage {
    RgbImage { width, height, data: rgb.iter().copied().cycle().take((width * height * 3) as usize).collect() }
}

pub fn base_config(version: &str, cameras: &[&str], channels: usize, window: usize, state_dim: usize) -> FakeConfig {
    FakeConfig {
        version: version.into(),
        base_model_id: "tiny-qwen2.5-vl@sha256:feed".into(),
        cameras: cameras.iter().map(|s| s.to_string()).collect(),
        sensor_channels: channels,
        sensor_window: window,
        state_dim,
        horizon: 4,
        action_dim: 3,
        step_period_s: 0.1,
    }
}
