//! Soak with exact accounting: for a fixed time (`HACSERVE_SOAK_SECS`, default 20), good
//! clients (echo of varied sizes, full inference) and hostile ones (a flooder that never
//! reads, a client of malformed requests, one oversized frame) go through zmq_balancer to two
//! zmq_server backends; backend A is SIGKILLed a third of the way in and restarted on its
//! port. Then, on every hop: sent = answered + errored with nothing lost (a good client
//! whose request is not answered within 10 s fails the test), the balancer's counts close
//! exactly, and resident memory is flat between a point after warm-up and the end. The hops
//! are printed as a table.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use hacserve_runtime::contract::ClientTransport;
use hacserve_runtime::libzmq::{Context, SocketType};
use hacserve_runtime::protocol::*;

#[derive(Debug, Default, Clone)]
struct Tally {
    sent: u64,
    answered: u64,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn errored(&self) -> u64 {
        self.errors.values().sum()
    }
    fn add(&mut self, o: &Tally) {
        self.sent += o.sent;
        self.answered += o.answered;
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
    }
}

fn message(task: Task, client: u32, request: u64, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![0u8; HEADER_LEN + payload.len()];
    Header::request(task, client, request, payload.len())
        .encode((&mut m[..HEADER_LEN]).try_into().unwrap());
    m[HEADER_LEN..].copy_from_slice(payload);
    m
}

fn code_name(code: u32) -> String {
    ErrorCode::from_u32(code)
        .map(|c| format!("{c:?}"))
        .unwrap_or_else(|| code.to_string())
}

/// A well-behaved closed-loop client: echoes of sizes cycling 16 B .. 64 KiB, or inference
/// of the test photo. Fails the test on a reply that does not come within 10 s.
fn good_client(port: u16, id: u32, infer: bool, stop: Arc<AtomicBool>) -> Tally {
    let mut c = zmq_connect_with(port, Duration::from_secs(10), 1 << 20);
    let jpeg = std::fs::read(image()).unwrap();
    let sizes = [16usize, 1024, 16 << 10, 64 << 10];
    let mut t = Tally::default();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let (task, payload) = if infer {
            (Task::Jpeg, jpeg.clone())
        } else {
            let n = sizes[i as usize % sizes.len()];
            (Task::Echo, vec![(id as u8).wrapping_add(i as u8); n])
        };
        c.send(&message(task, id, i, &payload)).unwrap();
        t.sent += 1;
        let reply = c
            .recv()
            .unwrap_or_else(|e| panic!("good client {id}: request {i} lost: {e}"));
        let (h, body) = Header::decode(reply, 1 << 20).unwrap();
        assert_eq!((h.client_id, h.request_id), (id, i), "someone else's reply");
        match h.kind {
            MessageKind::Response => {
                if task == Task::Echo {
                    assert_eq!(&body[RESPONSE_BODY_LEN..], &payload[..], "echo corrupted");
                }
                t.answered += 1;
            }
            MessageKind::Error => {
                let (code, _) = decode_error(body).unwrap();
                *t.errors.entry(code_name(code)).or_default() += 1;
            }
            MessageKind::Request => panic!("a request came back"),
        }
        i += 1;
    }
    t
}

/// Malformed requests (bad magic, truncated, unknown task), each answered with its error.
fn malformed_client(port: u16, stop: Arc<AtomicBool>) -> Tally {
    let mut c = zmq_connect_with(port, Duration::from_secs(10), 1 << 20);
    let mut t = Tally::default();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut m = message(Task::Echo, 77, i, b"abcd");
        match i % 3 {
            0 => m[0] ^= 0xff,           // bad magic
            1 => m.truncate(HEADER_LEN), // payload missing
            _ => m[7] = 0xee,            // unknown task
        }
        c.send(&m).unwrap();
        t.sent += 1;
        let reply = c
            .recv()
            .unwrap_or_else(|e| panic!("malformed client: request {i} lost: {e}"));
        let (h, body) = Header::decode(reply, 1 << 20).unwrap();
        assert_eq!(h.kind, MessageKind::Error, "a malformed request was served");
        let (code, _) = decode_error(body).unwrap();
        *t.errors.entry(code_name(code)).or_default() += 1;
        i += 1;
        thread::sleep(Duration::from_millis(2));
    }
    t
}

/// A DEALER that sends `n` echoes and never reads a reply.
fn flooder(port: u16, n: u64, stop: Arc<AtomicBool>) -> u64 {
    let ctx = Context::new().unwrap();
    let s = ctx.socket(SocketType::Dealer).unwrap();
    s.set_rcvhwm(1).unwrap();
    s.set_linger(0).unwrap();
    s.connect(&format!("tcp://127.0.0.1:{port}")).unwrap();
    for i in 0..n {
        s.send(&message(Task::Echo, 99, i, &[0u8; 1024]), 0)
            .unwrap();
    }
    while !stop.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(20));
    }
    n
}

/// One frame far over the balancer's limit: its connection is dropped, nothing is admitted.
fn oversized(port: u16) {
    let ctx = Context::new().unwrap();
    let s = ctx.socket(SocketType::Dealer).unwrap();
    s.set_linger(0).unwrap();
    s.connect(&format!("tcp://127.0.0.1:{port}")).unwrap();
    s.send(&vec![0u8; 16 << 20], 0).unwrap();
    thread::sleep(Duration::from_millis(500));
}

#[test]
fn soak_through_the_balancer_with_a_backend_killed_and_restarted() {
    let secs: u64 = std::env::var("HACSERVE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let model = model("resnet_tiny");
    let a = zmq_server(&model, &[]);
    let b = zmq_server(&model, &[]);
    let a_port = a.port;
    let backends = format!("127.0.0.1:{},127.0.0.1:{}", a.port, b.port);
    // 1 MiB payloads at most: the 16 MiB frame is far over.
    let balancer = zmq_balancer(
        &backends,
        &["--max-payload", "1048576", "--timeout-ms", "5000"],
    );
    let port = balancer.port;
    let stop = Arc::new(AtomicBool::new(false));
    let good: Vec<_> = (0..6u32)
        .map(|id| {
            let stop = stop.clone();
            thread::spawn(move || good_client(port, id, id >= 4, stop))
        })
        .collect();
    let bad = {
        let stop = stop.clone();
        thread::spawn(move || malformed_client(port, stop))
    };
    let flood = {
        let stop = stop.clone();
        thread::spawn(move || flooder(port, 20_000, stop))
    };
    let start = Instant::now();
    let at = |s: f64| Duration::from_secs_f64(secs as f64 * s);
    thread::sleep(at(0.15));
    oversized(port);
    // Warm-up done: every buffer the steady state needs is there.
    let (bal_rss0, b_rss0) = (balancer.rss_kib(), b.rss_kib());
    thread::sleep(at(0.33).saturating_sub(start.elapsed()));
    drop(a); // SIGKILL
    thread::sleep(Duration::from_millis(1500));
    let a_again = zmq_server_on(a_port, &model, &[]);
    thread::sleep(at(1.0).saturating_sub(start.elapsed()));
    let (bal_rss1, b_rss1) = (balancer.rss_kib(), b.rss_kib());
    stop.store(true, Ordering::Relaxed);
    let mut clients = Tally::default();
    for h in good {
        clients.add(&h.join().unwrap());
    }
    let malformed = bad.join().unwrap();
    let flooded = flood.join().unwrap();
    let bal_out = balancer.stop_within(Duration::from_secs(10));
    let bal = stop_line(&bal_out, "zmq_balancer");
    let a2 = stop_line(&a_again.stop(), "zmq_server");
    let bl = stop_line(&b.stop(), "zmq_server");

    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "\nsoak {secs} s through zmq_balancer, backend A killed at {:.1} s and restarted",
        at(0.33).as_secs_f64()
    );
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>6}  errors",
        "hop", "sent", "answered", "errored", "lost"
    );
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>6}  {:?}",
        "good clients (4 echo, 2 infer)",
        clients.sent,
        clients.answered,
        clients.errored(),
        clients.sent - clients.answered - clients.errored(),
        clients.errors
    );
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>6}  {:?}",
        "malformed client",
        malformed.sent,
        malformed.answered,
        malformed.errored(),
        malformed.sent - malformed.answered - malformed.errored(),
        malformed.errors
    );
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>6}  (never reads)",
        "flooder", flooded, "-", "-", "-"
    );
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>6}  (connection dropped)",
        "oversized frame", 1, "-", "-", "-"
    );
    println!("balancer:  {bal}");
    println!("backend A (killed): its counts died with it");
    println!("backend A (restarted): {a2}");
    println!("backend B: {bl}");
    println!(
        "resident memory: balancer {:.1} -> {:.1} MiB, backend B {:.1} -> {:.1} MiB (after warm-up -> end)",
        mib(bal_rss0),
        mib(bal_rss1),
        mib(b_rss0),
        mib(b_rss1)
    );

    // Every good request answered, by a backend: the kill cost nobody an answer.
    assert!(clients.sent > 1000, "too little traffic: {clients:?}");
    assert_eq!(clients.sent, clients.answered + clients.errored());
    assert_eq!(clients.errored(), 0, "{clients:?}");
    assert_eq!(malformed.sent, malformed.errored(), "{malformed:?}");
    // The balancer's books close exactly: everything it received is accounted once.
    let received = counter(&bal, "received");
    assert_eq!(received, clients.sent + malformed.sent + flooded, "{bal}");
    let closed = counter(&bal, "answered")
        + counter(&bal, "timeout")
        + counter(&bal, "unavailable")
        + counter(&bal, "overloaded");
    assert_eq!(received, closed, "{bal}");
    // What the flooder did not read was dropped at its own queue, nobody else's.
    assert!(
        counter(&bal, "dropped") > 0 && counter(&bal, "dropped") <= flooded,
        "{bal}"
    );
    assert!(
        counter(&a2, "answered") > 0,
        "the restarted backend was taken back: {a2}"
    );
    // Flat memory: growth after warm-up within 16 MiB (balancer) and 32 MiB (backend).
    assert!(
        bal_rss1 < bal_rss0 + 16 * 1024,
        "balancer grew {:.1} MiB",
        mib(bal_rss1.saturating_sub(bal_rss0))
    );
    assert!(
        b_rss1 < b_rss0 + 32 * 1024,
        "backend grew {:.1} MiB",
        mib(b_rss1.saturating_sub(b_rss0))
    );
}
