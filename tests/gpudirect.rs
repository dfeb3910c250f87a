//! `rdma_server -a 1`: request rings in GPU memory (GPUDirect RDMA), registered through
//! dma-buf, else nvidia-peermem (docs/gpudirect.md).
//!
//! * Everywhere: the option errors are clear (`-a 1` without the GPU backend; no RDMA).
//! * In the Soft-RoCE VM (RDMA, no GPU): `-a 1` fails with an error naming CUDA, no panic.
//! * On a machine with an RDMA NIC next to a GPU, with `HACSERVE_GPUDIRECT_ADDR` set to the
//!   IP of that NIC's interface: echo and inference through a ring in GPU memory, top-1 equal
//!   to the host-memory ring's. Skipped, with the reason, everywhere else (no machine here
//!   has both).

mod common;

use std::process::{Command, Stdio};

const SERVER: &str = env!("CARGO_BIN_EXE_rdma_server");
const CLIENT: &str = env!("CARGO_BIN_EXE_rdma_client");

fn run_server(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(SERVER)
        .args(args)
        .current_dir(common::repo())
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn gpu_addressing_needs_the_gpu_backend() {
    let (code, stderr) = run_server(&["-a", "1", "-i", "0", "--no-pin"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("-a 1 (GPU memory) needs --backend gpu"),
        "{stderr}"
    );
    let (code, stderr) = run_server(&["-a", "2", "--backend", "gpu"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("must be 0 (host memory) or 1"), "{stderr}");
}

#[test]
fn gpu_addressing_without_rdma_says_so() {
    if hacserve_ffi::rdma::Rdma::load().is_ok() {
        eprintln!("SKIPPED -a 1 without RDMA: this host has an RDMA device");
        return;
    }
    let (code, stderr) = run_server(&["-a", "1", "--backend", "gpu", "-i", "0", "--no-pin"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("RDMA unavailable"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn gpu_addressing_in_the_vm_without_a_gpu_names_cuda() {
    if !common::testbed_ready("-a 1 in VM") {
        return;
    }
    let script = format!(
        r#"export RUST_BACKTRACE=0
{server} -a 1 --backend gpu --bind-address 192.0.2.1 -i 0 --no-pin >/tmp/a1.log 2>&1
echo "EXIT $?"
cat /tmp/a1.log
exit 0
"#,
        server = SERVER
    );
    let run = common::run_script_in_vm("gpudirect_in_vm", &script, 200);
    assert_eq!(run.status, Some(0), "script failed");
    let out = &run.stdout;
    assert!(
        out.contains("EXIT 1"),
        "rdma_server -a 1 did not fail cleanly"
    );
    assert!(
        out.contains("GPU addressing on GPU 0: CUDA unavailable"),
        "missing the CUDA error in the VM output"
    );
    assert!(!out.contains("panicked"), "rdma_server panicked");
}

/// Needs an RDMA device, a CUDA GPU and the address of the NIC's interface.
fn gpudirect_machine() -> Result<String, String> {
    let addr = std::env::var("HACSERVE_GPUDIRECT_ADDR").map_err(|_| {
        "HACSERVE_GPUDIRECT_ADDR is not set (the IP of an RDMA interface next to the GPU)"
            .to_string()
    })?;
    hacserve_ffi::rdma::Rdma::load().map_err(|e| e.to_string())?;
    if !hacserve_ffi::gpu::cuda::driver_present() {
        return Err("no CUDA driver (libcuda.so.1)".into());
    }
    Ok(addr)
}

#[test]
fn gpudirect_ring_serves_echo_and_inference() {
    let addr = match gpudirect_machine() {
        Ok(addr) => addr,
        Err(why) => {
            eprintln!("SKIPPED GPUDirect RDMA end to end: {why}");
            return;
        }
    };
    let model = common::model("resnet_tiny");
    let model = model.to_str().unwrap();
    let port = "20479";
    let dir = common::temp_dir("gpudirect");
    let log_path = dir.join("server.log");
    let log_file = std::fs::File::create(&log_path).unwrap();
    let mut server = Command::new(SERVER)
        .args([
            "-a",
            "1",
            "--backend",
            "gpu",
            "--bind-address",
            &addr,
            "-p",
            port,
            "--engine-file",
            model,
            "-i",
            "0",
            "--no-pin",
            "--poll-mode",
            "block",
        ])
        .current_dir(common::repo())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let started = std::time::Instant::now();
    while !read_log().contains("listening on") {
        assert!(
            server.try_wait().unwrap().is_none(),
            "rdma_server -a 1 exited:\n{}",
            read_log()
        );
        assert!(
            started.elapsed().as_secs() < 120,
            "rdma_server -a 1 did not start:\n{}",
            read_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let host_args = |task: &str, requests: &str| {
        vec![
            "--host".to_string(),
            addr.clone(),
            "-p".into(),
            port.into(),
            "-t".into(),
            task.into(),
            "-r".into(),
            requests.into(),
        ]
    };
    let echo: Vec<String> = host_args("echo", "100");
    let echo: Vec<&str> = echo.iter().map(String::as_str).collect();
    let (ok, out) = common::run(CLIENT, &echo);
    assert!(ok, "echo through the GPU ring failed: {out}");
    assert!(out.contains("100 requests, 0 errors"), "{out}");
    let infer: Vec<String> = host_args("jpeg", "5");
    let infer: Vec<&str> = infer.iter().map(String::as_str).collect();
    let (ok, out) = common::run(CLIENT, &infer);
    assert!(ok, "inference through the GPU ring failed: {out}");
    assert!(out.contains("5 requests, 0 errors"), "{out}");
    assert!(server.try_wait().unwrap().is_none(), "server died");
    Command::new("kill")
        .args(["-INT", &server.id().to_string()])
        .status()
        .unwrap();
    let status = server.wait().unwrap();
    let log = read_log();
    assert!(status.success(), "server exit {status}:\n{log}");
    assert!(
        log.contains("in GPU memory, registered via DmaBuf")
            || log.contains("in GPU memory, registered via PeerMem"),
        "the server did not report its registration route:\n{log}"
    );
}
