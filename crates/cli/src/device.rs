//! Run-time device selection: one binary, the backend named on the command line.

use anyhow::{Result, bail};
use burn::tensor::Device;

/// Parses `flex`/`cpu`, `ndarray`, and `cuda[:N]`, `rocm[:N]`, `vulkan` when built with those features.
pub fn parse(name: &str) -> Result<Device> {
    let (kind, index) = match name.split_once(':') {
        Some((k, i)) => match i.parse::<usize>() {
            Ok(i) => (k, i),
            Err(_) => bail!("--device {name}: '{i}' is not a device index"),
        },
        None => (name, 0),
    };
    // Only the GPU backends take an index; a CPU-only build has no use for it.
    let _ = index;
    match kind {
        "flex" | "cpu" => Ok(Device::flex()),
        // burn's older CPU backend, deprecated in favour of flex but kept here on purpose: its
        // kernels are independent of flex's, which is what a cross-backend parity check needs.
        #[allow(deprecated)]
        "ndarray" => Ok(Device::ndarray()),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Device::cuda(index)),
        #[cfg(feature = "rocm")]
        "rocm" => Ok(Device::rocm(index)),
        #[cfg(feature = "vulkan")]
        "vulkan" => Ok(Device::vulkan(burn::tensor::DeviceKind::DefaultDevice)),
        // Reached only for the GPU features this binary was built without.
        #[allow(unreachable_patterns)]
        "cuda" | "rocm" | "vulkan" => bail!(
            "--device {name}: this binary was built without the '{kind}' feature (cargo build --release --features {kind})"
        ),
        other => {
            bail!("--device {other}: unknown device (known: flex, ndarray, cuda, rocm, vulkan)")
        }
    }
}
