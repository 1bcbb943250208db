//! LoRA adapters in Hugging Face PEFT's on-disk format, so Python `PeftModel.from_pretrained`
//! loads ours and ours loads PEFT's (checked against peft 0.21.2 with transformers 5.23.0).
//!
//! A folder holds `adapter_config.json` (PEFT's `LoraConfig` fields, sorted, 2-space indented)
//! and `adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight` /
//! `.lora_B.weight`, where `<module>` is the transformers>=4.52 path
//! (`model.language_model.layers.0.self_attn.q_proj`, `model.visual.blocks.0.attn.qkv`).
//! Loading also accepts the older layout (`model.layers.*`, `visual.*`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tch::{nn, Device, Kind, Tensor};

use super::linear::VisitLinears;
use super::lora::{inject_lora_with, lora_of, select_targets, LoraConfig, LoraError, TargetModules};

/// Name of the config file in an adapter folder.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// Name of the weights file in an adapter folder.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The PEFT version whose format we write.
pub const PEFT_VERSION: &str = "0.21.2";
/// Prefix PEFT puts before module paths in adapter keys.
pub const KEY_PREFIX: &str = "base_model.model.";

/// Errors reading or writing PEFT adapters.
#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `adapter_config.json` is not valid JSON.
    #[error("{path}: invalid JSON: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// A required config key is absent.
    #[error("{path}: missing key `{key}`")]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
    },
    /// A config key has the wrong type or an unsupported value.
    #[error("{path}: key `{key}`: expected {expected}, found {found}")]
    BadValue {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is accepted.
        expected: &'static str,
        /// The value found.
        found: String,
    },
    /// `adapter_model.safetensors` cannot be parsed.
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// A tensor key is not a LoRA weight of a layer the config selects in this model.
    #[error("{path}: unexpected tensor `{key}`: {reason}")]
    UnknownKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Why it does not fit.
        reason: String,
    },
    /// A LoRA weight of a selected layer is absent.
    #[error("{path}: missing tensor `{key}`")]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The expected key.
        key: String,
    },
    /// A tensor's shape does not fit the target layer.
    #[error("{path}: tensor `{key}` has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// Expected shape.
        expected: Vec<i64>,
        /// Found shape.
        found: Vec<i64>,
    },
    /// A tensor has a non-float dtype or holds NaN/inf.
    #[error("{path}: tensor `{key}`: {message}")]
    BadTensor {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// Injection or reading of the LoRA layers failed.
    #[error(transparent)]
    Lora(#[from] LoraError),
    /// libtorch reported an error.
    #[error("{0}")]
    Torch(#[from] tch::TchError),
}

/// What PEFT records beside the LoRA hyper-parameters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdapterMeta {
    /// `base_model_name_or_path` (the base model's folder or hub id).
    pub base_model_name_or_path: Option<String>,
    /// `task_type` (e.g. `CAUSAL_LM`); `None` makes PEFT write `auto_mapping`.
    pub task_type: Option<String>,
}

/// Class and module of the base model PEFT records in `auto_mapping`.
const BASE_MODEL_CLASS: &str = "Qwen2_5_VLForConditionalGeneration";
const BASE_MODEL_LIBRARY: &str = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl";

fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// The `adapter_config.json` object PEFT 0.21.2 writes for this LoRA on Qwen2.5-VL (every
/// field, PEFT's defaults for features we do not use).
pub fn adapter_config_json(cfg: &LoraConfig, meta: &AdapterMeta) -> Value {
    let mut m = BTreeMap::<&str, Value>::new();
    let targets = |t: &TargetModules| serde_json::to_value(t).expect("strings serialize");
    m.insert("alora_invocation_tokens", Value::Null);
    m.insert("alpha_pattern", json!({}));
    m.insert("arrow_config", Value::Null);
    m.insert(
        "auto_mapping",
        match meta.task_type {
            None => json!({"base_model_class": BASE_MODEL_CLASS, "parent_library": BASE_MODEL_LIBRARY}),
            Some(_) => Value::Null,
        },
    );
    m.insert("base_model_name_or_path", json!(meta.base_model_name_or_path));
    m.insert("bias", json!("none"));
    m.insert("corda_config", Value::Null);
    m.insert("ensure_weight_tying", json!(false));
    m.insert("eva_config", Value::Null);
    m.insert("exclude_modules", cfg.exclude_modules.as_ref().map_or(Value::Null, targets));
    m.insert("fan_in_fan_out", json!(false));
    m.insert("inference_mode", json!(true));
    m.insert("init_lora_weights", json!(true));
    m.insert("kasa_config", Value::Null);
    m.insert("layer_replication", Value::Null);
    m.insert("layers_pattern", Value::Null);
    m.insert("layers_to_transform", Value::Null);
    m.insert("loftq_config", json!({}));
    m.insert("lora_alpha", number(cfg.lora_alpha));
    m.insert("lora_bias", json!(false));
    m.insert("lora_dropout", json!(cfg.lora_dropout));
    m.insert("lora_ga_config", Value::Null);
    m.insert("megatron_config", Value::Null);
    m.insert("megatron_core", json!("megatron.core"));
    m.insert("modules_to_save", Value::Null);
    m.insert("monteclora_config", Value::Null);
    m.insert("peft_type", json!("LORA"));
    m.insert("peft_version", json!(PEFT_VERSION));
    m.insert("qalora_group_size", json!(16));
    m.insert("r", json!(cfg.r));
    m.insert("rank_pattern", json!({}));
    m.insert("revision", Value::Null);
    m.insert("target_modules", targets(&cfg.target_modules));
    m.insert("target_parameters", Value::Null);
    m.insert("task_type", json!(meta.task_type));
    m.insert("trainable_token_indices", Value::Null);
    m.insert("use_bdlora", Value::Null);
    m.insert("use_dora", json!(false));
    m.insert("use_qalora", json!(false));
    m.insert("use_rslora", json!(cfg.use_rslora));
    m.insert("velora_config", Value::Null);
    json!(m)
}

/// Whether a value is PEFT's "feature off" for an optional field (null, false, empty).
fn is_off(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Object(o) => o.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Fields that change the adapter's meaning and that we do not implement: they must be off.
const MUST_BE_OFF: &[&str] = &[
    "alpha_pattern",
    "rank_pattern",
    "fan_in_fan_out",
    "use_dora",
    "lora_bias",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "use_qalora",
    "alora_invocation_tokens",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "monteclora_config",
];

/// Parses an `adapter_config.json` text (`path` names it in errors) into our config and meta.
pub fn parse_adapter_config(text: &str, path: &Path) -> Result<(LoraConfig, AdapterMeta), PeftError> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| PeftError::Json { path: path.into(), message: e.to_string() })?;
    let obj = v.as_object().ok_or_else(|| PeftError::BadValue {
        path: path.into(),
        key: "<root>".into(),
        expected: "a JSON object",
        found: v.to_string(),
    })?;
    let bad = |key: &str, expected: &'static str, found: &Value| PeftError::BadValue {
        path: path.into(),
        key: key.into(),
        expected,
        found: found.to_string(),
    };
    let get = |key: &'static str| obj.get(key).ok_or(PeftError::MissingKey { path: path.into(), key });
    let peft_type = get("peft_type")?;
    if peft_type.as_str() != Some("LORA") {
        return Err(bad("peft_type", "\"LORA\"", peft_type));
    }
    let r = get("r")?;
    let r = r.as_i64().filter(|r| *r > 0).ok_or_else(|| bad("r", "a positive integer", r))?;
    let alpha = get("lora_alpha")?;
    let lora_alpha = alpha.as_f64().ok_or_else(|| bad("lora_alpha", "a number", alpha))?;
    let targets = get("target_modules")?;
    let target_modules: TargetModules = serde_json::from_value(targets.clone())
        .map_err(|_| bad("target_modules", "a list of strings or a regex string", targets))?;
    let lora_dropout = match obj.get("lora_dropout") {
        None | Some(Value::Null) => 0.0,
        Some(d) => d.as_f64().ok_or_else(|| bad("lora_dropout", "a number", d))?,
    };
    let use_rslora = match obj.get("use_rslora") {
        None | Some(Value::Null) => false,
        Some(b) => b.as_bool().ok_or_else(|| bad("use_rslora", "a boolean", b))?,
    };
    let exclude_modules = match obj.get("exclude_modules") {
        None | Some(Value::Null) => None,
        Some(e) => Some(
            serde_json::from_value(e.clone())
                .map_err(|_| bad("exclude_modules", "a list of strings or a regex string", e))?,
        ),
    };
    if let Some(b) = obj.get("bias") {
        if b.as_str() != Some("none") {
            return Err(bad("bias", "\"none\" (bias training is not supported)", b));
        }
    }
    for key in MUST_BE_OFF {
        if let Some(v) = obj.get(*key) {
            if !is_off(v) {
                return Err(bad(key, "null/false/empty (this PEFT feature is not supported)", v));
            }
        }
    }
    let string = |key: &str| obj.get(key).and_then(Value::as_str).map(str::to_string);
    let cfg = LoraConfig { r, lora_alpha, lora_dropout, target_modules, exclude_modules, use_rslora };
    cfg.validate()?;
    Ok((
        cfg,
        AdapterMeta { base_model_name_or_path: string("base_model_name_or_path"), task_type: string("task_type") },
    ))
}

/// Reads `<dir>/adapter_config.json`.
pub fn read_adapter_config(dir: &Path) -> Result<(LoraConfig, AdapterMeta), PeftError> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|source| PeftError::Io { path: path.clone(), source })?;
    parse_adapter_config(&text, &path)
}

/// Maps a module path of either checkpoint layout to the transformers>=4.52 one
/// (`model.layers.*` -> `model.language_model.layers.*`, `visual.*` -> `model.visual.*`).
pub fn canonical_module_path(module: &str) -> String {
    if let Some(rest) = module.strip_prefix("visual.") {
        format!("model.visual.{rest}")
    } else if module.starts_with("model.language_model.") || module.starts_with("model.visual.") {
        module.to_string()
    } else if let Some(rest) = module.strip_prefix("model.") {
        format!("model.language_model.{rest}")
    } else {
        module.to_string()
    }
}

/// Splits a PEFT key into (canonical module path, `A` or `B`).
fn parse_key(key: &str) -> Option<(String, bool)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (module, is_a) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        (m, true)
    } else {
        (rest.strip_suffix(".lora_B.weight")?, false)
    };
    Some((canonical_module_path(module), is_a))
}

fn kind_of(dtype: safetensors::Dtype) -> Option<Kind> {
    match dtype {
        safetensors::Dtype::F32 => Some(Kind::Float),
        safetensors::Dtype::F16 => Some(Kind::Half),
        safetensors::Dtype::BF16 => Some(Kind::BFloat16),
        safetensors::Dtype::F64 => Some(Kind::Double),
        _ => None,
    }
}

/// Reads every tensor of a safetensors file as (key, fp32 CPU tensor); rejects non-float
/// dtypes and NaN/inf values.
fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>, PeftError> {
    let bytes = std::fs::read(path).map_err(|source| PeftError::Io { path: path.into(), source })?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| PeftError::Safetensors { path: path.into(), message: e.to_string() })?;
    let mut out = Vec::new();
    // In key order: the safetensors crate lists tensors in hash order, and the first bad tensor
    // found is the one an error names, so it must not change from run to run.
    let mut tensors = st.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, view) in tensors {
        let bad = |message: String| PeftError::BadTensor { path: path.into(), key: key.clone(), message };
        let kind = kind_of(view.dtype()).ok_or_else(|| bad(format!("dtype {:?} is not a float type", view.dtype())))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?.f_to_kind(Kind::Float)?;
        if !bool::try_from(t.isfinite().all())? {
            return Err(bad("holds NaN or infinite values".into()));
        }
        out.push((key, t));
    }
    Ok(out)
}

/// Summary of a loaded adapter.
#[derive(Debug, Clone)]
pub struct LoadedAdapter {
    /// The adapter's hyper-parameters.
    pub config: LoraConfig,
    /// Base model and task recorded with it.
    pub meta: AdapterMeta,
    /// Paths of the layers that received LoRA, in visit order.
    pub layers: Vec<String>,
}

/// Loads a PEFT LoRA adapter folder into `model`: injects LoRA into the layers its config
/// selects (parameters registered in `root`'s VarStore as fp32 masters) and sets `A`/`B`.
/// Every key must be a LoRA weight of a selected layer with the layer's shape; every selected
/// layer must have both weights. Nothing is modified unless everything checks out.
pub fn load_adapter(model: &mut dyn VisitLinears, dir: &Path, root: &nn::Path) -> Result<LoadedAdapter, PeftError> {
    let (config, meta) = read_adapter_config(dir)?;
    let path = dir.join(ADAPTER_WEIGHTS);
    let targets = select_targets(model, &config)?;
    let by_path: HashMap<&str, _> = targets.iter().map(|t| (t.path.as_str(), t)).collect();
    let mut pairs: HashMap<String, (Option<Tensor>, Option<Tensor>)> = HashMap::new();
    for (key, t) in read_tensors(&path)? {
        let Some((module, is_a)) = parse_key(&key) else {
            return Err(PeftError::UnknownKey {
                path,
                key,
                reason: format!("expected `{KEY_PREFIX}<module>.lora_A.weight` or `.lora_B.weight`"),
            });
        };
        let Some(target) = by_path.get(module.as_str()) else {
            return Err(PeftError::UnknownKey {
                path,
                key,
                reason: format!(
                    "`{module}` is not a linear layer of this model selected by target_modules {}",
                    config.target_modules
                ),
            });
        };
        let expected = if is_a { vec![config.r, target.in_features] } else { vec![target.out_features, config.r] };
        if t.size() != expected {
            return Err(PeftError::Shape { path, key, expected, found: t.size() });
        }
        let slot = pairs.entry(module).or_default();
        let slot = if is_a { &mut slot.0 } else { &mut slot.1 };
        if slot.replace(t).is_some() {
            return Err(PeftError::UnknownKey {
                path,
                key,
                reason: "duplicate of another key for the same layer (both layouts?)".into(),
            });
        }
    }
    let mut tensors = HashMap::new();
    for t in &targets {
        let key = |ab: &str| format!("{KEY_PREFIX}{}.lora_{ab}.weight", t.path);
        match pairs.remove(&t.path) {
            Some((Some(a), Some(b))) => {
                tensors.insert(t.path.clone(), (a, b));
            }
            Some((None, _)) | None => return Err(PeftError::MissingTensor { path, key: key("A") }),
            Some((_, None)) => return Err(PeftError::MissingTensor { path, key: key("B") }),
        }
    }
    let layers = inject_lora_with(model, &config, root, tensors)?;
    Ok(LoadedAdapter { config, meta, layers })
}

fn to_le_bytes(t: &Tensor) -> Result<Vec<u8>, PeftError> {
    let t = t.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?.f_contiguous()?.f_flatten(0, -1)?;
    let values = Vec::<f32>::try_from(&t)?;
    Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// Writes the model's LoRA layers as a PEFT adapter folder (created if needed):
/// `adapter_config.json` for `cfg`/`meta` and fp32 `adapter_model.safetensors` (metadata
/// `{"format": "pt"}` like PEFT). Each file is written to a temporary name and renamed.
pub fn save_adapter(
    model: &mut dyn VisitLinears,
    cfg: &LoraConfig,
    meta: &AdapterMeta,
    dir: &Path,
) -> Result<(), PeftError> {
    cfg.validate()?;
    let mut named = Vec::new();
    model.visit_linears_mut(&mut |l| {
        if let Some(lora) = lora_of(l) {
            named.push((format!("{KEY_PREFIX}{}.lora_A.weight", l.path), lora.lora_a.shallow_clone()));
            named.push((format!("{KEY_PREFIX}{}.lora_B.weight", l.path), lora.lora_b.shallow_clone()));
        }
    });
    if named.is_empty() {
        return Err(LoraError::NoAdapters.into());
    }
    std::fs::create_dir_all(dir).map_err(|source| PeftError::Io { path: dir.into(), source })?;
    let mut buffers = Vec::new();
    for (key, t) in &named {
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        buffers.push((key.clone(), shape, to_le_bytes(t)?));
    }
    let views = buffers
        .iter()
        .map(|(k, shape, data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data).map(|v| (k.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PeftError::Safetensors { path: dir.join(ADAPTER_WEIGHTS), message: e.to_string() })?;
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let weights = safetensors::serialize(views, &metadata)
        .map_err(|e| PeftError::Safetensors { path: dir.join(ADAPTER_WEIGHTS), message: e.to_string() })?;
    let config = serde_json::to_string_pretty(&adapter_config_json(cfg, meta)).expect("JSON values serialize");
    write_atomic(&dir.join(ADAPTER_WEIGHTS), &weights)?;
    write_atomic(&dir.join(ADAPTER_CONFIG), config.as_bytes())
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), PeftError> {
    crate::atomic_file::write(path, data).map_err(|e| {
        let (path, source) = e.into_parts();
        PeftError::Io { path, source }
    })
}
