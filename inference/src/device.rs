//! Device and dtype selection.

use std::str::FromStr;

use candle_core::{DType, Device};

use crate::Error;

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The CPU.
    Cpu,
    /// A CUDA GPU by ordinal.
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(n)),
                _ => Err(Error::Device(format!("unknown device {other:?}; use cpu, cuda or cuda:N"))),
            },
        }
    }
}

impl DeviceChoice {
    /// Opens the device. A build without CUDA support says how to get one; a CUDA build on a
    /// machine without a usable GPU says so instead of crashing.
    pub fn open(self) -> Result<Device, Error> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    return Err(Error::Device(
                        "this lookout was built without CUDA support; rebuild with `cargo build --release \
                         --features cuda` (scripts/cuda-toolchain.sh installs the toolkit, see the README)"
                            .into(),
                    ));
                }
                Device::new_cuda(n).map_err(|e| {
                    // candle appends a backtrace to driver errors; the first line says what happened.
                    let e = e.to_string();
                    let e = e.lines().next().unwrap_or("unknown error");
                    Error::Device(format!(
                        "cannot open CUDA device {n}: {e}. Check that the NVIDIA driver is loaded and a GPU is visible \
                         (nvidia-smi), and that libcublas/libcurand/libcudart are on LD_LIBRARY_PATH"
                    ))
                })
            }
        }
    }
}

/// Parses `f32`, `bf16` or `f16`.
pub fn parse_dtype(s: &str) -> Result<DType, Error> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(Error::Config(format!("unknown dtype {other:?}; use f32, bf16 or f16"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_devices() {
        assert_eq!("cpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!("cuda:1".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(1));
        assert!("tpu".parse::<DeviceChoice>().is_err());
        assert!(parse_dtype("int4").is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cpu_build_refuses_cuda_with_advice() {
        let e = DeviceChoice::Cuda(0).open().unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }
}
