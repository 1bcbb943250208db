//! safetensors <-> tch conversion (with string metadata), written durably ([`crate::atomic_file`]).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, View};
use tch::{Device, Kind, Tensor};

/// Errors of tensor file I/O.
#[derive(Debug, thiserror::Error)]
pub enum TensorIoError {
    /// A filesystem operation failed.
    #[error("{op} `{path}`: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    /// The file is not a valid safetensors file.
    #[error("safetensors file `{path}`: {reason}")]
    Format { path: PathBuf, reason: String },
    /// A tensor has a dtype this crate does not store.
    #[error("tensor `{name}`: unsupported dtype {dtype}")]
    Dtype { name: String, dtype: String },
    /// libtorch refused an operation on a tensor.
    #[error("tensor `{name}`: {reason}")]
    Torch { name: String, reason: String },
}

impl From<crate::atomic_file::WriteError> for TensorIoError {
    fn from(e: crate::atomic_file::WriteError) -> Self {
        TensorIoError::Io { op: e.op, path: e.path, source: e.source }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TensorIoError + 'a {
    move |source| TensorIoError::Io { op, path: path.to_path_buf(), source }
}

/// A tensor copied to host memory in safetensors layout (contiguous, little-endian).
#[derive(Debug, Clone)]
pub struct HostTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &HostTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn kind_to_dtype(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

fn dtype_to_kind(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Copies `t` (any device) to host memory, bit-exact.
pub fn to_host(name: &str, t: &Tensor) -> Result<HostTensor, TensorIoError> {
    let kind = t.kind();
    let dtype = kind_to_dtype(kind)
        .ok_or_else(|| TensorIoError::Dtype { name: name.to_string(), dtype: format!("{kind:?}") })?;
    let cpu = t.detach().to_device(Device::Cpu).contiguous();
    let numel = cpu.numel();
    let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
    cpu.f_copy_data_u8(&mut data, numel)
        .map_err(|e| TensorIoError::Torch { name: name.to_string(), reason: e.to_string() })?;
    let shape = cpu.size().iter().map(|&d| d as usize).collect();
    Ok(HostTensor { dtype, shape, data })
}

/// Serializes named tensors and string metadata to safetensors bytes.
pub fn to_safetensors_bytes(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, TensorIoError> {
    let host = tensors.iter().map(|(n, t)| to_host(n, t).map(|h| (n.clone(), h))).collect::<Result<Vec<_>, _>>()?;
    safetensors::tensor::serialize(host.iter().map(|(n, h)| (n.as_str(), h)), &metadata)
        .map_err(|e| TensorIoError::Format { path: PathBuf::from("<memory>"), reason: e.to_string() })
}

/// Writes named tensors and metadata to `path` as safetensors, atomically (see [`crate::atomic_file`]).
pub fn write_safetensors_atomic(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<(), TensorIoError> {
    let bytes = to_safetensors_bytes(tensors, metadata)?;
    Ok(crate::atomic_file::write(path, &bytes)?)
}

/// A safetensors file's tensors (on the CPU, in file order by name) and its metadata.
pub struct LoadedTensors {
    /// Tensors sorted by name.
    pub tensors: Vec<(String, Tensor)>,
    /// The `__metadata__` string map (empty when absent).
    pub metadata: HashMap<String, String>,
}

/// Parses safetensors `bytes` (named `path` in errors).
pub fn from_safetensors_bytes(path: &Path, bytes: &[u8]) -> Result<LoadedTensors, TensorIoError> {
    let fmt = |reason: String| TensorIoError::Format { path: path.to_path_buf(), reason };
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| fmt(e.to_string()))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(bytes).map_err(|e| fmt(e.to_string()))?;
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        let kind = dtype_to_kind(view.dtype())
            .ok_or_else(|| TensorIoError::Dtype { name: name.clone(), dtype: format!("{:?}", view.dtype()) })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)
            .map_err(|e| TensorIoError::Torch { name: name.clone(), reason: e.to_string() })?;
        tensors.push((name, t));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(LoadedTensors { tensors, metadata })
}

/// Reads a safetensors file.
pub fn read_safetensors(path: &Path) -> Result<LoadedTensors, TensorIoError> {
    let bytes = fs::read(path).map_err(io_err("read", path))?;
    from_safetensors_bytes(path, &bytes)
}
