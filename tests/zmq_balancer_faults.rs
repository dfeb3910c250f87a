//! Backends that die, hang or are not there yet must cost the balancer's clients no request:
//! each request gets exactly one answer (the backend's, or the balancer's own `Timeout` /
//! `Unavailable`) within its deadline, traffic moves to the live backends, and a backend that
//! comes back is taken back.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use hacserve_runtime::contract::ClientTransport;
use hacserve_runtime::protocol::*;

/// What a client saw.
#[derive(Debug, Default, Clone)]
struct Outcomes {
    sent: u64,
    answered: u64,
    /// Error replies by code.
    errors: std::collections::BTreeMap<String, u64>,
    /// The slowest answer of any kind.
    slowest: Duration,
}

impl Outcomes {
    fn errors_of(&self, code: ErrorCode) -> u64 {
        self.errors.get(&format!("{code:?}")).copied().unwrap_or(0)
    }
    fn merge(&mut self, o: &Outcomes) {
        self.sent += o.sent;
        self.answered += o.answered;
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        self.slowest = self.slowest.max(o.slowest);
    }
}

fn echo(client_id: u32, request_id: u64) -> Vec<u8> {
    let payload = client_id.to_le_bytes();
    let mut m = vec![0u8; HEADER_LEN + payload.len()];
    Header::request(Task::Echo, client_id, request_id, payload.len())
        .encode((&mut m[..HEADER_LEN]).try_into().unwrap());
    m[HEADER_LEN..].copy_from_slice(&payload);
    m
}

/// Closed-loop echo requests until `stop`; every request must get its own answer within
/// `patience` (a client-side timeout is a hang: the test fails).
fn client(port: u16, id: u32, stop: Arc<AtomicBool>, patience: Duration) -> Outcomes {
    let mut c = zmq_connect_with(port, patience, 1 << 20);
    let mut o = Outcomes::default();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        c.send(&echo(id, i)).unwrap();
        o.sent += 1;
        let reply = c
            .recv()
            .unwrap_or_else(|e| panic!("client {id} request {i} got no answer: {e}"));
        o.slowest = o.slowest.max(start.elapsed());
        let (h, body) = Header::decode(reply, 1 << 20).unwrap();
        assert_eq!((h.client_id, h.request_id), (id, i), "someone else's reply");
        match h.kind {
            MessageKind::Response => {
                assert_eq!(&body[RESPONSE_BODY_LEN..], &id.to_le_bytes());
                o.answered += 1;
            }
            MessageKind::Error => {
                let (code, _) = decode_error(body).unwrap();
                let name = ErrorCode::from_u32(code)
                    .map(|c| format!("{c:?}"))
                    .unwrap_or_else(|| code.to_string());
                *o.errors.entry(name).or_default() += 1;
            }
            MessageKind::Request => panic!("a request came back"),
        }
        i += 1;
    }
    o
}

fn clients(
    port: u16,
    n: u32,
    stop: &Arc<AtomicBool>,
    patience: Duration,
) -> Vec<thread::JoinHandle<Outcomes>> {
    (0..n)
        .map(|id| {
            let stop = stop.clone();
            thread::spawn(move || client(port, id, stop, patience))
        })
        .collect()
}

fn join(handles: Vec<thread::JoinHandle<Outcomes>>) -> Outcomes {
    let mut all = Outcomes::default();
    for h in handles {
        all.merge(&h.join().unwrap());
    }
    all
}

/// `<address>: N forwarded ..., N answered, ...` for one backend in the balancer's line.
fn share(line: &str, address: &str, what: &str) -> u64 {
    let part = line
        .split(" | ")
        .nth(1)
        .unwrap()
        .split("; ")
        .find(|p| p.starts_with(address))
        .unwrap_or_else(|| panic!("no share for {address} in {line}"));
    let mut words = part.split([' ', ',', '(']).filter(|w| !w.is_empty());
    let mut prev = "";
    for w in words.by_ref() {
        if w == what {
            return prev.parse().unwrap();
        }
        prev = w;
    }
    panic!("no {what} for {address} in {line}")
}

fn send_signal(s: &Service, sig: &str) {
    std::process::Command::new("kill")
        .args([sig, &s.child.id().to_string()])
        .status()
        .unwrap();
}

#[test]
fn a_killed_backend_costs_no_request_and_is_taken_back_when_it_returns() {
    let model = model("resnet_tiny");
    let a = zmq_server(&model, &[]);
    let b = zmq_server(&model, &[]);
    let a_port = a.port;
    let (a_addr, b_addr) = (
        format!("127.0.0.1:{}", a.port),
        format!("127.0.0.1:{}", b.port),
    );
    let balancer = zmq_balancer(&format!("{a_addr},{b_addr}"), &["--timeout-ms", "3000"]);
    let stop = Arc::new(AtomicBool::new(false));
    let handles = clients(balancer.port, 4, &stop, Duration::from_secs(10));
    thread::sleep(Duration::from_millis(800));
    // SIGKILL: whatever it held is gone with it.
    drop(a);
    thread::sleep(Duration::from_millis(1200));
    let a_again = zmq_server_on(a_port, &model, &[]);
    // libzmq retries with backoff (100 ms doubling to 2 s): give it time to come back.
    thread::sleep(Duration::from_millis(3000));
    stop.store(true, Ordering::Relaxed);
    let seen = join(handles);
    let out = balancer.stop_within(Duration::from_secs(10));
    let line = stop_line(&out, "zmq_balancer");
    let a_again_answered = counter(&stop_line(&a_again.stop(), "zmq_server"), "answered");
    let b_answered = counter(&stop_line(&b.stop(), "zmq_server"), "answered");
    println!("clients: {seen:?}\nbalancer: {line}\nrestarted backend answered {a_again_answered}, other backend {b_answered}");
    assert!(
        seen.sent > 100,
        "too little traffic to mean anything: {seen:?}"
    );
    assert_eq!(seen.sent, seen.answered + seen.errors.values().sum::<u64>());
    // The lost requests were sent again to the live backend: no client saw the loss.
    assert_eq!(seen.errors.values().sum::<u64>(), 0, "{seen:?}");
    assert_eq!(counter(&line, "received"), seen.sent, "{line}");
    assert_eq!(counter(&line, "answered"), seen.answered, "{line}");
    assert!(
        share(&line, &a_addr, "downs") >= 1,
        "the loss was noticed: {line}"
    );
    assert!(
        a_again_answered > 0,
        "the restarted backend was taken back: {line}"
    );
    assert!(seen.slowest < Duration::from_secs(3), "{seen:?}");
}

#[test]
fn a_hung_backend_times_out_its_requests_and_loses_its_traffic() {
    let model = model("resnet_tiny");
    let a = zmq_server(&model, &[]);
    let b = zmq_server(&model, &[]);
    let (a_addr, b_addr) = (
        format!("127.0.0.1:{}", a.port),
        format!("127.0.0.1:{}", b.port),
    );
    let timeout = Duration::from_millis(1000);
    // Its shares every second, to see the backend taken back after it resumes.
    let backends = format!("{a_addr},{b_addr}");
    let balancer = zmq_balancer_reporting(&backends, 1, &["--timeout-ms", "1000"]);
    let stop = Arc::new(AtomicBool::new(false));
    let handles = clients(balancer.port, 4, &stop, Duration::from_secs(10));
    thread::sleep(Duration::from_millis(500));
    // Stopped, not dead: its TCP connections stay open, only heartbeats can tell.
    send_signal(&a, "-STOP");
    thread::sleep(Duration::from_millis(4000));
    send_signal(&a, "-CONT");
    thread::sleep(Duration::from_millis(4000));
    stop.store(true, Ordering::Relaxed);
    let seen = join(handles);
    let out = balancer.stop_within(Duration::from_secs(10));
    let line = stop_line(&out, "zmq_balancer");
    let a_line = stop_line(&a.stop(), "zmq_server");
    // Monitor lines at 1, 2, ... s: the 4th comes just before SIGCONT (4.5 s).
    let shares: Vec<&String> = out.iter().filter(|l| l.starts_with("[balancer]")).collect();
    assert!(shares.len() >= 7, "{out:#?}");
    let answered_by_a = |l: &str| {
        share(
            &format!("x | {}", &l["[balancer] ".len()..]),
            &a_addr,
            "answered",
        )
    };
    let (before_resume, at_end) = (
        answered_by_a(shares[3]),
        answered_by_a(shares[shares.len() - 1]),
    );
    b.stop();
    println!("clients: {seen:?}\nbalancer: {line}\nhung backend: {a_line}");
    assert_eq!(seen.sent, seen.answered + seen.errors.values().sum::<u64>());
    // The requests it held when it stopped were answered Timeout, on time.
    let timeouts = seen.errors_of(ErrorCode::Timeout);
    assert!(
        (1..=4).contains(&timeouts),
        "one per client at most: {seen:?}"
    );
    assert!(
        seen.slowest < timeout + Duration::from_millis(500),
        "{seen:?}"
    );
    assert_eq!(counter(&line, "timeout"), timeouts, "{line}");
    assert!(
        share(&line, &a_addr, "downs") >= 1,
        "heartbeats noticed: {line}"
    );
    // Everything else went to the other backend while it was stopped, and it was taken back
    // after it resumed.
    assert!(share(&line, &b_addr, "answered") > share(&line, &a_addr, "answered"));
    assert!(
        at_end >= before_resume + 10,
        "answered by the resumed backend: {before_resume} before SIGCONT, {at_end} at the end"
    );
    assert!(counter(&a_line, "answered") >= at_end);
}

#[test]
fn requests_wait_for_a_backend_that_is_not_up_yet_and_get_unavailable_past_their_deadline() {
    let model = model("resnet_tiny");
    // A port nobody listens on yet: reserve one by starting and stopping a server.
    let port = zmq_server(&model, &[]).port;
    let addr = format!("127.0.0.1:{port}");
    // Longer than libzmq's longest reconnection pause (2 s) plus a server's start.
    let balancer = zmq_balancer(&addr, &["--timeout-ms", "4000"]);
    let mut c = zmq_connect_with(balancer.port, Duration::from_secs(10), 1 << 20);
    // No backend at all: the request waits its whole deadline, then Unavailable.
    let start = Instant::now();
    c.send(&echo(1, 0)).unwrap();
    let (h, body) = Header::decode(c.recv().unwrap(), 1 << 20).unwrap();
    let waited = start.elapsed();
    assert_eq!(h.kind, MessageKind::Error);
    assert_eq!(decode_error(body).unwrap().0, ErrorCode::Unavailable as u32);
    assert!(
        waited >= Duration::from_millis(3900) && waited < Duration::from_millis(5000),
        "{waited:?}"
    );
    // A request sent before the backend starts is answered once it is up (the old balancer
    // answered Overloaded after a 2 s grace, sleeping through everyone else's traffic).
    c.send(&echo(1, 1)).unwrap();
    thread::sleep(Duration::from_millis(300));
    let server = zmq_server_on(port, &model, &[]);
    let (h, body) = Header::decode(c.recv().unwrap(), 1 << 20).unwrap();
    if h.kind == MessageKind::Error {
        panic!("{:?}", decode_error(body));
    }
    assert_eq!((h.kind, h.request_id), (MessageKind::Response, 1));
    let line = stop_line(&balancer.stop(), "zmq_balancer");
    server.stop();
    assert_eq!(counter(&line, "received"), 2, "{line}");
    assert_eq!(counter(&line, "unavailable"), 1, "{line}");
    assert_eq!(counter(&line, "answered"), 1, "{line}");
}

#[test]
fn a_client_sends_its_request_again_to_a_restarted_server() {
    // ResNet-50 on the CPU: a request takes long enough to be in flight when the server dies.
    let model = model("resnet50");
    let server = zmq_server(&model, &[]);
    let port = server.port;
    let mut c = zmq_connect_with(port, Duration::from_secs(60), 1 << 20);
    let jpeg = std::fs::read(image()).unwrap();
    let mut m = vec![0u8; HEADER_LEN + jpeg.len()];
    Header::request(Task::Jpeg, 5, 42, jpeg.len())
        .encode((&mut m[..HEADER_LEN]).try_into().unwrap());
    m[HEADER_LEN..].copy_from_slice(&jpeg);
    // Warm the server (first inference builds its plan), then the request that meets the kill.
    c.send(&m).unwrap();
    c.recv().unwrap();
    c.send(&m).unwrap();
    thread::sleep(Duration::from_millis(30));
    drop(server); // SIGKILL while it works on the request
    let again = zmq_server_on(port, &model, &[]);
    let (h, _) =
        Header::decode(c.recv().expect("answered by the restarted server"), 1 << 20).unwrap();
    assert_eq!((h.kind, h.request_id), (MessageKind::Response, 42));
    assert_eq!(c.resends(), 1, "sent again once");
    let line = stop_line(&again.stop(), "zmq_server");
    assert_eq!(counter(&line, "answered"), 1, "{line}");
}
