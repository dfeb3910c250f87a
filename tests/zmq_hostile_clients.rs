//! Clients that misbehave must not hurt the others: a client that floods requests and never
//! reads its replies gets them dropped (counted against it), while a well-behaved client is
//! still answered within 100 ms, the server's memory stays bounded and a stop still works.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hacserve_runtime::contract::ClientTransport;
use hacserve_runtime::contract::PollMode;
use hacserve_runtime::libzmq::{Context, SocketType};
use hacserve_runtime::protocol::*;
use hacserve_runtime::transport::zmq::ZmqClient;

const FLOOD_CLIENT: u32 = 9;

fn echo(client_id: u32, request_id: u64, payload_len: usize) -> Vec<u8> {
    let mut head = [0u8; HEADER_LEN];
    Header::request(Task::Echo, client_id, request_id, payload_len).encode(&mut head);
    let mut m = vec![0u8; HEADER_LEN + payload_len];
    m[..HEADER_LEN].copy_from_slice(&head);
    m
}

/// The slowest of `n` echo round trips of a well-behaved client.
fn slowest_round_trip(c: &mut ZmqClient, client_id: u32, first: u64, n: u64) -> Duration {
    let mut slowest = Duration::ZERO;
    for i in first..first + n {
        let start = Instant::now();
        c.send(&echo(client_id, i, 16)).unwrap();
        let reply = c.recv().expect("the good client must be answered");
        let took = start.elapsed();
        let (h, _) = Header::decode(reply, 1 << 20).unwrap();
        assert_eq!(
            (h.kind, h.client_id, h.request_id),
            (MessageKind::Response, client_id, i)
        );
        slowest = slowest.max(took);
    }
    slowest
}

/// Floods `count` echo requests of `payload` bytes from one DEALER that never reads, then
/// keeps the connection open until `sent` is set to u64::MAX.
fn flood(port: u16, count: u64, payload: usize, sent: Arc<AtomicU64>) {
    let ctx = Context::new().unwrap();
    let s = ctx.socket(SocketType::Dealer).unwrap();
    // Read nothing ahead either: libzmq's I/O thread would otherwise take up to its
    // receive high-water mark of replies off the socket on the flooder's behalf.
    s.set_rcvhwm(1).unwrap();
    s.set_linger(0).unwrap();
    s.connect(&format!("tcp://127.0.0.1:{port}")).unwrap();
    let mut msg = echo(FLOOD_CLIENT, 0, payload);
    for i in 0..count {
        msg[16..24].copy_from_slice(&i.to_le_bytes());
        s.send(&msg, 0).unwrap();
        sent.store(i + 1, Ordering::Relaxed);
    }
    // Never read; hold the connection until the test is over.
    while sent.load(Ordering::Relaxed) != u64::MAX {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn good_client(port: u16) -> ZmqClient {
    let ctx = Context::new().unwrap();
    ZmqClient::connect(
        &ctx,
        "127.0.0.1",
        port,
        Duration::from_secs(5),
        PollMode::Block,
        1 << 20,
    )
    .unwrap()
}

/// Runs the flood against a fresh zmq_server and checks the good client, the memory and the
/// stop. Returns (peak RSS growth in MiB, replies dropped).
fn flood_case(count: u64, payload: usize, server_args: &[&str]) -> (f64, u64) {
    let model = model("resnet_tiny");
    let mut server = zmq_server(&model, server_args);
    let port = server.port;
    let mut good = good_client(port);
    slowest_round_trip(&mut good, 1, 0, 20);
    let rss_before = server.peak_rss_kib();

    let sent = Arc::new(AtomicU64::new(0));
    let flooder = {
        let sent = sent.clone();
        std::thread::spawn(move || flood(port, count, payload, sent))
    };
    // While the flood is going on and after it has all been sent, the good client is served.
    let mut next = 20;
    let mut slowest = Duration::ZERO;
    let mut peak_rss = rss_before;
    let deadline = Instant::now() + Duration::from_secs(120);
    while sent.load(Ordering::Relaxed) < count {
        assert!(Instant::now() < deadline, "the flood did not get through");
        slowest = slowest.max(slowest_round_trip(&mut good, 1, next, 5));
        next += 5;
        std::thread::sleep(Duration::from_millis(10));
    }
    // Give the server time to take in the tail of the flood (up to the flooder's send
    // queue, 1000 requests), then measure again.
    std::thread::sleep(Duration::from_millis(1000));
    slowest = slowest.max(slowest_round_trip(&mut good, 1, next, 50));
    peak_rss = peak_rss.max(server.peak_rss_kib());
    assert!(server.alive());
    assert!(
        slowest < Duration::from_millis(100),
        "a good client waited {slowest:?} while another flooded {count} x {payload} B"
    );
    let growth_mib = peak_rss.saturating_sub(rss_before) as f64 / 1024.0;

    // A stop while the flooder is still connected and still not reading: prompt and clean.
    let out = server.stop_within(Duration::from_secs(5)).join("\n");
    sent.store(u64::MAX, Ordering::Relaxed);
    flooder.join().unwrap();
    let stop = out
        .lines()
        .find(|l| l.starts_with("zmq_server stopped: "))
        .unwrap_or_else(|| panic!("no stop line: {out}"));
    let received = counter(stop, "received");
    let dropped = counter(stop, "dropped");
    // The good client's requests and (nearly) all of the flood got in; libzmq may still
    // hold the last of the flood in the flooder's send queue at the stop.
    assert!(received >= next + 50 + count / 2, "{stop}");
    // Every echo was answered (the flooder's replies queued or dropped, none blocked).
    assert_eq!(counter(stop, "answered"), received, "{stop}");
    assert_eq!(counter(stop, "undeliverable"), 0, "{stop}");
    if dropped > 0 {
        let line = out
            .lines()
            .find(|l| l.starts_with("zmq_server replies dropped, clients not reading: "))
            .unwrap_or_else(|| panic!("drops not named per client: {out}"));
        // All of them against the flooder, none against the good client.
        assert!(
            line.contains(&format!("(client {FLOOD_CLIENT}): {dropped}")),
            "{line}"
        );
        assert!(!line.contains("(client 1)"), "{line}");
    }
    println!(
        "flood {count} x {payload} B: good client slowest {:.2} ms, server RSS {} -> peak {} KiB (+{growth_mib:.1} MiB), {dropped} replies dropped",
        slowest.as_secs_f64() * 1e3,
        rss_before,
        peak_rss
    );
    (growth_mib, dropped)
}

#[test]
fn a_client_that_never_reads_small_replies_stalls_nobody() {
    let (growth_mib, dropped) = flood_case(150_000, 16, &[]);
    // The kernel's socket buffers absorb some replies; the rest must be dropped, not queued.
    assert!(
        dropped > 0,
        "150000 unread replies cannot all fit the socket buffers"
    );
    assert!(growth_mib < 64.0, "server grew by {growth_mib:.1} MiB");
}

#[test]
fn a_client_that_never_reads_large_replies_stalls_nobody_and_costs_bounded_memory() {
    // 2000 echoes of 1 MB: the bound is --reply-hwm replies of 1 MB queued for that client.
    let (growth_mib, dropped) = flood_case(2_000, 1 << 20, &["--reply-hwm", "64"]);
    assert!(dropped > 0);
    assert!(growth_mib < 256.0, "server grew by {growth_mib:.1} MiB");
}

#[test]
fn an_oversized_frame_costs_its_sender_the_connection_not_the_balancers_memory() {
    let model = model("resnet_tiny");
    let backend = zmq_server(&model, &["--max-payload", "4096"]);
    let backends = format!("127.0.0.1:{}", backend.port);
    let mut balancer = zmq_balancer(&backends, &["--max-payload", "4096"]);
    let port = balancer.port;
    let mut good = good_client(port);
    slowest_round_trip(&mut good, 1, 0, 10);
    let before = balancer.peak_rss_kib();
    // 256 MiB in one frame: libzmq refuses it from its size field, before buffering it.
    {
        let ctx = Context::new().unwrap();
        let s = ctx.socket(SocketType::Dealer).unwrap();
        s.set_linger(0).unwrap();
        s.connect(&format!("tcp://127.0.0.1:{port}")).unwrap();
        let huge = echo(FLOOD_CLIENT, 0, 256 << 20);
        s.send(&huge, 0).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
    }
    let slowest = slowest_round_trip(&mut good, 1, 10, 20);
    let grown_mib = balancer.peak_rss_kib().saturating_sub(before) as f64 / 1024.0;
    println!("balancer peak RSS {before} KiB, +{grown_mib:.1} MiB after a 256 MiB frame; good client slowest {slowest:?}");
    assert!(balancer.alive());
    assert!(
        grown_mib < 32.0,
        "the balancer buffered the frame: +{grown_mib:.1} MiB"
    );
    assert!(slowest < Duration::from_millis(100), "{slowest:?}");
    let out = balancer.stop_within(Duration::from_secs(5)).join("\n");
    assert!(out.contains("zmq_balancer stopped"), "{out}");
    drop(backend);
}
