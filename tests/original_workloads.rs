//! The original system's workloads over ZeroMQ on 127.0.0.1: its task numbers (0 ping, 1 raw,
//! 2 processed, 3 mixture) and its README's command lines, with real zmq_server, zmq_balancer
//! and zmq_client processes and the generated tiny ResNet; raw and processed answer exactly
//! as jpeg does on the CPU backend, and `--logits` replies carry the 1000 logits.

mod common;

use common::*;
use hacserve_runtime::client::prepare_payload;
use hacserve_runtime::protocol::*;

/// The bundled image of the original's size (500x546, baseline 4:2:0).
fn original_sized_image() -> Vec<u8> {
    std::fs::read(repo().join("models/grace_hopper_500x546.jpg")).unwrap()
}

fn with_flags(mut msg: Vec<u8>, flags: u32) -> Vec<u8> {
    msg[28..32].copy_from_slice(&flags.to_le_bytes());
    msg
}

#[test]
fn the_originals_command_lines_run_every_task() {
    let model = model("resnet_tiny");
    let server = zmq_server(&model, &["-d"]);
    let port = server.port.to_string();
    // README: `./zmq_client --host 7.7.7.1 -t 0` (and -t 1 -d, as through its proxies), plus
    // the other two original tasks.
    for (task_arg, name, sizes) in [
        ("0", "ping", "(0 B payload)"),
        ("1", "raw", "(819016 B payload)"),
        ("2", "processed", "(602112 B payload)"),
        ("3", "mixture", "(0/819016/602112 B payload)"),
    ] {
        let (ok, out) = run(
            env!("CARGO_BIN_EXE_zmq_client"),
            &[
                "--host",
                "127.0.0.1",
                "--port",
                &port,
                "-t",
                task_arg,
                "-d",
                "-r",
                "6",
            ],
        );
        assert!(ok, "-t {task_arg}: {out}");
        assert!(
            out.contains(&format!("task {name} {sizes}")),
            "-t {task_arg}: {out}"
        );
        assert!(out.contains("6 requests, 0 errors"), "-t {task_arg}: {out}");
    }

    // README: `./zmq_balancer --server-address 7.7.7.1 -d --local-port 4444` and
    // `./zmq_client --host 7.7.7.1 -t 1 -d --port 4444`.
    let balancer = Service::start(
        env!("CARGO_BIN_EXE_zmq_balancer"),
        &[
            "--server-address",
            "127.0.0.1",
            "--server-port",
            &port,
            "-d",
            "--local-port",
            "0",
            "--bind-address",
            "127.0.0.1",
            "--poll-mode",
            "block",
        ],
    );
    let (ok, out) = run(
        env!("CARGO_BIN_EXE_zmq_client"),
        &[
            "--host",
            "127.0.0.1",
            "-t",
            "1",
            "-d",
            "--port",
            &balancer.port.to_string(),
            "-r",
            "3",
        ],
    );
    assert!(ok, "through the balancer: {out}");
    assert!(out.contains("3 requests, 0 errors"), "{out}");
    balancer.stop();
    server.stop();
}

#[test]
fn raw_and_processed_answer_as_jpeg_and_logits_come_back_on_request() {
    let model = model("resnet_tiny");
    let server = zmq_server(&model, &[]);
    let mut c = zmq_connect(server.port);
    let jpeg = original_sized_image();
    let raw = prepare_payload(Task::Raw, &jpeg, None).unwrap();
    assert_eq!(raw.len(), RAW_HEADER_LEN + 500 * 546 * 3);
    let processed = prepare_payload(Task::Processed, &jpeg, None).unwrap();

    let mut answers = Vec::new();
    for (id, (task, payload)) in [
        (Task::Jpeg, &jpeg),
        (Task::Raw, &raw),
        (Task::Processed, &processed),
    ]
    .into_iter()
    .enumerate()
    {
        let (h, body) = round_trip(&mut c, &request_message(task, 1, id as u64, payload));
        assert_eq!((h.kind, h.task), (MessageKind::Response, task), "{task:?}");
        assert_eq!(body.len(), RESPONSE_BODY_LEN, "{task:?}");
        answers.push(ResponseBody::decode(&body).unwrap());
    }
    // The CPU backend decodes jpeg with the decoder the client used for raw and processed:
    // the three tensors, hence the answers, are the same.
    for a in &answers[1..] {
        assert_eq!(a.top_k, 5);
        assert_eq!(a.classes, answers[0].classes);
        assert_eq!(a.scores, answers[0].scores);
    }

    // With the logits flag: the body, then 1000 f32 whose softmax gives the top-5.
    for (id, (task, payload)) in [(Task::Raw, &raw), (Task::Jpeg, &jpeg)]
        .into_iter()
        .enumerate()
    {
        let msg = with_flags(request_message(task, 2, id as u64, payload), FLAG_LOGITS);
        let (h, body) = round_trip(&mut c, &msg);
        assert_eq!(h.kind, MessageKind::Response, "{task:?}");
        assert_eq!(body.len(), RESPONSE_BODY_LEN + LOGITS_LEN, "{task:?}");
        let head = ResponseBody::decode(&body).unwrap();
        let logits: Vec<f32> = body[RESPONSE_BODY_LEN..]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let best = (0..logits.len())
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap();
        assert_eq!(best as u32, head.classes[0], "{task:?}");
        assert_eq!(head.classes, answers[0].classes, "{task:?}");
        let max = logits[best];
        let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
        assert!((1.0 / sum - head.scores[0]).abs() < 1e-5, "{task:?}");
    }
    // A ping asking for logits gets the body alone: it has none.
    let msg = with_flags(request_message(Task::Ping, 2, 9, &[]), FLAG_LOGITS);
    let (h, body) = round_trip(&mut c, &msg);
    assert_eq!(
        (h.kind, body.len()),
        (MessageKind::Response, RESPONSE_BODY_LEN)
    );
    server.stop();
}

#[test]
fn bad_raw_payloads_mixture_on_the_wire_and_old_versions_get_typed_errors() {
    let model = model("resnet_tiny");
    let server = zmq_server(&model, &["--max-image-pixels", "1000000"]);
    let mut c = zmq_connect(server.port);
    let error_of = |c: &mut _, msg: &[u8]| {
        let (h, body) = round_trip(c, msg);
        assert_eq!(h.kind, MessageKind::Error);
        let (code, text) = decode_error(&body).unwrap();
        (ErrorCode::from_u32(code), text)
    };
    let short = RawImage::encode(10, 10, &[0u8; 299]);
    let (code, text) = error_of(&mut c, &request_message(Task::Raw, 3, 1, &short));
    assert_eq!(code, Some(ErrorCode::BadImage), "{text}");
    assert!(text.contains("300") && text.contains("299"), "{text}");
    let (code, _) = error_of(&mut c, &request_message(Task::Raw, 3, 2, &[1, 2, 3]));
    assert_eq!(code, Some(ErrorCode::BadImage));
    // Too many pixels is refused from the 16-byte header, before the bytes are trusted.
    let huge = RawImage::encode(2000, 1000, &[0u8; 64]);
    let (code, text) = error_of(&mut c, &request_message(Task::Raw, 3, 3, &huge));
    assert_eq!(code, Some(ErrorCode::PayloadTooLarge), "{text}");
    assert!(text.contains("--max-image-pixels"), "{text}");

    let mut mixture = request_message(Task::Ping, 3, 4, &[]);
    mixture[7] = MIXTURE_NUMBER;
    let (code, text) = error_of(&mut c, &mixture);
    assert_eq!(code, Some(ErrorCode::BadTask));
    assert!(text.contains("client mode"), "{text}");
    let mut v1 = request_message(Task::Ping, 3, 5, &[]);
    v1[4] = 1;
    let (code, text) = error_of(&mut c, &v1);
    assert_eq!(code, Some(ErrorCode::BadVersion));
    assert!(text.contains("version 1"), "{text}");

    // The server still serves after all of that.
    let (h, _) = round_trip(&mut c, &request_message(Task::Ping, 3, 6, &[]));
    assert_eq!(h.kind, MessageKind::Response);

    // Protocol v1's task names are refused by the clients with the new spelling.
    let (ok, out) = run(
        env!("CARGO_BIN_EXE_zmq_client"),
        &["--host", "127.0.0.1", "-t", "infer"],
    );
    assert!(!ok && out.contains("4|jpeg"), "{out}");
    server.stop();
}
