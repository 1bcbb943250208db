//! Weights from Hugging Face safetensors checkpoints (one file or sharded with
//! `model.safetensors.index.json`), memory-mapped and converted tensor by tensor, or random
//! initialization for any config.
//!
//! Names are asked for in the transformers>=4.52 layout (`model.visual.*`,
//! `model.language_model.*`); the on-disk layout of the published checkpoints (`visual.*`,
//! `model.layers.*`, `model.embed_tokens.*`, `model.norm.*`) is found too.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};

use super::error::{Result, VlmError};

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// The tensors of a checkpoint directory, memory-mapped; nothing is copied until asked for.
pub struct SafetensorsStore {
    dir: PathBuf,
    files: Vec<MappedFile>,
    /// Stored name -> file index.
    names: HashMap<String, usize>,
    used: BTreeSet<String>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> VlmError + '_ {
    move |error| VlmError::Io { path: path.to_path_buf(), error }
}

impl SafetensorsStore {
    /// Opens `model.safetensors.index.json` (sharded) or `model.safetensors` in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let file_names: Vec<String> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| VlmError::Safetensors { path: index.clone(), msg: format!("invalid JSON: {e}") })?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| VlmError::Safetensors {
                path: index.clone(),
                msg: "missing object `weight_map`".into(),
            })?;
            let mut files = BTreeSet::new();
            for (name, f) in map {
                let f = f.as_str().ok_or_else(|| VlmError::Safetensors {
                    path: index.clone(),
                    msg: format!("weight_map entry `{name}` is not a file name"),
                })?;
                files.insert(f.to_string());
            }
            files.into_iter().collect()
        } else {
            vec!["model.safetensors".to_string()]
        };
        let mut store = SafetensorsStore {
            dir: dir.to_path_buf(),
            files: Vec::new(),
            names: HashMap::new(),
            used: BTreeSet::new(),
        };
        for f in file_names {
            let path = dir.join(&f);
            let file = File::open(&path).map_err(io_err(&path))?;
            // SAFETY: the file is only read; a concurrent truncation by another process is outside
            // what we can guard against (as for every mmap-based safetensors reader).
            let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(&path))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| VlmError::Safetensors {
                path: path.clone(),
                msg: format!("corrupt or truncated file: {e:?}"),
            })?;
            let idx = store.files.len();
            for name in metadata.tensors().keys() {
                if let Some(prev) = store.names.insert(name.clone(), idx) {
                    return Err(VlmError::Safetensors {
                        path: path.clone(),
                        msg: format!("tensor `{name}` is also stored in {}", store.files[prev].path.display()),
                    });
                }
            }
            store.files.push(MappedFile { path, mmap, header_len, metadata });
        }
        Ok(store)
    }

    /// The stored name of a tensor asked for in the transformers>=4.52 layout, if present.
    fn resolve(&self, name: &str) -> Option<String> {
        let mut candidates = vec![name.to_string()];
        if let Some(rest) = name.strip_prefix("model.language_model.") {
            candidates.push(format!("model.{rest}"));
        } else if let Some(rest) = name.strip_prefix("model.visual.") {
            candidates.push(format!("visual.{rest}"));
        }
        candidates.into_iter().find(|c| self.names.contains_key(c))
    }

    fn info(&self, stored: &str) -> (&MappedFile, &TensorInfo) {
        let f = &self.files[self.names[stored]];
        let info = f.metadata.info(stored).expect("name indexed from this file's metadata");
        (f, info)
    }

    /// Checks that `name` exists with `shape` and marks it used, without loading it.
    pub fn check(&mut self, name: &str, shape: &[i64]) -> Result<()> {
        let stored = self.resolve(name).ok_or_else(|| VlmError::MissingTensor {
            name: name.to_string(),
            expected: shape.to_vec(),
            dir: self.dir.clone(),
        })?;
        let (f, info) = self.info(&stored);
        let found: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        if found != shape {
            return Err(VlmError::ShapeMismatch {
                name: stored,
                file: f.path.clone(),
                expected: shape.to_vec(),
                found,
            });
        }
        self.used.insert(stored);
        Ok(())
    }

    /// Loads `name`, checks its shape, converts it to `kind` on `device` and marks it used.
    /// Only this one tensor is copied out of the mapping.
    pub fn load(&mut self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        self.check(name, shape)?;
        let stored = self.resolve(name).expect("checked above");
        let (f, info) = self.info(&stored);
        let src_kind = match info.dtype {
            Dtype::F32 => Kind::Float,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F16 => Kind::Half,
            other => {
                return Err(VlmError::WrongDtype { name: stored, file: f.path.clone(), found: format!("{other:?}") })
            }
        };
        let start = 8 + f.header_len + info.data_offsets.0;
        let end = 8 + f.header_len + info.data_offsets.1;
        let bytes = f.mmap.get(start..end).ok_or_else(|| VlmError::Safetensors {
            path: f.path.clone(),
            msg: format!("data of `{stored}` lies outside the file"),
        })?;
        let t = Tensor::f_from_data_size(bytes, shape, src_kind)?;
        // Drop the mapped pages of this tensor so resident memory holds each weight once.
        // SAFETY: read-only file mapping; `t` is a copy and nothing else refers to this range,
        // and a later access would re-read the pages from the file.
        let _ = unsafe { f.mmap.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start) };
        let t = if src_kind == kind { t } else { t.f_to_kind(kind)? };
        let t = if device == Device::Cpu { t } else { t.f_to_device(device)? };
        Ok(t.set_requires_grad(false))
    }

    /// Errors if the checkpoint holds tensors that were neither loaded nor checked.
    pub fn finish(&self) -> Result<()> {
        let mut extra: Vec<String> = self.names.keys().filter(|n| !self.used.contains(*n)).cloned().collect();
        if extra.is_empty() {
            return Ok(());
        }
        extra.sort();
        extra.truncate(10);
        Err(VlmError::UnexpectedTensors { dir: self.dir.clone(), names: extra })
    }
}

/// How a tensor is initialized when no checkpoint is given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Normal(0, 0.02), as transformers' `initializer_range`.
    Normal,
    /// All zeros (biases).
    Zeros,
    /// All ones (norm weights).
    Ones,
}

/// Where the model's tensors come from: a checkpoint or random initialization.
pub enum WeightSource {
    /// A memory-mapped checkpoint.
    Checkpoint(SafetensorsStore),
    /// Random weights (benchmarks, tests).
    Random,
    /// Tensors of an already loaded model by name, handed out without copying (they share
    /// storage); each must be asked for once with its stored shape, dtype and device.
    Shared(HashMap<String, Tensor>),
}

/// Hands out the model's tensors by name in the target dtype and device.
pub struct Loader {
    source: WeightSource,
    kind: Kind,
    device: Device,
}

impl Loader {
    /// A loader producing `kind` tensors on `device`; only f32 and bf16 are supported.
    pub fn new(source: WeightSource, kind: Kind, device: Device) -> Result<Self> {
        if kind != Kind::Float && kind != Kind::BFloat16 {
            return Err(VlmError::Input(format!("weight dtype {kind:?} is not supported (expected f32 or bf16)")));
        }
        Ok(Loader { source, kind, device })
    }

    /// Target dtype.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Target device.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The tensor `name` with `shape` (loaded, or initialized as `init`). Never requires grad.
    pub fn tensor(&mut self, name: &str, shape: &[i64], init: Init) -> Result<Tensor> {
        match &mut self.source {
            WeightSource::Checkpoint(store) => store.load(name, shape, self.kind, self.device),
            WeightSource::Random => {
                let _guard = tch::no_grad_guard();
                let opts = (self.kind, self.device);
                let t = match init {
                    Init::Normal => Tensor::f_randn(shape, opts)? * 0.02,
                    Init::Zeros => Tensor::f_zeros(shape, opts)?,
                    Init::Ones => Tensor::f_ones(shape, opts)?,
                };
                Ok(t.set_requires_grad(false))
            }
            WeightSource::Shared(map) => {
                let t =
                    map.remove(name).ok_or_else(|| VlmError::Input(format!("shared weights: no tensor `{name}`")))?;
                if t.size() != shape || t.kind() != self.kind || t.device() != self.device {
                    return Err(VlmError::Input(format!(
                        "shared weights: `{name}` is {:?} {:?} on {:?}, expected {shape:?} {:?} on {:?}",
                        t.size(),
                        t.kind(),
                        t.device(),
                        self.kind,
                        self.device
                    )));
                }
                Ok(t)
            }
        }
    }

    /// Checks a checkpoint tensor the model does not keep (e.g. an untied `lm_head.weight`).
    pub fn check_unused(&mut self, name: &str, shape: &[i64]) -> Result<()> {
        match &mut self.source {
            WeightSource::Checkpoint(store) => store.check(name, shape),
            WeightSource::Random | WeightSource::Shared(_) => Ok(()),
        }
    }

    /// Like [`Loader::check_unused`] but absence is fine (a tied `lm_head.weight` may be stored).
    pub fn allow_unused(&mut self, name: &str, shape: &[i64]) -> Result<()> {
        match &mut self.source {
            WeightSource::Checkpoint(store) if store.resolve(name).is_some() => store.check(name, shape),
            _ => Ok(()),
        }
    }

    /// Errors on checkpoint tensors that nothing asked for.
    pub fn finish(self) -> Result<()> {
        match &self.source {
            WeightSource::Checkpoint(store) => store.finish(),
            WeightSource::Random => Ok(()),
            WeightSource::Shared(map) if map.is_empty() => Ok(()),
            WeightSource::Shared(map) => {
                let mut names: Vec<&String> = map.keys().collect();
                names.sort();
                Err(VlmError::Input(format!(
                    "shared weights: {} tensors not used by the model, e.g. {:?}",
                    names.len(),
                    &names[..names.len().min(5)]
                )))
            }
        }
    }
}
