//! End to end over ZeroMQ on 127.0.0.1: real server, client, balancer and multi_client
//! processes, real generated models (ResNet-50 and the tiny ResNet).

mod common;

use std::time::Duration;

use common::*;
use hacserve_runtime::contract::ClientTransport;
use hacserve_runtime::contract::PollMode;
use hacserve_runtime::libzmq::Context;
use hacserve_runtime::preprocess::TENSOR_LEN;
use hacserve_runtime::protocol::*;
use hacserve_runtime::stats::read_csv;
use hacserve_runtime::transport::zmq::ZmqClient;

fn request(task: Task, client_id: u32, request_id: u64, payload: &[u8]) -> Vec<u8> {
    let mut h = [0u8; HEADER_LEN];
    Header::request(task, client_id, request_id, payload.len()).encode(&mut h);
    let mut m = h.to_vec();
    m.extend_from_slice(payload);
    m
}

#[test]
fn client_and_server_with_resnet50_give_the_in_process_answer() {
    let model = model("resnet50");
    let server = zmq_server(&model, &[]);
    let logs = temp_dir("direct");
    let port = server.port.to_string();
    let (ok, out) = run(
        env!("CARGO_BIN_EXE_zmq_client"),
        &[
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "-r",
            "3",
            "-t",
            "jpeg",
            "-s",
            "-f",
            logs.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");
    for stage in [
        "end-to-end",
        "client->server",
        "queue",
        "decode",
        "preprocess",
        "infer",
        "reply",
    ] {
        assert!(out.contains(stage), "table lacks {stage}: {out}");
    }
    let records = read_csv(&logs.join("client_0.csv")).unwrap();
    assert_eq!(records.len(), 3);
    let want = cpu_top5(&model);
    for r in &records {
        assert_eq!(r.status, 0);
        assert_eq!(
            r.top1, want[0] as i64,
            "server's top-1 differs from the in-process pipeline"
        );
        let s = r.server;
        assert!(s.received <= s.started && s.started <= s.decoded && s.decoded <= s.preprocessed);
        assert!(
            s.preprocessed < s.inferred && s.inferred <= s.replied,
            "{s:?}"
        );
        assert!(
            r.e2e_ns >= s.replied - s.received,
            "e2e shorter than the server's part"
        );
    }
    let summary = std::fs::read_to_string(logs.join("client_0_summary.json")).unwrap();
    assert!(
        summary.contains("\"requests\":3") && summary.contains("\"infer\""),
        "{summary}"
    );
    server.stop();
}

#[test]
fn every_task_over_the_tiny_model() {
    let model = model("resnet_tiny");
    let server = zmq_server(&model, &[]);
    let mut c = zmq_connect(server.port);
    let jpeg = std::fs::read(image()).unwrap();
    let want = cpu_top5(&model);

    let (h, body) = round_trip(&mut c, &request(Task::Jpeg, 1, 10, &jpeg));
    assert_eq!(
        (h.kind, h.client_id, h.request_id),
        (MessageKind::Response, 1, 10)
    );
    let full = ResponseBody::decode(&body).unwrap();
    assert_eq!((full.top_k, full.classes), (5, want));
    let total: f32 = full.scores.iter().sum();
    assert!(full.scores[0] > 0.0 && total <= 1.0 + 1e-5);

    // The same tensor preprocessed by the client gives the same answer.
    let tensor = hacserve_runtime::client::prepare_payload(Task::Processed, &jpeg, None).unwrap();
    assert_eq!(tensor.len(), TENSOR_LEN * 4);
    let (h, body) = round_trip(&mut c, &request(Task::Processed, 1, 11, &tensor));
    assert_eq!(h.kind, MessageKind::Response);
    let by_tensor = ResponseBody::decode(&body).unwrap();
    assert_eq!(by_tensor.classes, full.classes);
    assert!((by_tensor.scores[0] - full.scores[0]).abs() < 1e-5);

    let (h, body) = round_trip(&mut c, &request(Task::Preprocess, 1, 12, &jpeg));
    assert_eq!(h.kind, MessageKind::Response);
    let pre = ResponseBody::decode(&body).unwrap();
    assert_eq!(pre.top_k, 0);
    assert!(pre.timestamps.preprocessed > pre.timestamps.started);

    let payload: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    let (h, body) = round_trip(&mut c, &request(Task::Echo, 1, 13, &payload));
    assert_eq!((h.kind, h.task), (MessageKind::Response, Task::Echo));
    assert_eq!(&body[RESPONSE_BODY_LEN..], &payload[..]);
    server.stop();
}

#[test]
fn malformed_requests_get_typed_errors_and_the_server_keeps_serving() {
    let model = model("resnet_tiny");
    let mut server = zmq_server(&model, &["--max-payload", "100000"]);
    let mut c = zmq_connect(server.port);
    let jpeg = std::fs::read(image()).unwrap();
    let good = request(Task::Jpeg, 2, 1, &jpeg);

    let expect_error = |c: &mut ZmqClient, msg: &[u8], code: ErrorCode| {
        let (h, body) = round_trip(c, msg);
        assert_eq!(h.kind, MessageKind::Error, "expected {code:?}");
        let (got, text) = decode_error(&body).unwrap();
        assert_eq!(ErrorCode::from_u32(got), Some(code), "{text}");
        assert!(!text.is_empty());
        h
    };
    let mut m = good.clone();
    m[0..4].copy_from_slice(b"NOPE");
    let h = expect_error(&mut c, &m, ErrorCode::BadMagic);
    assert_eq!(
        (h.client_id, h.request_id),
        (2, 1),
        "ids salvaged from a rejected header"
    );
    let mut m = good.clone();
    m[4] = 9;
    expect_error(&mut c, &m, ErrorCode::BadVersion);
    let mut m = good.clone();
    m[7] = 42;
    expect_error(&mut c, &m, ErrorCode::BadTask);
    expect_error(&mut c, &good[..20], ErrorCode::Truncated);
    expect_error(&mut c, &good[..good.len() - 100], ErrorCode::Truncated);
    expect_error(
        &mut c,
        &request(Task::Echo, 2, 5, &vec![1u8; 200_000]),
        ErrorCode::PayloadTooLarge,
    );
    expect_error(
        &mut c,
        &request(Task::Jpeg, 2, 6, &jpeg[..jpeg.len() / 3]),
        ErrorCode::BadImage,
    );
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    expect_error(
        &mut c,
        &request(Task::Jpeg, 2, 7, &garbage),
        ErrorCode::BadImage,
    );
    expect_error(
        &mut c,
        &request(Task::Processed, 2, 8, &[0u8; 12]),
        ErrorCode::BadTensor,
    );
    let mut m = request(Task::Echo, 2, 9, b"x");
    m[28] = 0x10;
    expect_error(&mut c, &m, ErrorCode::BadFlags);
    let mut m = request(Task::Echo, 2, 9, b"x");
    m[12] = 3;
    expect_error(&mut c, &m, ErrorCode::UnknownModel);

    // Still serving, correctly.
    let (h, body) = round_trip(&mut c, &good);
    assert_eq!(h.kind, MessageKind::Response);
    assert_eq!(ResponseBody::decode(&body).unwrap().top_k, 5);
    assert!(server.alive());
    let out = server.stop().join("\n");
    assert!(out.contains("rejected 11"), "{out}");
    assert!(
        out.contains("BadMagic") && out.contains("BadImage"),
        "each rejection is logged: {out}"
    );
}

#[test]
fn balancer_spreads_over_two_backends_and_every_reply_reaches_its_client() {
    let model = model("resnet_tiny");
    let a = zmq_server(&model, &[]);
    let b = zmq_server(&model, &[]);
    let backends = format!("127.0.0.1:{},127.0.0.1:{}", a.port, b.port);
    let balancer = zmq_balancer(&backends, &["-c", "2"]);
    let port = balancer.port;
    let threads: Vec<_> = (0..4u32)
        .map(|id| {
            std::thread::spawn(move || {
                let mut c = zmq_connect(port);
                let jpeg = std::fs::read(image()).unwrap();
                for i in 0..15u64 {
                    let task = if i % 3 == 0 { Task::Jpeg } else { Task::Echo };
                    let payload = if task == Task::Echo {
                        id.to_le_bytes().to_vec()
                    } else {
                        jpeg.clone()
                    };
                    let (h, body) = round_trip(&mut c, &request(task, id, i, &payload));
                    assert_eq!(
                        (h.kind, h.client_id, h.request_id),
                        (MessageKind::Response, id, i)
                    );
                    if task == Task::Echo {
                        assert_eq!(&body[RESPONSE_BODY_LEN..], &id.to_le_bytes());
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let out = balancer.stop().join("\n");
    let line = out
        .lines()
        .find(|l| l.contains("zmq_balancer stopped"))
        .unwrap();
    assert_eq!(counter(line, "received"), 60, "{line}");
    assert_eq!(counter(line, "answered"), 60, "{line}");
    let forwarded: Vec<u64> = line
        .split(" | ")
        .nth(1)
        .unwrap()
        .split("; ")
        .map(|part| {
            part.split(": ")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(forwarded.iter().sum::<u64>(), 60, "{line}");
    assert!(
        forwarded.iter().all(|&n| n > 0),
        "both backends used: {line}"
    );
    let served: u64 = [a.stop(), b.stop()]
        .iter()
        .map(|o| {
            let l = o.iter().find(|l| l.contains("zmq_server stopped")).unwrap();
            l.split("answered ")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(served, 60);
}

#[test]
fn multi_client_merges_concurrent_clients() {
    let model = model("resnet_tiny");
    let server = zmq_server(&model, &[]);
    let folder = temp_dir("multi");
    let port = server.port.to_string();
    let (ok, out) = run(
        env!("CARGO_BIN_EXE_multi_client"),
        &[
            "--host",
            "127.0.0.1",
            "-p",
            &port,
            "-c",
            "3",
            "-t",
            "echo",
            "-r",
            "40",
            "-m",
            "range",
            "-s",
            "-f",
            folder.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");
    let summary = std::fs::read_to_string(folder.join("multi_client_summary.csv")).unwrap();
    let rows: Vec<Vec<&str>> = summary
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(
        rows.iter().map(|r| r[0]).collect::<Vec<_>>(),
        ["1", "2", "3"]
    );
    for r in &rows {
        let clients: usize = r[0].parse().unwrap();
        assert_eq!(r[1].parse::<usize>().unwrap(), clients * 40, "{summary}");
        assert_eq!((r[2], r[3]), ("0", "0"), "{summary}");
        assert!(r[4].parse::<f64>().unwrap() > 0.0);
    }
    // Every client's own log is kept with -s and holds its own ids only.
    for id in 0..3u32 {
        let recs = read_csv(&folder.join("clients_3").join(format!("client_{id}.csv"))).unwrap();
        assert_eq!(recs.len(), 40);
        assert!(recs.iter().all(|r| r.client_id == id && r.status == 0));
    }
    server.stop();
}

#[test]
fn binaries_reject_bad_options_with_a_message() {
    let (ok, out) = run(
        env!("CARGO_BIN_EXE_zmq_client"),
        &["-t", "9", "--host", "127.0.0.1"],
    );
    assert!(!ok && out.contains("unknown task"), "{out}");
    let (ok, out) = run(
        env!("CARGO_BIN_EXE_zmq_server"),
        &["--engine-file", "/nonexistent.onnx", "--port", "0"],
    );
    assert!(!ok && out.contains("/nonexistent.onnx"), "{out}");
    assert!(!out.contains("panicked"), "{out}");
    let (ok, out) = run(
        env!("CARGO_BIN_EXE_zmq_client"),
        &[
            "-t",
            "jpeg",
            "-i",
            "/nonexistent.jpg",
            "--host",
            "127.0.0.1",
        ],
    );
    assert!(
        !ok && out.contains("/nonexistent.jpg") && !out.contains("panicked"),
        "{out}"
    );
}

#[test]
fn a_full_queue_answers_overloaded_and_loses_nothing() {
    let model = model("resnet50");
    let server = zmq_server(&model, &["--queue-depth", "1"]);
    let port = server.port;
    let threads: Vec<_> = (0..4u32)
        .map(|id| {
            std::thread::spawn(move || {
                let mut c = zmq_connect(port);
                let jpeg = std::fs::read(image()).unwrap();
                let mut overloaded = 0;
                for i in 0..3u64 {
                    let (h, body) = round_trip(&mut c, &request(Task::Jpeg, id, i, &jpeg));
                    assert_eq!((h.client_id, h.request_id), (id, i));
                    if h.kind == MessageKind::Error {
                        let (code, _) = decode_error(&body).unwrap();
                        assert_eq!(ErrorCode::from_u32(code), Some(ErrorCode::Overloaded));
                        overloaded += 1;
                    } else {
                        assert_eq!(ResponseBody::decode(&body).unwrap().top_k, 5);
                    }
                }
                overloaded
            })
        })
        .collect();
    let overloaded: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(
        overloaded > 0,
        "4 clients against one worker and a queue of 1 must overflow"
    );
    let out = server.stop().join("\n");
    assert!(
        out.contains("received 12 ") && out.contains(&format!("overloaded {overloaded}")),
        "{out}"
    );
}

#[test]
fn requests_accepted_before_a_stop_are_still_answered() {
    let model = model("resnet50");
    let server = zmq_server(&model, &[]);
    let port = server.port;
    let threads: Vec<_> = (0..3u32)
        .map(|id| {
            std::thread::spawn(move || {
                let ctx = Context::new().unwrap();
                let mut c = ZmqClient::connect(
                    &ctx,
                    "127.0.0.1",
                    port,
                    Duration::from_secs(20),
                    PollMode::Block,
                    1 << 20,
                )
                .unwrap();
                let jpeg = std::fs::read(image()).unwrap();
                c.send(&request(Task::Jpeg, id, 0, &jpeg)).unwrap();
                let reply = c.recv().map(|r| Header::decode(r, 1 << 20).unwrap().0);
                reply.map(|h| (h.kind, h.client_id))
            })
        })
        .collect();
    // One worker at ~0.1 s per ResNet-50 image: two of the three are still queued now.
    std::thread::sleep(Duration::from_millis(150));
    let out = server.stop().join("\n");
    for (id, t) in threads.into_iter().enumerate() {
        let got = t.join().unwrap();
        assert_eq!(
            got.ok(),
            Some((MessageKind::Response, id as u32)),
            "client {id}: {out}"
        );
    }
    assert!(out.contains("received 3 answered 3"), "{out}");
}
