//! What the RDMA transport finds at run time, for a role's `--check`: libibverbs and
//! librdmacm (through the same loaders the transport uses), and every device with its ports'
//! state, link layer and MTU, as typed values.

use super::sys::cm::RdmaCm;
use super::sys::verbs::{self as sys, DlError, Verbs, VerbsError};
use super::verbs::PortState;

/// `ibv_port_attr::link_layer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkLayer {
    InfiniBand,
    /// RoCE (Soft-RoCE's rxe, or a RoCE NIC).
    Ethernet,
    Unspecified,
}

/// One port of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Port {
    pub num: u8,
    pub state: PortState,
    pub link_layer: LinkLayer,
    /// The active MTU in bytes (None for a code verbs.h does not define).
    pub mtu: Option<u32>,
}

/// A device and its ports, or why they could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub ports: Result<Vec<Port>, VerbsError>,
}

/// The libraries (each one's soname or why it did not open) and, when libibverbs opened, the
/// devices.
#[derive(Debug, Clone)]
pub struct RdmaProbe {
    pub verbs: Result<&'static str, DlError>,
    pub cm: Result<&'static str, DlError>,
    pub devices: Option<Result<Vec<Device>, VerbsError>>,
}

/// Loads both libraries and lists the devices; nothing is required to be there.
pub fn probe() -> RdmaProbe {
    let verbs = Verbs::load();
    let devices = verbs.as_ref().ok().map(|v| {
        v.device_ports().map(|devices| {
            devices
                .into_iter()
                .map(|d| Device {
                    name: d.name,
                    ports: d.ports.map(|ports| ports.iter().map(port).collect()),
                })
                .collect()
        })
    });
    RdmaProbe {
        verbs: verbs.map(|v| v.library()),
        cm: RdmaCm::load().map(|cm| cm.library()),
        devices,
    }
}

fn port(p: &sys::PortAttributes) -> Port {
    Port {
        num: p.port_num,
        state: PortState::from_raw(p.state),
        link_layer: match p.link_layer {
            sys::IBV_LINK_LAYER_INFINIBAND => LinkLayer::InfiniBand,
            sys::IBV_LINK_LAYER_ETHERNET => LinkLayer::Ethernet,
            _ => LinkLayer::Unspecified,
        },
        // IBV_MTU_256 = 1 ... IBV_MTU_4096 = 5.
        mtu: (sys::IBV_MTU_256..=sys::IBV_MTU_4096)
            .contains(&p.active_mtu)
            .then(|| 128u32 << p.active_mtu),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn probe_reports_without_panicking() {
        let p = super::probe();
        eprintln!("{p:?}");
        match (&p.verbs, &p.devices) {
            (Ok(soname), Some(_)) => assert_eq!(*soname, "libibverbs.so.1"),
            (Err(e), None) => assert!(e.to_string().contains("libibverbs"), "{e}"),
            other => panic!("devices are listed exactly when libibverbs opened: {other:?}"),
        }
    }
}
