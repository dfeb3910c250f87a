//! zmq_server with the GPU backend end to end (GPU machine only; skipped with the reason
//! elsewhere): nvJPEG + the preprocessing kernel in the server pipeline, CPU decode, FP32,
//! `--streams` with priority clients on a high-priority stream; answers agree with the CPU
//! backend, a bad JPEG gets a typed error and the server keeps serving.

mod common;

use common::*;
use hacserve_runtime::engine::cudnn;
use hacserve_runtime::protocol::*;
use hacserve_runtime::transport::zmq::ZmqClient;

fn gpu_or_skip() -> bool {
    if let Err(e) = cudnn::available() {
        eprintln!("SKIPPED GPU server test: {e}");
        return false;
    }
    true
}

/// `zmq_server --backend gpu --check`: exit 0 listing GPU 0 and the library versions where
/// the GPU backend can run; elsewhere exit 1 naming the missing driver, never a panic.
#[test]
fn gpu_check_reports_what_was_found() {
    let (code, stdout, stderr) = run_check(env!("CARGO_BIN_EXE_zmq_server"), &["--backend", "gpu"]);
    assert!(!stderr.contains("panicked"), "{stderr}");
    for part in ["CUDA driver", "cuDNN", "cuBLAS", "NVRTC", "nvJPEG"] {
        assert!(stdout.contains(part), "{part} not reported: {stdout}");
    }
    if cudnn::available().is_ok() {
        assert_eq!(code, Some(0), "{stderr}");
        assert!(stdout.contains("ok      GPU 0"), "{stdout}");
        assert!(stdout.contains("zmq_server can run here"), "{stdout}");
    } else {
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains("zmq_server cannot run here: "), "{stderr}");
        assert!(stdout.contains("MISSING"), "{stdout}");
    }
}

fn request(task: Task, id: u64, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut header = Header::request(task, 7, id, payload.len());
    header.flags = flags;
    let mut h = [0u8; HEADER_LEN];
    header.encode(&mut h);
    let mut m = h.to_vec();
    m.extend_from_slice(payload);
    m
}

fn answer(c: &mut ZmqClient, msg: &[u8]) -> ResponseBody {
    let (h, body) = round_trip(c, msg);
    assert_eq!(
        h.kind,
        MessageKind::Response,
        "error reply: {:?}",
        decode_error(&body)
    );
    ResponseBody::decode(&body).unwrap()
}

#[test]
fn gpu_backend_answers_like_the_cpu_backend() {
    if !gpu_or_skip() {
        return;
    }
    let model = model("resnet50");
    let want = cpu_top5(&model);
    let jpeg = std::fs::read(image()).unwrap();
    let tensor = hacserve_runtime::client::prepare_payload(Task::Processed, &jpeg, None).unwrap();
    let raw = hacserve_runtime::client::prepare_payload(Task::Raw, &jpeg, None).unwrap();
    for (label, extra, exact_top5) in [
        ("fp16, nvJPEG", vec!["--backend", "gpu"], false),
        (
            "fp32, CPU decode",
            vec!["--backend", "gpu", "--precision", "fp32", "--decode", "cpu"],
            true,
        ),
        (
            "fp16, nvJPEG, 2 streams, priority clients",
            vec![
                "--backend",
                "gpu",
                "--streams",
                "2",
                "--priority-clients",
                "1",
            ],
            false,
        ),
    ] {
        let server = zmq_server(&model, &extra);
        let mut c = zmq_connect(server.port);
        let by_jpeg = answer(&mut c, &request(Task::Jpeg, 1, 0, &jpeg));
        let by_tensor = answer(&mut c, &request(Task::Processed, 2, 0, &tensor));
        let by_raw = answer(&mut c, &request(Task::Raw, 8, 0, &raw));
        let priority = answer(&mut c, &request(Task::Jpeg, 3, FLAG_PRIORITY, &jpeg));
        let ping = answer(&mut c, &request(Task::Ping, 9, 0, &[]));
        assert_eq!(ping.top_k, 0, "{label}: ping");
        println!(
            "{label}: top-5 by JPEG {:?} by tensor {:?} by raw {:?} priority {:?} (CPU backend {want:?}); \
             stages decode {} us preprocess {} us infer {} us",
            by_jpeg.classes,
            by_tensor.classes,
            by_raw.classes,
            priority.classes,
            (by_jpeg.timestamps.decoded - by_jpeg.timestamps.started) / 1000,
            (by_jpeg.timestamps.preprocessed - by_jpeg.timestamps.decoded) / 1000,
            (by_jpeg.timestamps.inferred - by_jpeg.timestamps.preprocessed) / 1000,
        );
        for got in [&by_jpeg, &by_tensor, &by_raw, &priority] {
            assert_eq!(got.top_k, 5, "{label}");
            assert_eq!(
                got.classes[0], want[0],
                "{label}: top-1 differs from the CPU"
            );
            if exact_top5 {
                assert_eq!(got.classes, want, "{label}: top-5 differs from the CPU");
            }
        }
        let ts = by_jpeg.timestamps;
        assert!(
            ts.started <= ts.decoded
                && ts.decoded < ts.preprocessed
                && ts.preprocessed < ts.inferred,
            "{label}: stages out of order {ts:?}"
        );
        // Preprocess only: no top-5, stages stamped.
        let pre = answer(&mut c, &request(Task::Preprocess, 4, 0, &jpeg));
        assert_eq!(pre.top_k, 0);
        assert!(pre.timestamps.preprocessed > pre.timestamps.decoded);
        // A truncated JPEG is the sender's error; the next request is still served.
        let (h, body) = round_trip(&mut c, &request(Task::Jpeg, 5, 0, &jpeg[..jpeg.len() / 3]));
        assert_eq!(
            h.kind,
            MessageKind::Error,
            "{label}: truncated JPEG accepted"
        );
        let (code, text) = decode_error(&body).unwrap();
        assert_eq!(
            ErrorCode::from_u32(code),
            Some(ErrorCode::BadImage),
            "{text}"
        );
        let garbage = answer_or_error(&mut c, &request(Task::Jpeg, 6, 0, &[0x42u8; 4096]));
        assert_eq!(garbage, Some(ErrorCode::BadImage), "{label}: garbage JPEG");
        let again = answer(&mut c, &request(Task::Jpeg, 7, 0, &jpeg));
        assert_eq!(again.classes, by_jpeg.classes, "{label}: after bad input");
        let lines = server.stop();
        let banner = lines
            .iter()
            .find(|l| l.contains("listening on"))
            .cloned()
            .unwrap_or_default();
        println!("{label}: {banner}");
        assert!(banner.contains("cudnn-gpu"), "{banner}");
    }
}

/// The error code of an error reply, None for a response.
fn answer_or_error(c: &mut ZmqClient, msg: &[u8]) -> Option<ErrorCode> {
    let (h, body) = round_trip(c, msg);
    match h.kind {
        MessageKind::Error => decode_error(&body)
            .ok()
            .and_then(|(code, _)| ErrorCode::from_u32(code)),
        _ => None,
    }
}

/// Dynamic batching: 8 clients at once against one worker (`--max-batch 8`), so requests
/// queue up and are taken together; every answer equals the lone-request answer, replies of
/// one batch share their `inferred` stamp (the proof that batches formed), and a bad JPEG
/// in the mix is rejected alone. Both with `--overlap-batches on` (the next batch staged
/// while the last one runs) and off.
#[test]
fn concurrent_jpegs_run_as_batches_with_the_same_answers() {
    if !gpu_or_skip() {
        return;
    }
    let model = model("resnet50");
    for overlap in ["on", "off"] {
        println!("--overlap-batches {overlap}:");
        concurrent_jpegs_on_one_worker(&model, overlap);
    }
}

fn concurrent_jpegs_on_one_worker(model: &std::path::Path, overlap: &str) {
    let jpeg = std::fs::read(image()).unwrap();
    let server = zmq_server(
        model,
        &[
            "--backend",
            "gpu",
            "--max-batch",
            "8",
            "--workers",
            "1",
            "--overlap-batches",
            overlap,
        ],
    );
    let port = server.port;
    let lone = {
        let mut c = zmq_connect(port);
        answer(&mut c, &request(Task::Jpeg, 1, 0, &jpeg))
    };
    let clients: Vec<_> = (0..8u64)
        .map(|client| {
            let jpeg = jpeg.clone();
            std::thread::spawn(move || {
                let mut c = zmq_connect(port);
                let mut got = Vec::new();
                for r in 0..40u64 {
                    let id = client * 1000 + r;
                    // Client 7 sends a truncated JPEG every 10th request.
                    if client == 7 && r % 10 == 0 {
                        let code = answer_or_error(
                            &mut c,
                            &request(Task::Jpeg, id, 0, &jpeg[..jpeg.len() / 2]),
                        );
                        assert_eq!(code, Some(ErrorCode::BadImage), "request {id}");
                        continue;
                    }
                    got.push(answer(&mut c, &request(Task::Jpeg, id, 0, &jpeg)));
                }
                got
            })
        })
        .collect();
    let mut inferred = std::collections::HashMap::new();
    let mut answers = 0;
    for c in clients {
        for body in c.join().unwrap() {
            assert_eq!(
                body.classes[0], lone.classes[0],
                "top-1 differs inside a batch"
            );
            for (a, b) in body.scores.iter().zip(&lone.scores) {
                assert!(
                    (a - b).abs() < 2e-3,
                    "scores {:?} vs {:?}",
                    body.scores,
                    lone.scores
                );
            }
            *inferred.entry(body.timestamps.inferred).or_insert(0usize) += 1;
            answers += 1;
        }
    }
    let largest = inferred.values().copied().max().unwrap_or(0);
    let batched = inferred.values().filter(|&&n| n > 1).sum::<usize>();
    println!(
        "{answers} answers in {} runs: {batched} answered in batches, largest batch {largest}",
        inferred.len()
    );
    assert_eq!(answers, 8 * 40 - 4);
    assert!(largest > 1, "no two requests ran in one batch");
    assert!(largest <= 8, "a batch above --max-batch");
    let lines = server.stop();
    let banner = if overlap == "on" {
        "dynamic batch up to 8, overlapped"
    } else {
        "dynamic batch up to 8"
    };
    assert!(lines.iter().any(|l| l.contains(banner)), "{lines:#?}");
    // Every request received was answered or rejected once: 1 lone + 8 x 40.
    let counters = lines
        .iter()
        .find(|l| l.contains("received") && l.contains("answered"))
        .unwrap_or_else(|| panic!("no counters line: {lines:#?}"));
    assert!(
        counters.contains("received 321 answered 317 rejected 4 "),
        "{counters}"
    );
}

/// What a server made of one image: the top-5 of a response, or the error code.
fn verdict(c: &mut ZmqClient, id: u64, jpeg: &[u8]) -> Result<[u32; 5], Option<ErrorCode>> {
    let (h, body) = round_trip(c, &request(Task::Jpeg, id, 0, jpeg));
    match h.kind {
        MessageKind::Response => Ok(ResponseBody::decode(&body).unwrap().classes),
        _ => Err(decode_error(&body)
            .ok()
            .and_then(|(code, _)| ErrorCode::from_u32(code))),
    }
}

#[test]
fn a_jpeg_corpus_gets_the_same_answer_from_both_backends() {
    if !gpu_or_skip() {
        return;
    }
    // CMYK, grayscale, progressive, 4:4:4, a large 4:2:2 (tests/fixtures/jpeg_corpus, made
    // with Pillow from the test photo), plus the photo and bytes that are no JPEG at all.
    let dir = repo().join("tests/fixtures/jpeg_corpus");
    let mut corpus: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    corpus.sort();
    assert!(corpus.len() >= 5, "corpus incomplete: {corpus:?}");
    corpus.push(("grace_hopper.jpg".into(), std::fs::read(image()).unwrap()));
    corpus.push(("garbage".into(), vec![0x42u8; 4096]));
    let model = model("resnet50");
    let cpu = zmq_server(&model, &[]);
    let gpu = zmq_server(&model, &["--backend", "gpu"]);
    let (mut to_cpu, mut to_gpu) = (zmq_connect(cpu.port), zmq_connect(gpu.port));
    for (i, (name, jpeg)) in corpus.iter().enumerate() {
        let on_cpu = verdict(&mut to_cpu, i as u64, jpeg);
        let on_gpu = verdict(&mut to_gpu, i as u64, jpeg);
        println!("{name}: cpu {on_cpu:?} gpu {on_gpu:?}");
        same_answer(name, &on_gpu, &on_cpu);
    }
    // The batched path takes the same images at once: refused ones are answered alone.
    let batch_gpu = zmq_server(&model, &["--backend", "gpu", "--workers", "1"]);
    let port = batch_gpu.port;
    let threads: Vec<_> = corpus
        .clone()
        .into_iter()
        .enumerate()
        .map(|(i, (name, jpeg))| {
            std::thread::spawn(move || {
                let mut c = zmq_connect(port);
                (name, verdict(&mut c, 100 + i as u64, &jpeg))
            })
        })
        .collect();
    for (t, (_, jpeg)) in threads.into_iter().zip(&corpus) {
        let (name, got) = t.join().unwrap();
        let want = verdict(&mut to_cpu, 0, jpeg);
        same_answer(&name, &got, &want);
    }
    drop((cpu, gpu, batch_gpu));
}

/// The same answer: the same error, or responses whose top-1 each stands in the other's
/// top-5 (nvJPEG and the CPU decoder differ by a few levels per pixel, FP16 by rounding); an
/// image the GPU decoder refused was decoded on the CPU, so its top-1 must be the same.
fn same_answer(
    name: &str,
    gpu: &Result<[u32; 5], Option<ErrorCode>>,
    cpu: &Result<[u32; 5], Option<ErrorCode>>,
) {
    match (gpu, cpu) {
        (Ok(g), Ok(c)) => {
            assert!(
                c.contains(&g[0]) && g.contains(&c[0]),
                "{name}: gpu {g:?} cpu {c:?}"
            );
            if name.contains("cmyk") {
                assert_eq!(
                    g[0], c[0],
                    "{name}: decoded on the CPU by both, top-1 must agree"
                );
            }
        }
        _ => assert_eq!(gpu, cpu, "{name}: the backends answer differently"),
    }
}

/// A request as a worker gets it: the message and its validated header.
struct InProcessJob(Vec<u8>);

impl hacserve_runtime::contract::ServerJob for InProcessJob {
    fn message(&self) -> &[u8] {
        &self.0
    }
    fn received_ns(&self) -> u64 {
        0
    }
}

fn queued(task: Task, id: u64, payload: &[u8]) -> hacserve_runtime::contract::Queued<InProcessJob> {
    let msg = request(task, id, 0, payload);
    let (header, _) = Header::decode(&msg, usize::MAX).unwrap();
    hacserve_runtime::contract::Queued {
        job: InProcessJob(msg),
        header: Some(header),
    }
}

/// Whether the NVJPG engines decoded any image between the two counts; where they did not,
/// the GPU must be one without them (said loudly: the hardware part of the test is skipped).
fn hardware_decoded_or_skip(
    before: &hacserve_runtime::engine::DecodeCounts,
    after: &hacserve_runtime::engine::DecodeCounts,
) -> bool {
    if after.hardware > before.hardware {
        return true;
    }
    let gpu = hacserve_ffi::gpu::cuda::driver(0)
        .ok()
        .and_then(|c| c.name().ok())
        .unwrap_or_default();
    let has_nvjpg = ["A100", "H100", "H200", "A30"]
        .iter()
        .any(|g| gpu.contains(g));
    assert!(
        !has_nvjpg,
        "{gpu} has NVJPG engines but no image of the batch went to them"
    );
    eprintln!("SKIPPED hardware part: {gpu} decoded the batch without nvJPEG's hardware backend");
    false
}

/// Two answers to one request (`what` names it) agree: the same top-5, scores within the
/// FP16 tolerance between a batched and a single run.
fn assert_same_answer(what: &str, got: &ResponseBody, want: &ResponseBody) {
    assert_eq!(got.classes, want.classes, "{what}: top-5");
    for (a, b) in got.scores.iter().zip(&want.scores) {
        assert!(
            (a - b).abs() < 2e-3,
            "{what}: scores {:?} vs {:?}",
            got.scores,
            want.scores
        );
    }
}

/// One worker's pipeline over a ResNet-50 GPU session (fp16, GPU decode), as zmq_server's
/// workers get it.
fn worker_pipeline(
    max_batch: usize,
    overlap_batches: bool,
) -> hacserve_runtime::pipeline::Pipeline {
    use hacserve_runtime::engine::registry::BackendChoice;
    use hacserve_runtime::engine::BackendArgs;
    use hacserve_runtime::pipeline::{Pipeline, MAX_IMAGE_PIXELS};
    let args = BackendArgs {
        backend: "gpu",
        precision: "fp16",
        gpus: "0",
        decode: "gpu",
        threads: 1,
        workers: 1,
        streams: 0,
        max_batch,
        preferred_batch_sizes: "auto",
        overlap_batches,
    };
    let backend = BackendChoice::parse(&args).unwrap();
    let session = backend
        .sessions(&model("resnet50"), false)
        .unwrap()
        .pop()
        .unwrap();
    Pipeline::new(session, 64 << 20, MAX_IMAGE_PIXELS)
}

#[test]
fn gpu_decode_buffers_shrink_back_after_an_outsized_image() {
    use hacserve_ffi::gpu::cuda::cu;
    use hacserve_runtime::pipeline::{Outcome, Pipeline};
    use hacserve_runtime::preprocess::STEADY_IMAGE_PIXELS;
    if !gpu_or_skip() {
        return;
    }
    // One worker's pipeline over a GPU session, driven as worker_loop drives it: handle,
    // (reply), release_growth.
    let mut pipeline = worker_pipeline(1, false);
    let jpeg = std::fs::read(image()).unwrap();
    let huge = generated_jpeg(8192, 8192, true);
    let infer = |pipeline: &mut Pipeline, id: u64, jpeg: &[u8]| {
        let mut out = Vec::new();
        let outcome = pipeline.handle(&queued(Task::Jpeg, id, jpeg), &mut out);
        assert!(
            matches!(outcome, Outcome::Answered { .. }),
            "request {id}: {outcome:?}: {}",
            pipeline.last_error()
        );
        pipeline.release_growth();
        let (h, body) = Header::decode(&out, usize::MAX).unwrap();
        assert_eq!(h.kind, MessageKind::Response);
        ResponseBody::decode(body).unwrap().classes
    };
    let want = infer(&mut pipeline, 0, &jpeg);
    let steady = pipeline.decode_buffer_bytes().1;
    assert_eq!(steady, 3 * STEADY_IMAGE_PIXELS);
    let free_before = cu::result::mem_get_info().unwrap().0;

    // The outsized image: decoded on the GPU into a buffer of its size ...
    let mut out = Vec::new();
    let outcome = pipeline.handle(&queued(Task::Jpeg, 1, &huge), &mut out);
    assert!(
        matches!(outcome, Outcome::Answered { .. }),
        "{outcome:?}: {}",
        pipeline.last_error()
    );
    let grown = pipeline.decode_buffer_bytes().1;
    let free_during = cu::result::mem_get_info().unwrap().0;
    // ... which goes back once its request is done, with nvJPEG's own buffers.
    pipeline.release_growth();
    let released = pipeline.decode_buffer_bytes().1;
    let free_after = cu::result::mem_get_info().unwrap().0;
    println!(
        "GPU decode buffer {steady} B -> {grown} B for 8192x8192 -> {released} B after; device free {} -> {} -> {} MiB",
        free_before >> 20,
        free_during >> 20,
        free_after >> 20
    );
    assert_eq!(grown, 3 * 8192 * 8192);
    assert_eq!(released, steady);
    assert!(
        free_after + (32 << 20) >= free_before,
        "device memory not given back: {} MiB free before, {} MiB after",
        free_before >> 20,
        free_after >> 20
    );
    // Ordinary images still get the same answer, and the buffer stays at its steady size.
    for id in 2..5 {
        assert_eq!(infer(&mut pipeline, id, &jpeg), want);
        assert_eq!(pipeline.decode_buffer_bytes().1, steady);
    }
}

#[test]
fn gpu_server_refuses_an_image_over_the_limit_and_releases_an_allowed_outsized_one() {
    if !gpu_or_skip() {
        return;
    }
    let model = model("resnet50");
    let jpeg = std::fs::read(image()).unwrap();
    let huge = generated_jpeg(8192, 8192, true);
    // The default limit (24 MP): refused from the header, the same answer as the CPU backend.
    let server = zmq_server(&model, &["--backend", "gpu"]);
    let mut c = zmq_connect(server.port);
    assert_eq!(
        answer_or_error(&mut c, &request(Task::Jpeg, 1, 0, &huge)),
        Some(ErrorCode::PayloadTooLarge)
    );
    answer(&mut c, &request(Task::Jpeg, 2, 0, &jpeg));
    drop(server);
    // Allowed: decoded, answered, and the device buffer goes back after the reply.
    let server = zmq_server(
        &model,
        &["--backend", "gpu", "--max-image-pixels", "67108864"],
    );
    let mut c = zmq_connect(server.port);
    answer(&mut c, &request(Task::Jpeg, 3, 0, &huge));
    let want = answer(&mut c, &request(Task::Jpeg, 4, 0, &jpeg)).classes;
    assert_eq!(
        answer(&mut c, &request(Task::Jpeg, 5, 0, &jpeg)).classes,
        want
    );
    let out = server
        .stop_within(std::time::Duration::from_secs(30))
        .join("\n");
    assert!(
        out.contains("GPU decode buffer grows to 201326592 B"),
        "{out}"
    );
    assert!(out.contains("GPU decode buffer back to"), "{out}");
}

/// The original's tasks through the clients, on the GPU backend: `zmq_client -t 0|1|2|3`
/// (ping, raw, processed, mixture) against `zmq_server --backend gpu`, every request answered.
#[test]
fn the_originals_tasks_run_on_the_gpu_backend() {
    if !gpu_or_skip() {
        return;
    }
    let model = model("resnet50");
    let server = zmq_server(&model, &["--backend", "gpu"]);
    let port = server.port.to_string();
    for (task, name) in [
        ("0", "ping"),
        ("1", "raw"),
        ("2", "processed"),
        ("3", "mixture"),
    ] {
        let (ok, out) = run(
            env!("CARGO_BIN_EXE_zmq_client"),
            &[
                "--host",
                "127.0.0.1",
                "--port",
                &port,
                "-t",
                task,
                "-r",
                "9",
            ],
        );
        println!("{out}");
        assert!(ok, "-t {task}: {out}");
        assert!(out.contains(&format!("task {name} (")), "-t {task}: {out}");
        assert!(out.contains("9 requests, 0 errors"), "-t {task}: {out}");
    }
    server.stop();
}

/// One worker's batch of JPEG requests on nvJPEG's hardware backend (batched API) with one
/// image it refuses inside (progressive: the NVJPG engines take baseline only, so the hybrid
/// backend decodes it), one no decoder takes (truncated: BadImage from the CPU decoder's
/// verdict) and one request that is not a JPEG inference: every request gets the answer it
/// gets alone on the same server, and the baseline ones went through the hardware in one call.
#[test]
fn a_mixed_batch_on_the_hardware_decoder_answers_each_request_as_alone() {
    use hacserve_runtime::pipeline::Outcome;
    if !gpu_or_skip() {
        return;
    }
    let photo = std::fs::read(image()).unwrap();
    let progressive = generated_jpeg(640, 480, true);
    let baseline = generated_jpeg(1920, 1080, false);
    let truncated = photo[..photo.len() / 2].to_vec();
    let jobs = vec![
        queued(Task::Jpeg, 0, &photo),
        queued(Task::Jpeg, 1, &progressive),
        queued(Task::Jpeg, 2, &baseline),
        queued(Task::Jpeg, 3, &truncated),
        queued(Task::Ping, 4, &[]),
        queued(Task::Jpeg, 5, &photo),
    ];
    // What each request gets alone (batch of 1: the single-image path).
    let mut alone = worker_pipeline(1, false);
    let want: Vec<Vec<u8>> = jobs
        .iter()
        .map(|job| {
            let mut out = Vec::new();
            alone.handle(job, &mut out);
            out
        })
        .collect();
    let mut batched = worker_pipeline(8, false);
    let before = batched.decode_counts().unwrap();
    let mut outs = vec![Vec::new(); jobs.len()];
    let mut outcomes = vec![Outcome::Rejected(ErrorCode::Internal); jobs.len()];
    batched.handle_batch(&jobs, &mut outs, &mut outcomes);
    let after = batched.decode_counts().unwrap();
    println!("decode counts: before the batch {before:?}, after {after:?}");
    for (k, (got, want)) in outs.iter().zip(&want).enumerate() {
        let (gh, gb) = Header::decode(got, usize::MAX).unwrap();
        let (wh, wb) = Header::decode(want, usize::MAX).unwrap();
        assert_eq!(
            (gh.kind, gh.request_id),
            (wh.kind, wh.request_id),
            "request {k}"
        );
        match gh.kind {
            MessageKind::Response if jobs[k].header.map(|h| h.task) == Some(Task::Jpeg) => {
                assert_same_answer(
                    &format!("request {k}, batch vs alone"),
                    &ResponseBody::decode(gb).unwrap(),
                    &ResponseBody::decode(wb).unwrap(),
                );
            }
            MessageKind::Error => {
                assert_eq!(
                    decode_error(gb).unwrap().0,
                    decode_error(wb).unwrap().0,
                    "request {k}"
                );
            }
            _ => {}
        }
    }
    assert!(
        matches!(outcomes[3], Outcome::Rejected(ErrorCode::BadImage)),
        "{:?}",
        outcomes[3]
    );
    if !hardware_decoded_or_skip(&before, &after) {
        return;
    }
    // The three baseline images in one hardware call; the progressive one on the hybrid path.
    assert_eq!(after.hardware - before.hardware, 3, "{after:?}");
    assert_eq!(
        after.hardware_batches - before.hardware_batches,
        1,
        "{after:?}"
    );
    assert!(
        after.hybrid > before.hybrid,
        "the progressive JPEG went to the hybrid path: {after:?}"
    );
}

/// A batch of 12 MP photos (the steady decode buffer holds one) is decoded in one hardware
/// call: the buffer grows for the chunk (up to two 12 MP images per NVJPG engine), every
/// request gets the
/// answer it gets alone, the grown buffer is kept while the next batch of large photos needs
/// it and goes back to its steady size after the first batch that does not.
#[test]
fn a_batch_of_12_mp_photos_decodes_in_one_hardware_call() {
    use hacserve_runtime::pipeline::Outcome;
    use hacserve_runtime::preprocess::STEADY_IMAGE_PIXELS;
    if !gpu_or_skip() {
        return;
    }
    let large = generated_jpeg(4000, 3000, false);
    let photo = std::fs::read(image()).unwrap();
    let jobs: Vec<_> = (0..4).map(|id| queued(Task::Jpeg, id, &large)).collect();
    let mut alone = worker_pipeline(1, false);
    let mut want = Vec::new();
    alone.handle(&jobs[0], &mut want);
    let mut batched = worker_pipeline(8, false);
    let steady = batched.decode_buffer_bytes().1;
    assert_eq!(steady, 3 * STEADY_IMAGE_PIXELS);
    let mut outs = vec![Vec::new(); jobs.len()];
    let mut outcomes = vec![Outcome::Rejected(ErrorCode::Internal); jobs.len()];
    let scores = |msg: &[u8]| {
        let (h, body) = Header::decode(msg, usize::MAX).unwrap();
        assert_eq!(h.kind, MessageKind::Response, "{:?}", decode_error(body));
        ResponseBody::decode(body).unwrap()
    };
    let want = scores(&want);
    let mut sizes = Vec::new();
    for round in 0..2 {
        let before = batched.decode_counts().unwrap();
        batched.handle_batch(&jobs, &mut outs, &mut outcomes);
        let after = batched.decode_counts().unwrap();
        batched.release_growth();
        sizes.push(batched.decode_buffer_bytes().1);
        println!(
            "round {round}: decode counts {before:?} -> {after:?}, buffer {} B",
            sizes[round]
        );
        for (k, out) in outs.iter().enumerate() {
            assert!(
                matches!(outcomes[k], Outcome::Answered { .. }),
                "{:?}",
                outcomes[k]
            );
            assert_same_answer(&format!("request {k}, batch vs alone"), &scores(out), &want);
        }
        if !hardware_decoded_or_skip(&before, &after) {
            return;
        }
        assert_eq!(after.hardware - before.hardware, 4, "{after:?}");
        assert_eq!(
            after.hardware_batches - before.hardware_batches,
            1,
            "{after:?}"
        );
    }
    // Four 36 MB places (each but the last rounded up to 256 B), kept across the rounds.
    assert!(
        sizes[0] >= 4 * steady && sizes[0] < 4 * steady + 1024,
        "{sizes:?}"
    );
    assert_eq!(
        sizes[1], sizes[0],
        "the grown buffer was not kept for the second batch"
    );
    let mut out = vec![Vec::new()];
    batched.handle_batch(
        &[queued(Task::Jpeg, 9, &photo)],
        &mut out,
        &mut outcomes[..1],
    );
    batched.release_growth();
    assert_eq!(
        batched.decode_buffer_bytes().1,
        steady,
        "not given back after a small batch"
    );
}

/// `--overlap-batches on`: a worker begins (decodes, preprocesses, launches) its next batch
/// into the second batch set while the run of the last one is still on the GPU, and answers
/// that one after. Driven as worker_loop drives it (begin 0, begin 1, finish 0, begin 0,
/// finish 1, begin 1, finish 0, finish 1), a stream of batches with a truncated JPEG, a
/// progressive one (hybrid path), an image no decoder takes and a ping between the photos gets
/// exactly the replies the same batches get one after the other without overlap: same ids,
/// same error codes, same top-5 and scores.
#[test]
fn overlapped_batches_answer_as_unpipelined_ones_with_a_bad_jpeg_between() {
    use hacserve_runtime::pipeline::Outcome;
    if !gpu_or_skip() {
        return;
    }
    let photo = std::fs::read(image()).unwrap();
    let progressive = generated_jpeg(640, 480, true);
    let baseline = generated_jpeg(1920, 1080, false);
    let truncated = photo[..photo.len() / 2].to_vec();
    let not_a_jpeg = vec![0x5au8; 4096];
    let mut id = 0u64;
    let mut job = |task: Task, payload: &[u8]| {
        id += 1;
        queued(task, id, payload)
    };
    // Batches of 3, 5, 1, 8 and 2 requests: the preferred contexts 4 and 8, the batch of
    // one through a batch set too, and the bad ones in the middle of the stream.
    let batches = [
        vec![
            job(Task::Jpeg, &photo),
            job(Task::Jpeg, &baseline),
            job(Task::Jpeg, &photo),
        ],
        vec![
            job(Task::Jpeg, &photo),
            job(Task::Jpeg, &truncated),
            job(Task::Jpeg, &progressive),
            job(Task::Ping, &[]),
            job(Task::Jpeg, &photo),
        ],
        vec![job(Task::Jpeg, &baseline)],
        (0..8)
            .map(|k| match k {
                4 => job(Task::Jpeg, &not_a_jpeg),
                k if k % 3 == 0 => job(Task::Jpeg, &baseline),
                _ => job(Task::Jpeg, &photo),
            })
            .collect::<Vec<_>>(),
        vec![job(Task::Jpeg, &truncated), job(Task::Jpeg, &photo)],
    ];
    let fresh = |n: usize| {
        (
            vec![Vec::new(); n],
            vec![Outcome::Rejected(ErrorCode::Internal); n],
        )
    };
    // Without overlap: each batch to its end before the next.
    let mut plain = worker_pipeline(8, false);
    assert_eq!(plain.batch_sets(), 1);
    let want: Vec<_> = batches
        .iter()
        .map(|jobs| {
            let (mut outs, mut outcomes) = fresh(jobs.len());
            plain.handle_batch(jobs, &mut outs, &mut outcomes);
            (outs, outcomes)
        })
        .collect();
    drop(plain);
    // With overlap: batch b+1 is begun before batch b is finished.
    let mut overlapped = worker_pipeline(8, true);
    assert_eq!(
        overlapped.batch_sets(),
        2,
        "--overlap-batches on gives two batch sets"
    );
    let mut got: Vec<_> = batches.iter().map(|jobs| fresh(jobs.len())).collect();
    let mut in_flight: Option<usize> = None;
    for (b, jobs) in batches.iter().enumerate() {
        let (outs, outcomes) = &mut got[b];
        overlapped.begin_batch(b % 2, jobs, outs, outcomes).unwrap();
        if let Some(prev) = in_flight.replace(b) {
            let (outs, outcomes) = &mut got[prev];
            overlapped.finish_batch(prev % 2, outs, outcomes);
        }
    }
    if let Some(last) = in_flight {
        let (outs, outcomes) = &mut got[last];
        overlapped.finish_batch(last % 2, outs, outcomes);
    }
    let mut compared = 0;
    for (b, ((got_outs, got_outcomes), (want_outs, want_outcomes))) in
        got.iter().zip(&want).enumerate()
    {
        for k in 0..got_outs.len() {
            let what = format!("batch {b} request {k}");
            assert!(!got_outs[k].is_empty(), "{what}: no reply");
            let (gh, gb) = Header::decode(&got_outs[k], usize::MAX).unwrap();
            let (wh, wb) = Header::decode(&want_outs[k], usize::MAX).unwrap();
            assert_eq!(
                (gh.kind, gh.request_id, got_outcomes[k]),
                (wh.kind, wh.request_id, want_outcomes[k]),
                "{what}"
            );
            assert_eq!(gh.request_id, batches[b][k].header.unwrap().request_id);
            match gh.kind {
                MessageKind::Response
                    if batches[b][k].header.map(|h| h.task) == Some(Task::Jpeg) =>
                {
                    assert_same_answer(
                        &what,
                        &ResponseBody::decode(gb).unwrap(),
                        &ResponseBody::decode(wb).unwrap(),
                    );
                    compared += 1;
                }
                MessageKind::Error => {
                    assert_eq!(
                        decode_error(gb).unwrap().0,
                        decode_error(wb).unwrap().0,
                        "{what}"
                    );
                }
                _ => {}
            }
        }
    }
    // The bad ones: the truncated photos and the bytes no decoder reads.
    for (b, k) in [(1, 1), (3, 4), (4, 0)] {
        assert!(
            matches!(got[b].1[k], Outcome::Rejected(ErrorCode::BadImage)),
            "batch {b} request {k}: {:?}",
            got[b].1[k]
        );
    }
    println!("{compared} JPEG answers of overlapped batches equal the unpipelined ones");
    assert_eq!(compared, 3 + 3 + 1 + 7 + 1);
}
