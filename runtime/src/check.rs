//! A role's `--check`: what it would load at run time (rdma-core for the RDMA transport; the
//! CUDA driver, cuDNN, cuBLAS, NVRTC and nvJPEG for the GPU backend), where each library was
//! loaded from, the RDMA devices and ports or the GPUs, and whether the role can run. It
//! loads exactly what the role itself loads, through the same loaders, so a library that
//! `--check` finds is the one the role would use.

use std::fmt;

use hacserve_ffi::gpu::probe::{self as gpu_probe, Version};
use hacserve_ffi::rdma::probe::{self as rdma_probe, Device, LinkLayer};
use hacserve_ffi::rdma::verbs::PortState;

/// One line of the report: a finding, and whether the role needs it and has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What was looked for ("libibverbs", "RDMA device rxe0", "cuDNN").
    pub what: String,
    /// What was found, or why it is missing.
    pub detail: String,
    /// False when the role cannot run without it.
    pub ok: bool,
}

/// The findings of one part ("RDMA", "GPU").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub title: &'static str,
    pub findings: Vec<Finding>,
}

impl Section {
    fn new(title: &'static str) -> Self {
        Section {
            title,
            findings: Vec::new(),
        }
    }

    fn push(&mut self, what: impl Into<String>, detail: impl Into<String>, ok: bool) {
        self.findings.push(Finding {
            what: what.into(),
            detail: detail.into(),
            ok,
        });
    }

    /// The findings the role cannot run without, as "what: detail".
    pub fn missing(&self) -> impl Iterator<Item = String> + '_ {
        self.findings
            .iter()
            .filter(|f| !f.ok)
            .map(|f| format!("{}: {}", f.what, f.detail))
    }
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}:", self.title)?;
        for finding in &self.findings {
            let mark = if finding.ok { "ok     " } else { "MISSING" };
            writeln!(f, "  {mark} {:<22} {}", finding.what, finding.detail)?;
        }
        Ok(())
    }
}

/// The files mapped into this process whose name starts with `prefix` ("libibverbs.so"):
/// where the dynamic loader really found a library (from /proc/self/maps, which also lists
/// the rdma-core provider a device list pulled in).
pub fn loaded_files(prefix: &str) -> Vec<String> {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return Vec::new();
    };
    let mut files: Vec<String> = Vec::new();
    for path in maps.lines().filter_map(|l| l.split_whitespace().nth(5)) {
        let name = path.rsplit('/').next().unwrap_or(path);
        if name.starts_with(prefix) && !files.iter().any(|f| f == path) {
            files.push(path.to_string());
        }
    }
    files
}

/// "where: /usr/lib/x86_64-linux-gnu/libibverbs.so.1.14.39.0" or the soname alone when the
/// mapping cannot be read.
fn from_where(soname: &str, prefix: &str) -> String {
    match loaded_files(prefix).as_slice() {
        [] => format!("{soname} loaded"),
        files => format!("{soname} from {}", files.join(", ")),
    }
}

/// The RDMA transport's needs: libibverbs, librdmacm, and at least one device with an active
/// port.
pub fn rdma() -> Section {
    let mut s = Section::new("RDMA (rdma-core, loaded at run time)");
    let probe = rdma_probe::probe();
    match probe.verbs {
        Ok(soname) => s.push("libibverbs", from_where(soname, "libibverbs.so"), true),
        Err(e) => s.push("libibverbs", e.to_string(), false),
    }
    match probe.cm {
        Ok(soname) => s.push("librdmacm", from_where(soname, "librdmacm.so"), true),
        Err(e) => s.push("librdmacm", e.to_string(), false),
    }
    match probe.devices {
        None => {}
        Some(Ok(devices)) if devices.is_empty() => s.push(
            "RDMA devices",
            "none (ibv_get_device_list found none; load rdma_rxe or attach a NIC)",
            false,
        ),
        Some(Ok(devices)) => {
            let any_active = devices.iter().any(has_active_port);
            for device in &devices {
                s.push(
                    format!("device {}", device.name),
                    describe_ports(device),
                    any_active,
                );
            }
            if !any_active {
                s.push("active port", "no device has a port in state Active", false);
            }
            // The provider libibverbs picked for the devices (e.g. librxe-rdmav34.so).
            let providers: Vec<String> = loaded_files("lib")
                .into_iter()
                .filter(|f| f.contains("-rdmav"))
                .collect();
            if !providers.is_empty() {
                s.push("provider", providers.join(", "), true);
            }
        }
        Some(Err(e)) => s.push("RDMA devices", e.to_string(), false),
    }
    s
}

fn has_active_port(device: &Device) -> bool {
    matches!(&device.ports, Ok(ports) if ports.iter().any(|p| p.state == PortState::Active))
}

fn describe_ports(device: &Device) -> String {
    let ports = match &device.ports {
        Ok(ports) => ports,
        Err(e) => return format!("ports unreadable: {e}"),
    };
    let described: Vec<String> = ports
        .iter()
        .map(|p| {
            let link = match p.link_layer {
                LinkLayer::InfiniBand => "InfiniBand",
                LinkLayer::Ethernet => "Ethernet (RoCE)",
                LinkLayer::Unspecified => "link layer unspecified",
            };
            let mtu = p
                .mtu
                .map_or_else(|| "MTU unknown".to_string(), |m| format!("MTU {m}"));
            format!("port {}: {:?}, {link}, {mtu}", p.num, p.state)
        })
        .collect();
    described.join("; ")
}

fn version(v: Version) -> String {
    format!("{}.{}.{}", v.0, v.1, v.2)
}

/// The GPU backend's needs on GPUs `gpus`: the driver with those GPUs, cuDNN, cuBLAS and
/// NVRTC (its preprocessing and FP16 kernels), and nvJPEG when it decodes on the GPU.
pub fn gpu(gpus: &[usize], gpu_decode: bool) -> Section {
    let mut s = Section::new("GPU backend (CUDA libraries, loaded at run time)");
    let probe = gpu_probe::probe();
    match &probe.driver {
        Ok(info) => {
            s.push(
                "CUDA driver",
                format!(
                    "CUDA {}.{} ({})",
                    info.cuda_version / 1000,
                    (info.cuda_version % 1000) / 10,
                    from_where("libcuda.so.1", "libcuda.so")
                ),
                true,
            );
            for g in &info.gpus {
                s.push(format!("GPU {}", g.ordinal), g.name.clone(), true);
            }
            for &wanted in gpus {
                if !info.gpus.iter().any(|g| g.ordinal == wanted) {
                    s.push(
                        format!("GPU {wanted}"),
                        format!("not present (--gpus; the driver lists {})", info.gpus.len()),
                        false,
                    );
                }
            }
        }
        Err(e) => s.push("CUDA driver", e.clone(), false),
    }
    let libs = [
        ("cuDNN", &probe.cudnn, "libcudnn.so"),
        ("cuBLAS", &probe.cublas, "libcublas.so"),
        ("NVRTC", &probe.nvrtc, "libnvrtc.so"),
    ];
    for (name, found, prefix) in libs {
        match found {
            Ok(v) => s.push(
                name,
                format!("{} ({})", version(*v), from_where(prefix, prefix)),
                true,
            ),
            Err(e) => s.push(name, e.clone(), false),
        }
    }
    let nvjpeg_detail = match &probe.nvjpeg {
        Ok((soname, v)) => Ok(format!(
            "{} ({})",
            v.map(version)
                .unwrap_or_else(|| "version not reported".into()),
            from_where(soname, "libnvjpeg.so")
        )),
        Err(e) => Err(e.clone()),
    };
    match (nvjpeg_detail, gpu_decode) {
        (Ok(detail), _) => s.push("nvJPEG", detail, true),
        (Err(e), true) => s.push("nvJPEG", format!("{e} (needed by --decode gpu)"), false),
        (Err(e), false) => s.push("nvJPEG", format!("{e} (not needed: --decode cpu)"), true),
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loaded_files_finds_libc_and_not_a_made_up_name() {
        let libc = loaded_files("libc.so");
        assert!(libc.iter().any(|f| f.starts_with('/')), "{libc:?}");
        assert!(loaded_files("libhacserve-no-such").is_empty());
    }

    /// Either answer is a report, never a panic; a missing part says what is missing.
    #[test]
    fn rdma_and_gpu_sections_name_what_is_missing() {
        for section in [rdma(), gpu(&[0], true)] {
            eprint!("{section}");
            assert!(!section.findings.is_empty());
            for line in section.missing() {
                assert!(line.contains(':'), "{line}");
            }
        }
    }
}
