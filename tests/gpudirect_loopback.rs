//! `rdma_server -a 1`'s GPU-ring path on a GPU machine without an RDMA NIC: requests are put
//! into the server's GPU request ring by device copies that stand in for the NIC's DMA (the
//! loopback ring source), served by the same receive loop, workers and engine code as over
//! verbs, and the replies read from the device reply ring. Checks, per task, that the answer
//! equals the host path's (`-a 0`: the same request from host memory through the pipeline,
//! uploaded by the engine) and how many bytes the server's own code moved between host and
//! device (the counter in ffi/src/gpu/transfer.rs): at most the header and the reply body,
//! none of the payload, for processed (and raw once it exists). Skipped, loudly, without a
//! GPU; HACSERVE_GPU_REQUIRED=1 makes that a failure. One test: the loopback server's stop is
//! the process-wide one.

mod common;

use std::time::Duration;

use hacserve_ffi::gpu::transfer::{moved, Transfers};
use hacserve_runtime::engine::cudnn::{self, CudnnLoader, CudnnOptions, Precision};
use hacserve_runtime::engine::EngineLoader;
use hacserve_runtime::pipeline::{Pipeline, DEFAULT_MAX_IMAGE_PIXELS};
use hacserve_runtime::protocol::*;
use hacserve_runtime::server::gpu_loopback::GpuLoopback;

const SLOT: usize = 1 << 20;
const DEPTH: u32 = 4;
const TIMEOUT: Duration = Duration::from_secs(30);

fn gpu_or_skip() -> bool {
    let missing = match cudnn::available() {
        Err(e) => e.to_string(),
        Ok(()) => match hacserve_ffi::gpu::preprocess::available() {
            Err(e) => e.to_string(),
            Ok(()) => return true,
        },
    };
    if std::env::var("HACSERVE_GPU_REQUIRED").as_deref() == Ok("1") {
        panic!("GPU loopback test: a GPU is required (HACSERVE_GPU_REQUIRED=1) but {missing}");
    }
    eprintln!("SKIPPED GPU-ring loopback test (rdma_server -a 1 without a NIC): {missing}");
    false
}

fn request(task: Task, id: u64, payload: &[u8]) -> Vec<u8> {
    common::request_message(task, 7, id, payload)
}

fn with_flags(task: Task, id: u64, flags: u32, payload: &[u8]) -> Vec<u8> {
    common::request_message_with_flags(task, 7, id, flags, payload)
}

/// What a reply says, timestamps left out: (kind, task, request id, top-k, classes,
/// scores) for an answer, the code and text for an error, the payload for an echo.
#[derive(Debug)]
enum Answer {
    /// top-k, classes, scores, and the logits when asked for.
    Top5(u32, [u32; 5], [f32; 5], Vec<f32>),
    Error(u32, String),
    Bytes(Vec<u8>),
}

fn answer(reply: &[u8]) -> (Header, Answer) {
    let (h, body) = Header::decode(reply, usize::MAX).expect("a valid reply");
    let a = match h.kind {
        MessageKind::Response if !h.task.infers() => {
            Answer::Bytes(body[RESPONSE_BODY_LEN.min(body.len())..].to_vec())
        }
        MessageKind::Response => {
            let b = ResponseBody::decode(body).unwrap();
            let logits = body[RESPONSE_BODY_LEN..]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            Answer::Top5(b.top_k, b.classes, b.scores, logits)
        }
        _ => {
            let (code, text) = decode_error(body).unwrap();
            Answer::Error(code, text)
        }
    };
    (h, a)
}

fn same(label: &str, host: &Answer, gpu: &Answer) {
    match (host, gpu) {
        (Answer::Top5(hk, hc, hs, hl), Answer::Top5(gk, gc, gs, gl)) => {
            assert_eq!((hk, hc), (gk, gc), "{label}: top-5 classes differ");
            // The same input tensor through the same graph: the same logits, bit for bit.
            assert!(hl == gl, "{label}: logits differ");
            for (a, b) in hs.iter().zip(gs) {
                // Softmax on the device: the same order of operations but for the sum's
                // (a tree, not a loop) and expf's last bits.
                assert!(
                    (a - b).abs() <= 1e-4 * a.abs().max(1e-4),
                    "{label}: scores {hs:?} vs {gs:?}"
                );
            }
        }
        (Answer::Error(hc, ht), Answer::Error(gc, gt)) => {
            assert_eq!((hc, ht), (gc, gt), "{label}: errors differ")
        }
        (Answer::Bytes(h), Answer::Bytes(g)) => assert!(h == g, "{label}: echoes differ"),
        _ => panic!("{label}: host answered {host:?}, GPU ring answered {gpu:?}"),
    }
}

#[test]
fn gpu_ring_answers_like_the_host_path_and_keeps_payloads_on_the_gpu() {
    if !gpu_or_skip() {
        return;
    }
    let model = common::model("resnet50");
    let options = CudnnOptions {
        precision: Precision::Fp16,
        cuda_graph: true,
        gpu_decode: true,
        ..Default::default()
    };
    let loader = CudnnLoader::load_with(&model, 0, options).unwrap();
    let pipeline = || Pipeline::new(loader.session().unwrap(), SLOT, DEFAULT_MAX_IMAGE_PIXELS);
    let mut host = pipeline();
    let stream = hacserve_ffi::gpu::cuda::driver(0)
        .unwrap()
        .new_stream()
        .unwrap();
    let server = GpuLoopback::start(vec![pipeline()], &stream, 0, DEPTH, SLOT).unwrap();

    let jpeg = std::fs::read(common::image()).unwrap();
    let tensor = hacserve_runtime::client::prepare_payload(Task::Processed, &jpeg, None).unwrap();
    // The original's workload sizes: a 500x546 image, raw 819 KB.
    let original = std::fs::read(common::repo().join("models/grace_hopper_500x546.jpg")).unwrap();
    let raw = hacserve_runtime::client::prepare_payload(Task::Raw, &original, None).unwrap();
    let mut not_finite = tensor.clone();
    not_finite[4 * 1234..4 * 1235].copy_from_slice(&f32::NAN.to_le_bytes());
    let echo: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
    // (label, request, payload bytes the server may not move)
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("ping", request(Task::Ping, 10, &[]), true),
        ("raw (BGR pixels)", request(Task::Raw, 11, &raw), true),
        (
            "raw, logits",
            with_flags(Task::Raw, 12, FLAG_LOGITS, &raw),
            true,
        ),
        ("raw, short", request(Task::Raw, 13, &raw[..1000]), true),
        (
            "processed, logits",
            with_flags(Task::Processed, 14, FLAG_LOGITS, &tensor),
            true,
        ),
        (
            "processed (tensor)",
            request(Task::Processed, 1, &tensor),
            true,
        ),
        (
            "processed, non-finite",
            request(Task::Processed, 2, &not_finite),
            true,
        ),
        (
            "processed, short",
            request(Task::Processed, 3, &tensor[..1000]),
            true,
        ),
        ("jpeg", request(Task::Jpeg, 4, &jpeg), false),
        ("jpeg, not a JPEG", request(Task::Jpeg, 5, &echo), false),
        ("echo", request(Task::Echo, 6, &echo), false),
        ("sink", request(Task::Sink, 7, &echo), true),
    ];
    let (mut host_out, mut gpu_out) = (Vec::new(), Vec::new());
    let mut table = Vec::new();
    for round in 0..3 {
        for (i, (label, req, payload_stays)) in cases.iter().enumerate() {
            host.handle_message(req, 0, &mut host_out);
            let before = moved();
            server
                .round_trip((i % DEPTH as usize) as u32, req, &mut gpu_out, TIMEOUT)
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            let d: Transfers = moved().since(&before);
            let (hh, host_answer) = answer(&host_out);
            let (gh, gpu_answer) = answer(&gpu_out);
            assert_eq!(
                (hh.kind, hh.task, hh.request_id, hh.payload_len),
                (gh.kind, gh.task, gh.request_id, gh.payload_len),
                "{label}: reply headers differ"
            );
            same(label, &host_answer, &gpu_answer);
            let payload = req.len() - HEADER_LEN;
            if *payload_stays {
                assert!(
                    d.server() <= (HEADER_LEN + RESPONSE_BODY_LEN) as u64,
                    "{label}: the server moved {d:?} for a {payload}-byte payload (at most header + reply body allowed)"
                );
            }
            if round == 2 {
                table.push(format!(
                    "{label:22} payload {payload:7} B | server H2D {:7} B, D2H {:7} B | NIC stand-in H2D {:7} B, D2H {:5} B | {}",
                    d.server_h2d,
                    d.server_d2h,
                    d.nic_h2d,
                    d.nic_d2h,
                    match &gpu_answer {
                        Answer::Top5(_, c, _, l) if l.is_empty() => format!("top-1 {}", c[0]),
                        Answer::Top5(_, c, _, l) => format!("top-1 {}, {} logits", c[0], l.len()),
                        Answer::Error(code, _) => format!("error {code}"),
                        Answer::Bytes(b) => format!("{} B echoed", b.len()),
                    }
                ));
            }
        }
    }
    let summary = server.stop();
    eprintln!("GPU ring (loopback) vs host path, bytes moved per request (last round):");
    for line in &table {
        eprintln!("  {line}");
    }
    eprintln!("server: {summary}");
    assert!(summary.contains("undeliverable 0"), "{summary}");
}
