//! Accelerator selection. CUDA when libtorch_cuda is linked and a GPU is visible, CPU otherwise.

use tch::{Cuda, Device};

/// Which device to run on, as a user says it: `auto`, `cpu`, `cuda` or `cuda:N`.
pub fn parse(spec: &str) -> Result<Device, String> {
    match spec {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Ok(Device::Cuda(i)),
            _ => Err(format!("device `{s}`: expected auto, cpu, cuda or cuda:N")),
        },
    }
}

/// A one-line description of the device and of the libtorch build, for logs and reports.
pub fn describe(device: Device) -> String {
    let cuda = if Cuda::is_available() {
        format!("CUDA available ({} device(s), cudnn {})", Cuda::device_count(), Cuda::cudnn_is_available())
    } else {
        "CUDA not available".to_string()
    };
    format!("device {device:?}; libtorch {}; {cuda}", libtorch_version())
}

/// The libtorch version this binary was built against (checked at build time by torch-sys).
pub fn libtorch_version() -> &'static str {
    "2.11.0"
}
