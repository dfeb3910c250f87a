//! Limits on what one request may cost a zmq_server: `--max-image-pixels` (an image over it is
//! refused from its header, with a typed error, while other clients are served), decode
//! buffers that shrink back after an outsized image, and `--max-queued-mib` (requests past the
//! byte budget are answered Overloaded at once instead of being buffered).

mod common;

use std::time::{Duration, Instant};

use common::*;
use hacserve_runtime::contract::{ClientTransport, PollMode};
use hacserve_runtime::libzmq::Context;
use hacserve_runtime::preprocess::TENSOR_LEN;
use hacserve_runtime::protocol::*;
use hacserve_runtime::transport::zmq::ZmqClient;

const GOOD_CLIENT: u32 = 1;
const BIG_CLIENT: u32 = 2;

fn client(port: u16, timeout: Duration) -> ZmqClient {
    let ctx = Context::new().unwrap();
    ZmqClient::connect(&ctx, "127.0.0.1", port, timeout, PollMode::Block, 1 << 20).unwrap()
}

/// One round trip; (kind, error code or 0, error text or top-1 class).
fn ask(c: &mut ZmqClient, msg: &[u8]) -> (MessageKind, u32, String) {
    c.send(msg).unwrap();
    let reply = c.recv().expect("every request is answered");
    let (h, body) = Header::decode(reply, 1 << 20).unwrap();
    match h.kind {
        MessageKind::Error => {
            let (code, text) = decode_error(body).unwrap();
            (h.kind, code, text.to_string())
        }
        _ => {
            let body = ResponseBody::decode(body).unwrap();
            (h.kind, 0, body.classes[0].to_string())
        }
    }
}

/// An 8192x8192 progressive JPEG as in the issue (2.5 MB on the wire: the encoder writes no
/// EOB runs; the was 394 KB).
fn huge_progressive() -> Vec<u8> {
    let jpeg = generated_jpeg(8192, 8192, true);
    assert!(jpeg.len() < 4 << 20, "{} B", jpeg.len());
    jpeg
}

#[test]
fn an_image_over_the_default_limit_is_refused_from_its_header_while_others_are_served() {
    let model = model("resnet_tiny");
    let server = zmq_server(&model, &["--workers", "2"]);
    let port = server.port;
    let jpeg = std::fs::read(image()).unwrap();
    let mut good = client(port, Duration::from_secs(60));
    let (kind, _, top1) = ask(
        &mut good,
        &request_message(Task::Jpeg, GOOD_CLIENT, 0, &jpeg),
    );
    assert_eq!(kind, MessageKind::Response);
    let baseline = server.peak_rss_kib();

    let huge = huge_progressive();
    let big = std::thread::spawn(move || {
        let mut c = client(port, Duration::from_secs(60));
        (0..10)
            .map(|i| ask(&mut c, &request_message(Task::Jpeg, BIG_CLIENT, i, &huge)))
            .collect::<Vec<_>>()
    });
    // Meanwhile the good client's every request is answered, and promptly.
    let mut slowest = Duration::ZERO;
    for i in 1..=40 {
        let start = Instant::now();
        let answer = ask(
            &mut good,
            &request_message(Task::Jpeg, GOOD_CLIENT, i, &jpeg),
        );
        slowest = slowest.max(start.elapsed());
        assert_eq!(
            answer,
            (MessageKind::Response, 0, top1.clone()),
            "request {i}"
        );
    }
    for (i, (kind, code, text)) in big.join().unwrap().into_iter().enumerate() {
        assert_eq!(kind, MessageKind::Error, "big request {i}: {text}");
        assert_eq!(
            ErrorCode::from_u32(code),
            Some(ErrorCode::PayloadTooLarge),
            "{text}"
        );
        assert!(
            text.contains("8192x8192") && text.contains("24000000"),
            "{text}"
        );
    }
    // Refused before any pixel was decoded: an 8192x8192 decode costs 400+ MB.
    let grown_mib = server.peak_rss_kib().saturating_sub(baseline) as f64 / 1024.0;
    println!("10 x 8192x8192 refused; server peak RSS +{grown_mib:.1} MiB; good client slowest {slowest:?}");
    assert!(grown_mib < 32.0, "server peak RSS grew {grown_mib:.1} MiB");
    let out = server.stop_within(Duration::from_secs(10)).join("\n");
    let stop = out
        .lines()
        .find(|l| l.starts_with("zmq_server stopped: "))
        .unwrap_or_else(|| panic!("no stop line: {out}"));
    assert_eq!(counter(stop, "rejected"), 10, "{stop}");
    assert_eq!(counter(stop, "answered"), 41, "{stop}");
    assert!(
        out.contains("PayloadTooLarge: image is 8192x8192"),
        "no log line for the refusal: {out}"
    );
}

#[test]
fn decode_buffers_shrink_back_after_the_largest_allowed_image() {
    let model = model("resnet_tiny");
    let server = zmq_server(&model, &["--max-image-pixels", "67108864"]);
    let jpeg = std::fs::read(image()).unwrap();
    let mut c = client(server.port, Duration::from_secs(120));
    for i in 0..5 {
        assert_eq!(
            ask(&mut c, &request_message(Task::Jpeg, GOOD_CLIENT, i, &jpeg)).0,
            MessageKind::Response
        );
    }
    let baseline = server.rss_kib();
    let huge = huge_progressive();
    let (kind, _, text) = ask(&mut c, &request_message(Task::Jpeg, BIG_CLIENT, 0, &huge));
    assert_eq!(kind, MessageKind::Response, "{text}");
    let peak = server.peak_rss_kib();
    for i in 5..10 {
        assert_eq!(
            ask(&mut c, &request_message(Task::Jpeg, GOOD_CLIENT, i, &jpeg)).0,
            MessageKind::Response
        );
    }
    let after = server.rss_kib();
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "RSS {:.1} MiB before the 8192x8192 image, peak {:.1} MiB, {:.1} MiB after 5 ordinary ones",
        mib(baseline),
        mib(peak),
        mib(after)
    );
    // The image was really decoded (201 MB of RGB alone) ...
    assert!(
        peak > baseline + (150 << 10),
        "peak {peak} KiB, baseline {baseline} KiB"
    );
    // ... and its buffers went back: without that the RGB buffer alone stays (+201 MB).
    assert!(
        after < baseline + (24 << 10),
        "RSS {after} KiB after, {baseline} KiB before the large image"
    );
    server.stop_within(Duration::from_secs(10));
}

#[test]
fn requests_past_the_queued_bytes_budget_get_overloaded_and_memory_stays_bounded() {
    // A slow server (the full-size ResNet-50 on one CPU worker) and a 16 MiB budget: 27
    // tensors of 588 KiB.
    let model = model("resnet50");
    let server = zmq_server(
        &model,
        &["--max-queued-mib", "16", "--max-payload", "1000000"],
    );
    let port = server.port;
    let tensor = vec![0u8; TENSOR_LEN * 4];
    let mut good = client(port, Duration::from_secs(120));
    let (kind, _, text) = ask(
        &mut good,
        &request_message(Task::Processed, GOOD_CLIENT, 0, &tensor),
    );
    assert_eq!(kind, MessageKind::Response, "{text}");
    let baseline = server.peak_rss_kib();

    // 300 tensors (176 MB) from one DEALER, paced a little so that what libzmq reads ahead
    // for the receive loop stays small: the queue is what is measured.
    const FLOOD: u64 = 300;
    let mut flooder = client(port, Duration::from_secs(120));
    for i in 0..FLOOD {
        flooder
            .send(&request_message(Task::Processed, BIG_CLIENT, i, &tensor))
            .unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let (mut answered, mut overloaded) = (0u64, 0u64);
    for _ in 0..FLOOD {
        let reply = flooder.recv().expect("every request is answered");
        let (h, body) = Header::decode(reply, 1 << 20).unwrap();
        match h.kind {
            MessageKind::Response => answered += 1,
            MessageKind::Error => {
                let (code, text) = decode_error(body).unwrap();
                assert_eq!(
                    ErrorCode::from_u32(code),
                    Some(ErrorCode::Overloaded),
                    "{text}"
                );
                assert!(text.contains("budget"), "{text}");
                overloaded += 1;
            }
            other => panic!("unexpected reply kind {other:?}"),
        }
    }
    let grown_mib = server.peak_rss_kib().saturating_sub(baseline) as f64 / 1024.0;
    println!("{FLOOD} tensors of 588 KiB: {answered} answered, {overloaded} Overloaded; server peak RSS +{grown_mib:.1} MiB");
    assert!(overloaded > 0, "no request met the budget");
    assert!(answered >= 20, "only {answered} answered");
    // 16 MiB of queue, plus what libzmq reads ahead, the worker's and the allocator's slack;
    // without the budget all 300 (176 MB) queue up.
    assert!(grown_mib < 80.0, "server peak RSS grew {grown_mib:.1} MiB");
    // The good client is still served.
    let (kind, _, text) = ask(
        &mut good,
        &request_message(Task::Processed, GOOD_CLIENT, 1, &tensor),
    );
    assert_eq!(kind, MessageKind::Response, "{text}");
    let out = server.stop_within(Duration::from_secs(10)).join("\n");
    let stop = out
        .lines()
        .find(|l| l.starts_with("zmq_server stopped: "))
        .unwrap_or_else(|| panic!("no stop line: {out}"));
    assert_eq!(counter(stop, "over-budget"), overloaded, "{stop}");
    assert!(
        out.contains("(--max-queued-mib), no room for"),
        "no log line for the budget: {out}"
    );
    assert_eq!(counter(stop, "overloaded"), overloaded, "{stop}");
    assert_eq!(counter(stop, "received"), FLOOD + 2, "{stop}");
    assert_eq!(counter(stop, "answered"), answered + 2, "{stop}");
}

#[test]
fn limits_out_of_range_are_refused_at_start_with_a_message() {
    let model = model("resnet_tiny");
    let model = model.to_str().unwrap();
    for (args, want) in [
        (
            vec!["--max-image-pixels", "0"],
            "--max-image-pixels 0 is outside",
        ),
        (
            vec!["--max-image-pixels", "67108865"],
            "--max-image-pixels 67108865 is outside",
        ),
        (
            vec!["--max-queued-mib", "8"],
            "--max-queued-mib 8 is below one request of the largest payload",
        ),
    ] {
        let mut all = vec!["--port", "0", "--engine-file", model, "-i", "0"];
        all.extend_from_slice(&args);
        let (ok, out) = run(env!("CARGO_BIN_EXE_zmq_server"), &all);
        assert!(!ok && out.contains(want), "{args:?}: {out}");
        assert!(!out.contains("panicked"), "{out}");
    }
}
