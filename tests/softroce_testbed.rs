//! The Soft-RoCE testbed (tests/testbed/): boots the qemu VM with `run-in-vm.sh`, checks that
//! the guest has an active rxe0 device and that a command's exit status comes back to the host.
//!
//! Needs `tests/testbed/setup.sh` to have run (qemu, kernel, initramfs). Without it every test
//! here prints a `SKIPPED softroce testbed: ...` line and passes, unless
//! HACSERVE_TESTBED_REQUIRED=1, which turns the skip into a failure.

mod common;

use common::{run_in_vm, testbed_ready, VM_EXIT as EXIT};

const WHAT: &str = "softroce testbed";

#[test]
fn rxe0_is_active_in_the_vm() {
    if !testbed_ready(WHAT) {
        return;
    }
    let run = run_in_vm("softroce_devinfo", &["ibv_devinfo", "-d", "rxe0"], 300);
    assert_eq!(run.status, Some(0), "ibv_devinfo -d rxe0 failed in the VM");
    assert!(
        run.stdout.contains(&format!("{EXIT}0")),
        "no exit marker on the console"
    );
    let output = run.command_output();
    let hca = output
        .lines()
        .find(|l| l.trim_start().starts_with("hca_id:"))
        .unwrap_or_else(|| panic!("no hca_id line in:\n{output}"));
    assert_eq!(hca.split_whitespace().nth(1), Some("rxe0"), "{hca}");
    let state = output
        .lines()
        .find(|l| l.trim_start().starts_with("state:"))
        .unwrap_or_else(|| panic!("no port state line in:\n{output}"));
    assert!(state.contains("PORT_ACTIVE"), "port not active: {state}");
    assert!(
        output
            .lines()
            .any(|l| l.trim_start().starts_with("link_layer:") && l.contains("Ethernet")),
        "rxe0 must be a RoCE (Ethernet) port:\n{output}"
    );
}

#[test]
fn exit_status_comes_back_to_the_host() {
    if !testbed_ready(WHAT) {
        return;
    }
    let run = run_in_vm(
        "softroce_exit3",
        &["sh", "-c", "echo before-exit-3; exit 3"],
        300,
    );
    assert_eq!(
        run.status,
        Some(3),
        "exit 3 in the VM must give 3 on the host"
    );
    assert!(run.stdout.contains(&format!("{EXIT}3")), "no exit marker");
    assert_eq!(run.command_output().trim(), "before-exit-3");
}
