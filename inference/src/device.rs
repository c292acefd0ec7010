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

/// The KV budget when `--kv-cache-mb` is not given, measured once the weights are loaded, with
/// a line saying how it was chosen. The budget only bounds admission (caches are allocated per
/// request), so it is what the device can spare, not memory taken up front:
/// - CPU: a quarter of the memory available now (`MemAvailable`), between 256 MiB and 16 GiB
///   (4 GiB where the kernel does not say);
/// - CUDA: the free device memory less a tenth of the total (activations, cuBLAS workspace) and
///   the vision cache, at least 256 MiB: vLLM's `gpu_memory_utilization` of 0.9.
pub fn default_kv_budget(device: &Device, vision_cache_bytes: usize) -> (usize, String) {
    match device {
        Device::Cuda(_) => match cuda_memory(device) {
            Some((free, total)) => (
                cuda_budget(free, total, vision_cache_bytes),
                format!(
                    "free GPU memory after loading ({} of {} MiB) less a tenth of the total and the vision cache",
                    free >> 20,
                    total >> 20
                ),
            ),
            None => (FALLBACK_KV, "4096 MiB (the GPU did not say how much memory is free)".into()),
        },
        _ => match mem_available() {
            Some(avail) => {
                (cpu_budget(avail), format!("a quarter of the memory available after loading ({} MiB)", avail >> 20))
            }
            None => (FALLBACK_KV, "4096 MiB (the kernel did not say how much memory is available)".into()),
        },
    }
}

const MIB: usize = 1 << 20;
const FALLBACK_KV: usize = 4096 * MIB;

fn cpu_budget(available: usize) -> usize {
    (available / 4).clamp(256 * MIB, 16384 * MIB)
}

fn cuda_budget(free: usize, total: usize, vision_cache_bytes: usize) -> usize {
    free.saturating_sub(total / 10).saturating_sub(vision_cache_bytes).max(256 * MIB)
}

/// `MemAvailable` from /proc/meminfo, in bytes.
fn mem_available() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

fn parse_mem_available(meminfo: &str) -> Option<usize> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let kib: usize = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(feature = "cuda")]
fn cuda_memory(device: &Device) -> Option<(usize, usize)> {
    match device {
        Device::Cuda(d) => d.cuda_stream().context().mem_get_info().ok(),
        _ => None,
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_memory(_: &Device) -> Option<(usize, usize)> {
    None
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

    #[test]
    fn kv_budget_defaults_follow_the_device() {
        let meminfo = "MemTotal:       24000000 kB\nMemFree:        1000 kB\nMemAvailable:   20971520 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(20 << 30));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(cpu_budget(20 << 30), 5 << 30);
        assert_eq!(cpu_budget(512 << 20), 256 << 20, "at least 256 MiB");
        assert_eq!(cpu_budget(1 << 40), 16 << 30, "at most 16 GiB");
        // An 80 GiB GPU with 75 GiB free after the weights: 75 - 8 - 0.5.
        let gib = 1usize << 30;
        assert_eq!(cuda_budget(75 * gib, 80 * gib, gib / 2), 75 * gib - 8 * gib - gib / 2);
        assert_eq!(cuda_budget(gib, 80 * gib, 0), 256 << 20, "a full GPU still admits a request");
        // On this machine: a quarter of what is available, which the kernel reports here.
        let (bytes, why) = default_kv_budget(&Device::Cpu, 0);
        let avail = mem_available().expect("/proc/meminfo says MemAvailable");
        assert_eq!(bytes, cpu_budget(avail), "{why}");
        assert!(why.contains("quarter"), "{why}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cpu_build_refuses_cuda_with_advice() {
        let e = DeviceChoice::Cuda(0).open().unwrap_err().to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }
}
