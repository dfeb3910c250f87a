//! The Soft-RoCE testbed (tests/testbed/): boots the qemu VM with `run-in-vm.sh`, checks that
//! the guest has an active rxe0 device and that a command's exit status comes back to the host.
//!
//! Needs `tests/testbed/setup.sh` to have run (qemu, kernel, initramfs). Without it every test
//! here prints a `SKIPPED softroce testbed: ...` line and passes, unless
//! HACSERVE_TESTBED_REQUIRED=1, which turns the skip into a failure.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

/// One VM at a time: the machine has 2 cores and each VM uses 2 vCPUs.
static VM: Mutex<()> = Mutex::new(());

const BEGIN: &str = "HACSERVE_TESTBED_BEGIN";
const EXIT: &str = "HACSERVE_TESTBED_EXIT=";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn testbed_dir() -> PathBuf {
    std::env::var_os("HACSERVE_TESTBED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/testbed"))
}

/// Why the testbed cannot run here, if it cannot.
fn missing() -> Option<String> {
    let qemu = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|d| d.join("qemu-system-x86_64").is_file()))
        .unwrap_or(false);
    if !qemu {
        return Some("qemu-system-x86_64 is not on PATH".into());
    }
    for file in ["vmlinuz", "initramfs.cpio.gz"] {
        let path = testbed_dir().join(file);
        if !path.is_file() {
            return Some(format!("{} is missing", path.display()));
        }
    }
    None
}

/// True when the testbed is ready; otherwise says so loudly on the real stderr (not the
/// captured one, so it shows in CI logs even without --nocapture). With
/// HACSERVE_TESTBED_REQUIRED=1 a missing testbed fails the test instead.
fn testbed_ready() -> bool {
    match missing() {
        None => true,
        Some(reason) if std::env::var("HACSERVE_TESTBED_REQUIRED").as_deref() == Ok("1") => {
            panic!("softroce testbed required but {reason} (run tests/testbed/setup.sh)")
        }
        Some(reason) => {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED softroce testbed: {reason} (run tests/testbed/setup.sh)"
            );
            false
        }
    }
}

struct VmRun {
    status: Option<i32>,
    stdout: String,
}

impl VmRun {
    /// The command's own output: the console lines between the testbed's markers.
    fn command_output(&self) -> &str {
        let start = self
            .stdout
            .find(BEGIN)
            .map(|i| i + BEGIN.len())
            .unwrap_or_else(|| panic!("no {BEGIN} marker in:\n{}", self.stdout));
        let end = self.stdout[start..]
            .rfind(EXIT)
            .map(|i| start + i)
            .unwrap_or(self.stdout.len());
        &self.stdout[start..end]
    }
}

fn run_in_vm(args: &[&str]) -> VmRun {
    let _one_at_a_time = VM.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let out = Command::new(repo().join("tests/testbed/run-in-vm.sh"))
        .args(args)
        .current_dir(repo())
        .env("HACSERVE_TESTBED_TIMEOUT", "300")
        .stdin(Stdio::null())
        .output()
        .expect("starting tests/testbed/run-in-vm.sh");
    let run = VmRun {
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    };
    eprintln!(
        "run-in-vm.sh {args:?}: status {:?} after {:.1} s\n--- stdout\n{}--- stderr\n{}",
        run.status,
        started.elapsed().as_secs_f64(),
        run.stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    run
}

#[test]
fn rxe0_is_active_in_the_vm() {
    if !testbed_ready() {
        return;
    }
    let run = run_in_vm(&["ibv_devinfo", "-d", "rxe0"]);
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
    if !testbed_ready() {
        return;
    }
    let run = run_in_vm(&["sh", "-c", "echo before-exit-3; exit 3"]);
    assert_eq!(
        run.status,
        Some(3),
        "exit 3 in the VM must give 3 on the host"
    );
    assert!(run.stdout.contains(&format!("{EXIT}3")), "no exit marker");
    assert_eq!(run.command_output().trim(), "before-exit-3");
}
