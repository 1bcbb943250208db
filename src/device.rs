//! Accelerator selection. CUDA when libtorch_cuda is linked and a GPU is visible, CPU otherwise.

use tch::{Cuda, Device, Kind};

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

/// [`parse`], then checks that the device exists in this process (a CUDA index below the number
/// of visible GPUs, with libtorch_cuda loaded), so a missing GPU is a clear error up front.
pub fn parse_available(spec: &str) -> Result<Device, String> {
    let device = parse(spec)?;
    if let Device::Cuda(i) = device {
        let visible = if Cuda::is_available() { Cuda::device_count() } else { 0 };
        if i as i64 >= visible {
            return Err(format!(
                "device `{spec}`: CUDA device {i} is not available ({visible} visible to this libtorch)"
            ));
        }
    }
    Ok(device)
}

/// The inference dtype a user names for `device`: `auto` (bf16 on CUDA, f32 on the CPU), `f32`
/// or `bf16`.
pub fn parse_dtype(spec: &str, device: Device) -> Result<Kind, String> {
    match spec {
        "auto" if device.is_cuda() => Ok(Kind::BFloat16),
        "auto" | "f32" => Ok(Kind::Float),
        "bf16" => Ok(Kind::BFloat16),
        other => Err(format!("dtype `{other}`: expected auto, f32 or bf16")),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_dtypes_parse_or_name_what_was_expected() {
        assert_eq!(parse("cuda:2"), Ok(Device::Cuda(2)));
        assert!(parse("gpu").unwrap_err().contains("expected auto, cpu, cuda or cuda:N"));
        assert_eq!(parse_available("cpu"), Ok(Device::Cpu));
        let visible = if Cuda::is_available() { Cuda::device_count() } else { 0 };
        let missing = format!("cuda:{visible}");
        assert!(parse_available(&missing).unwrap_err().contains("is not available"));
        assert_eq!(parse_dtype("auto", Device::Cpu), Ok(Kind::Float));
        assert_eq!(parse_dtype("auto", Device::Cuda(0)), Ok(Kind::BFloat16));
        assert_eq!(parse_dtype("bf16", Device::Cpu), Ok(Kind::BFloat16));
        assert!(parse_dtype("f16", Device::Cpu).unwrap_err().contains("expected auto, f32 or bf16"));
    }
}
