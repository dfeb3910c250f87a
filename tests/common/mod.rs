//! Shared helpers for the end-to-end tests: real binaries on 127.0.0.1, real models.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use hacserve_runtime::model_gen;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn image() -> PathBuf {
    repo().join("models/grace_hopper.jpg")
}

/// Writes a generated model once per target dir (same seed, same bytes), atomically so that
/// tests running in parallel never see half a file.
pub fn model(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("models");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.onnx"));
    if !path.exists() {
        let proto = match name {
            "resnet50" => model_gen::resnet50(50),
            "resnet_tiny" => model_gen::tiny_resnet(50),
            other => panic!("no generator for {other}"),
        };
        // Per thread, not only per process: two tests of one binary may both generate it
        // (the second's rename found the first's file gone).
        let thread = format!("{:?}", std::thread::current().id()).replace(['(', ')'], "");
        let tmp = dir.join(format!("{name}.{}.{thread}.tmp", std::process::id()));
        model_gen::write_model(&proto, &tmp).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }
    path
}

/// A server-like process (zmq_server, zmq_balancer) that prints "listening on tcp://...:PORT".
pub struct Service {
    pub child: Child,
    pub port: u16,
    lines: mpsc::Receiver<String>,
    pub output: Vec<String>,
}

impl Service {
    pub fn start(bin: &str, args: &[&str]) -> Service {
        let mut child = Command::new(bin)
            .args(args)
            .current_dir(repo())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
        let (tx, rx) = mpsc::channel();
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let mut output = Vec::new();
        loop {
            let Ok(line) = rx.recv_timeout(Duration::from_secs(120)) else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{bin} did not start; output: {output:#?}");
            };
            output.push(line.clone());
            if let Some(at) = line.find("listening on tcp://") {
                let rest = &line[at + "listening on tcp://".len()..];
                let endpoint = rest.split_whitespace().next().unwrap();
                let port = endpoint.rsplit(':').next().unwrap().parse().unwrap();
                return Service {
                    child,
                    port,
                    lines: rx,
                    output,
                };
            }
        }
    }

    /// Resident memory in KiB (VmRSS from /proc), 0 when it cannot be read.
    pub fn rss_kib(&self) -> u64 {
        self.proc_status_kib("VmRSS:")
    }

    /// The peak of resident memory so far in KiB (VmHWM: catches a buffer freed again).
    pub fn peak_rss_kib(&self) -> u64 {
        self.proc_status_kib("VmHWM:")
    }

    fn proc_status_kib(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGINT, wait, and return everything it printed.
    pub fn stop(self) -> Vec<String> {
        self.stop_within(Duration::from_secs(600))
    }

    /// SIGINT; fails the test (after a SIGKILL) unless the process exits successfully within
    /// `limit`. Returns everything it printed.
    pub fn stop_within(mut self, limit: Duration) -> Vec<String> {
        Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap();
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(500)) {
                    self.output.push(line);
                }
                panic!("still running {limit:?} after SIGINT: {:#?}", self.output);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(500)) {
            self.output.push(line);
        }
        assert!(status.success(), "exit {status}: {:#?}", self.output);
        std::mem::take(&mut self.output)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn zmq_server(model: &Path, extra: &[&str]) -> Service {
    zmq_server_on(0, model, extra)
}

/// A zmq_server on a given port (0: any free one), e.g. a backend restarted where it was.
pub fn zmq_server_on(port: u16, model: &Path, extra: &[&str]) -> Service {
    let model = model.to_str().unwrap().to_string();
    let port = port.to_string();
    let mut args = vec![
        "--port",
        &port,
        "--bind-address",
        "127.0.0.1",
        "--engine-file",
        &model,
        "--poll-mode",
        "block",
        "--no-pin",
        "-i",
        "0",
    ];
    args.extend_from_slice(extra);
    Service::start(env!("CARGO_BIN_EXE_zmq_server"), &args)
}

/// A zmq_balancer on 127.0.0.1 (any port) in front of `backends` ("host:port,..."), block
/// polling, no monitor, plus `extra` options.
pub fn zmq_balancer(backends: &str, extra: &[&str]) -> Service {
    zmq_balancer_reporting(backends, 0, extra)
}

/// A zmq_balancer that prints its backends' shares every `monitor_secs` (0: only at exit).
pub fn zmq_balancer_reporting(backends: &str, monitor_secs: u64, extra: &[&str]) -> Service {
    let monitor = monitor_secs.to_string();
    let mut args = vec![
        "--server-address",
        backends,
        "--local-port",
        "0",
        "--bind-address",
        "127.0.0.1",
        "--poll-mode",
        "block",
        "-i",
        &monitor,
    ];
    args.extend_from_slice(extra);
    Service::start(env!("CARGO_BIN_EXE_zmq_balancer"), &args)
}

/// The value after `key ` in a counters line (`zmq_server stopped: received N answered N ...`).
pub fn counter(line: &str, key: &str) -> u64 {
    let mut words = line.split_whitespace();
    words
        .find(|w| *w == key)
        .and_then(|_| words.next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} count in {line:?}"))
}

/// Runs a binary to completion; returns (success, stdout+stderr).
pub fn run(bin: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("running {bin}: {e}"));
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Runs `bin args... --check` (no backtrace, no stdin); returns (exit code, stdout, stderr)
/// after printing both.
pub fn run_check(bin: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(bin)
        .args(args)
        .arg("--check")
        .env("RUST_BACKTRACE", "0")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {bin}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("{bin} {args:?} --check:\n{stdout}{stderr}");
    (out.status.code(), stdout, stderr)
}

pub fn temp_dir(name: &str) -> PathBuf {
    let d =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Where tests/testbed/setup.sh put the VM kernel and initramfs.
pub fn testbed_dir() -> PathBuf {
    std::env::var_os("HACSERVE_TESTBED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/testbed"))
}

/// Why the testbed cannot run here, if it cannot.
pub fn testbed_missing() -> Option<String> {
    let qemu = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|d| d.join("qemu-system-x86_64").is_file()))
        .unwrap_or(false);
    if !qemu {
        return Some("qemu-system-x86_64 is not on PATH (run tests/testbed/setup.sh)".into());
    }
    if !repo().join("tests/testbed/run-in-vm.sh").is_file() {
        return Some("tests/testbed/run-in-vm.sh is missing".into());
    }
    for file in ["vmlinuz", "initramfs.cpio.gz"] {
        let path = testbed_dir().join(file);
        if !path.is_file() {
            return Some(format!(
                "{} missing (run tests/testbed/setup.sh)",
                path.display()
            ));
        }
    }
    None
}

/// True when the testbed can run here. Otherwise says why, loudly, as
/// `SKIPPED <what>: <reason>` on the real stderr (not the harness's captured one, so it shows in
/// CI logs without --nocapture) and returns false; with HACSERVE_TESTBED_REQUIRED=1 (CI) a
/// missing testbed fails the test instead. Every VM test starts with it.
pub fn testbed_ready(what: &str) -> bool {
    let Some(reason) = testbed_missing() else {
        return true;
    };
    if std::env::var("HACSERVE_TESTBED_REQUIRED").as_deref() == Ok("1") {
        panic!(
            "{what}: the Soft-RoCE testbed is required (HACSERVE_TESTBED_REQUIRED=1) but {reason}"
        );
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED {what}: {reason}");
    false
}

/// The console line before the command's own output.
pub const VM_BEGIN: &str = "HACSERVE_TESTBED_BEGIN";
/// The console line after it, followed by the command's exit status.
pub const VM_EXIT: &str = "HACSERVE_TESTBED_EXIT=";

/// One VM at a time (per test binary; cargo runs the binaries one after another): the machine
/// has 2 cores and each VM uses 2 vCPUs.
static VM: Mutex<()> = Mutex::new(());

/// What one VM boot gave back.
pub struct VmRun {
    /// run-in-vm.sh's exit status: the command's, or 124/125 for the testbed's own failures.
    pub status: Option<i32>,
    /// The guest console.
    pub stdout: String,
    /// Where the files the command wrote into `$HACSERVE_TESTBED_OUT` are now.
    pub out_dir: PathBuf,
}

impl VmRun {
    /// The command's own output: the console lines between the testbed's markers.
    pub fn command_output(&self) -> &str {
        let start = self
            .stdout
            .find(VM_BEGIN)
            .map(|i| i + VM_BEGIN.len())
            .unwrap_or_else(|| panic!("no {VM_BEGIN} marker in:\n{}", self.stdout));
        let end = self.stdout[start..]
            .rfind(VM_EXIT)
            .map(|i| start + i)
            .unwrap_or(self.stdout.len());
        &self.stdout[start..end]
    }
}

/// Boots the testbed VM and runs `args` in it (tests/testbed/run-in-vm.sh, from the repo root,
/// `timeout_s` for the whole boot); prints the console and the timing (shown with --nocapture
/// or when the test fails). `name` names the host dir that receives `$HACSERVE_TESTBED_OUT`.
pub fn run_in_vm(name: &str, args: &[&str], timeout_s: u32) -> VmRun {
    let _one_at_a_time = VM.lock().unwrap_or_else(|e| e.into_inner());
    let out_dir = temp_dir(&format!("{name}-out"));
    let started = Instant::now();
    let out = Command::new(repo().join("tests/testbed/run-in-vm.sh"))
        .args(args)
        .current_dir(repo())
        .env("HACSERVE_TESTBED_TIMEOUT", timeout_s.to_string())
        .env("HACSERVE_TESTBED_OUT", &out_dir)
        .stdin(Stdio::null())
        .output()
        .expect("starting tests/testbed/run-in-vm.sh");
    let run = VmRun {
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        out_dir,
    };
    eprintln!(
        "{name}: run-in-vm.sh {args:?}: status {:?} after {:.1} s\n--- stdout\n{}--- stderr\n{}",
        run.status,
        started.elapsed().as_secs_f64(),
        run.stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    run
}

/// Writes `script` (sh) to `<target tmp>/<name>/run.sh` and runs it in one VM boot. (The guest
/// sees the host's root read-only and its /tmp only under a throw-away layer, so the script
/// lives in target/; the script's own scratch files go to the guest's /tmp.)
pub fn run_script_in_vm(name: &str, script: &str, timeout_s: u32) -> VmRun {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("run.sh");
    std::fs::write(&path, script).unwrap();
    run_in_vm(name, &["sh", path.to_str().unwrap()], timeout_s)
}

/// The output a VM script printed between its `=== name ===` line and the next `=== ` line.
pub fn section<'a>(out: &'a str, name: &str) -> &'a str {
    let head = format!("=== {name} ===");
    let Some(start) = out.find(&head) else {
        panic!("section {name} missing from the VM output");
    };
    let rest = &out[start + head.len()..];
    let end = rest.find("=== ").unwrap_or(rest.len());
    &rest[..end]
}

/// The top-5 a correct server must return for the test image: the CPU pipeline and tract,
/// in-process.
pub fn cpu_top5(model: &Path) -> [u32; 5] {
    use hacserve_runtime::engine::tract_cpu::TractLoader;
    use hacserve_runtime::engine::EngineLoader;
    use hacserve_runtime::preprocess::{Preprocessor, TENSOR_LEN};
    let mut pre = Preprocessor::new(1 << 26);
    pre.decode(&std::fs::read(image()).unwrap()).unwrap();
    let mut tensor = vec![0f32; TENSOR_LEN];
    pre.preprocess(&mut tensor).unwrap();
    let mut session = TractLoader::load(model, 1).unwrap().session().unwrap();
    let mut logits = vec![0f32; session.num_classes()];
    session.infer(&tensor, &mut logits).unwrap();
    let mut body = hacserve_runtime::protocol::ResponseBody::default();
    hacserve_runtime::pipeline::top_k_softmax(&logits, &mut body);
    body.classes
}

/// A ZeroMQ client of a server on 127.0.0.1:`port` (60 s timeout, blocking polls).
pub fn zmq_connect(port: u16) -> hacserve_runtime::transport::zmq::ZmqClient {
    zmq_connect_with(port, Duration::from_secs(60), 64 << 20)
}

/// A blocking ZeroMQ client of 127.0.0.1:`port` that waits `patience` for each reply.
pub fn zmq_connect_with(
    port: u16,
    patience: Duration,
    max_reply: usize,
) -> hacserve_runtime::transport::zmq::ZmqClient {
    let ctx = hacserve_runtime::libzmq::Context::new().unwrap();
    hacserve_runtime::transport::zmq::ZmqClient::connect(
        &ctx,
        "127.0.0.1",
        port,
        patience,
        hacserve_runtime::contract::PollMode::Block,
        max_reply,
    )
    .unwrap()
}

/// A role's stop line (`<role> stopped: ...`) among a process's output lines.
pub fn stop_line(out: &[String], role: &str) -> String {
    out.iter()
        .find(|l| l.contains(&format!("{role} stopped")))
        .unwrap_or_else(|| panic!("no {role} stop line: {out:#?}"))
        .clone()
}

/// The same in a block of text (a section of a VM run's output).
pub fn stop_line_in<'a>(text: &'a str, role: &str) -> &'a str {
    text.lines()
        .find(|l| l.contains(&format!("{role} stopped: ")))
        .unwrap_or_else(|| panic!("no {role} stop line in:\n{text}"))
}

/// (runs, requests, errors) summed over client runs' table lines
/// (" <label>: N requests, E errors, ...").
pub fn client_totals(text: &str) -> (u64, u64, u64) {
    let (mut runs, mut requests, mut errors) = (0, 0, 0);
    for l in text.lines().filter(|l| l.contains(" requests, ")) {
        let words: Vec<&str> = l.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "requests,").unwrap();
        requests += words[at - 1].parse::<u64>().unwrap();
        errors += words[at + 1].parse::<u64>().unwrap();
        runs += 1;
    }
    (runs, requests, errors)
}

/// The sum over a proxy's backend connections of the count before `what` in its stop line's
/// shares ("<counters> | conn 0: 5 forwarded, 5 answered, ...; conn 1: ... | ...").
pub fn proxy_share_sum(line: &str, what: &str) -> u64 {
    let part = line.split(" | ").nth(1).unwrap_or("");
    let words: Vec<&str> = part
        .split([' ', ',', ';'])
        .filter(|w| !w.is_empty())
        .collect();
    words
        .windows(2)
        .filter(|w| w[1] == what)
        .map(|w| w[0].parse::<u64>().unwrap())
        .sum()
}

/// Sends one message and returns the reply's header and body.
pub fn round_trip(
    c: &mut hacserve_runtime::transport::zmq::ZmqClient,
    msg: &[u8],
) -> (hacserve_runtime::protocol::Header, Vec<u8>) {
    use hacserve_runtime::contract::ClientTransport;
    c.send(msg).unwrap();
    let buf = c.recv().unwrap();
    let (h, body) = hacserve_runtime::protocol::Header::decode(buf, 64 << 20).unwrap();
    (h, body.to_vec())
}

/// A smooth synthetic picture, generated row by row (no pixel buffer of its own).
struct Gradient {
    width: u16,
    height: u16,
}

impl jpeg_encoder::ImageBuffer for Gradient {
    fn get_jpeg_color_type(&self) -> jpeg_encoder::JpegColorType {
        jpeg_encoder::JpegColorType::Ycbcr
    }
    fn width(&self) -> u16 {
        self.width
    }
    fn height(&self) -> u16 {
        self.height
    }
    fn fill_buffers(&self, y: u16, buffers: &mut [Vec<u8>; 4]) {
        let (w, h) = (u32::from(self.width), u32::from(self.height));
        for x in 0..w {
            let (x, y) = (x * 255 / w, u32::from(y) * 255 / h);
            buffers[0].push(((x + y) / 2) as u8);
            buffers[1].push(x as u8);
            buffers[2].push((255 - y) as u8);
        }
    }
}

/// A `width`x`height` JPEG made at run time (4:2:0, quality 80), progressive or baseline:
/// an 8192x8192 progressive one is 2.5 MB, a large image in a small request.
pub fn generated_jpeg(width: u16, height: u16, progressive: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = jpeg_encoder::Encoder::new(&mut out, 80);
    encoder.set_progressive(progressive);
    encoder
        .encode_image(Gradient { width, height })
        .expect("encoding the test JPEG");
    out
}

/// A request message: header + payload.
pub fn request_message(
    task: hacserve_runtime::protocol::Task,
    client_id: u32,
    request_id: u64,
    payload: &[u8],
) -> Vec<u8> {
    request_message_with_flags(task, client_id, request_id, 0, payload)
}

/// A request message with `flags` in its header.
pub fn request_message_with_flags(
    task: hacserve_runtime::protocol::Task,
    client_id: u32,
    request_id: u64,
    flags: u32,
    payload: &[u8],
) -> Vec<u8> {
    use hacserve_runtime::protocol::{Header, HEADER_LEN};
    let mut header = Header::request(task, client_id, request_id, payload.len());
    header.flags = flags;
    let mut head = [0u8; HEADER_LEN];
    header.encode(&mut head);
    let mut m = head.to_vec();
    m.extend_from_slice(payload);
    m
}

/// What one run of the two-VM testbed (tests/testbed/run-in-2vm.sh) gave back.
pub struct TwoVmRun {
    /// run-in-2vm.sh's exit status (124/125: a VM failed as a testbed).
    pub status: Option<i32>,
    /// Each command's own status, from run-in-2vm.sh's `status a=N b=M` line.
    pub status_a: Option<i32>,
    pub status_b: Option<i32>,
    /// Guest a's (192.0.2.1) and guest b's (192.0.2.2) console, the `a| `/`b| ` prefix cut.
    pub a: String,
    pub b: String,
    /// Seconds the whole run took on the host.
    pub wall_s: f64,
}

/// Writes `script_a` and `script_b` (sh) under `<target tmp>/<name>/` and runs them in the
/// two-VM testbed: a on 192.0.2.1 (server side), b on 192.0.2.2 (client side), `timeout_s`
/// for each VM. Prints both consoles and the timing.
pub fn run_in_2vm(name: &str, script_a: &str, script_b: &str, timeout_s: u32) -> TwoVmRun {
    let _one_at_a_time = VM.lock().unwrap_or_else(|e| e.into_inner());
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let (path_a, path_b) = (dir.join("a.sh"), dir.join("b.sh"));
    std::fs::write(&path_a, script_a).unwrap();
    std::fs::write(&path_b, script_b).unwrap();
    let out_dir = temp_dir(&format!("{name}-out"));
    let started = Instant::now();
    let out = Command::new(repo().join("tests/testbed/run-in-2vm.sh"))
        .arg(format!("sh {}", path_a.display()))
        .arg(format!("sh {}", path_b.display()))
        .current_dir(repo())
        .env("HACSERVE_TESTBED_TIMEOUT", timeout_s.to_string())
        .env("HACSERVE_TESTBED_OUT", &out_dir)
        .stdin(Stdio::null())
        .output()
        .expect("starting tests/testbed/run-in-2vm.sh");
    let wall_s = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let side = |p: &str| -> String {
        stdout
            .lines()
            .filter_map(|l| l.strip_prefix(p))
            .map(|l| format!("{}\n", l.trim_end_matches('\r')))
            .collect()
    };
    let status_of = |key: &str| {
        stderr
            .lines()
            .find_map(|l| l.strip_prefix("run-in-2vm: status "))
            .and_then(|l| l.split([' ', ';']).find_map(|w| w.strip_prefix(key)))
            .and_then(|v| v.parse().ok())
    };
    let run = TwoVmRun {
        status: out.status.code(),
        status_a: status_of("a="),
        status_b: status_of("b="),
        a: side("a| "),
        b: side("b| "),
        wall_s,
    };
    eprintln!(
        "{name}: run-in-2vm.sh: status {:?} (a {:?}, b {:?}) after {wall_s:.1} s\n--- stdout\n{stdout}--- stderr\n{stderr}",
        run.status, run.status_a, run.status_b
    );
    run
}

/// Shell functions both sides of a two-VM script use: `signal NAME` (touch a file in the
/// shared sync dir), `await NAME SECONDS` (wait for it, with a deadline; 1 when it never
/// came), `step NAME SECONDS CMD...` (run CMD under `timeout`, print `=== NAME ===`,
/// `exit status N` and its output; fail=1 unless it exited 0).
pub const TWO_VM_SH: &str = r#"set -u
export RUST_BACKTRACE=0
fail=0
SYNC=$HACSERVE_TESTBED_SYNC
signal() { touch "$SYNC/$1"; }
await() { end=$(($(date +%s) + $2)); while [ ! -e "$SYNC/$1" ]; do [ "$(date +%s)" -ge $end ] && { echo "AWAIT TIMEOUT: $1 after $2 s"; return 1; }; sleep 0.2; done; }
step() { name=$1; limit=$2; shift 2; timeout -k 5 "$limit" "$@" >/tmp/$name.log 2>&1; rc=$?; [ $rc = 0 ] || { fail=1; echo "FAILED: $name ($rc)"; }; echo "=== $name ==="; echo "exit status $rc"; cat /tmp/$name.log; }
wait_log() { for i in $(seq 1 300); do grep -q "$2" "$1" && return 0; sleep 0.2; done; echo "NOT READY: $1 ($2)"; cat "$1"; return 1; }
"#;
