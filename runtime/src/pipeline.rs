//! One request through the server: validate the header, run the task's stages (decode,
//! preprocess, infer, top-5), write the reply. Owned by one worker; every buffer is allocated
//! once in [`Pipeline::new`] and reused.

use crate::clock::realtime_ns;
use crate::contract::{Queued, ServerJob};
use crate::engine::{DeviceImages, EngineError, InferenceEngine};
use crate::preprocess::{Preprocessor, TENSOR_LEN};
use crate::protocol::{
    encode_error, ErrorCode, Header, MessageKind, ProtocolError, ReplyBuffer, ResponseBody,
    ServerTimestamps, Task, HEADER_LEN, RESPONSE_BODY_LEN, TOP_K,
};

/// What happened to a request; the reply is in the caller's buffer either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Answered { task: Task, top1: Option<u32> },
    Rejected(ErrorCode),
}

pub struct Pipeline {
    pre: Preprocessor,
    engine: Box<dyn InferenceEngine>,
    logits: Vec<f32>,
    max_payload: usize,
    /// Log text of the last rejection (for the server's log line), reused.
    last_error: String,
    /// Dynamic batching (engines whose [`InferenceEngine::max_batch`] > 1): the requests
    /// staged into the batch, their logits, and each request's rejection text.
    pending: Vec<Staged>,
    batch_logits: Vec<f32>,
    batch_errors: Vec<String>,
}

/// A JPEG inference staged into slot `pending[i]` of the batch input.
struct Staged {
    index: usize,
    header: Header,
    ts: ServerTimestamps,
}

pub use crate::preprocess::MAX_IMAGE_PIXELS;

impl Pipeline {
    pub fn new(engine: Box<dyn InferenceEngine>, max_payload: usize) -> Pipeline {
        let classes = engine.num_classes();
        let batch = engine.max_batch().max(1);
        Pipeline {
            pre: Preprocessor::new(MAX_IMAGE_PIXELS),
            engine,
            logits: vec![0.0; classes],
            max_payload,
            last_error: String::with_capacity(256),
            pending: Vec::with_capacity(batch),
            batch_logits: vec![0.0; batch * classes],
            batch_errors: (0..batch).map(|_| String::with_capacity(256)).collect(),
        }
    }

    /// Requests [`Self::handle_batch`] takes at once: the engine's dynamic batch (1 = none).
    pub fn batch_capacity(&self) -> usize {
        self.batch_errors.len()
    }

    /// Why request `i` of the last [`Self::handle_batch`] was rejected (empty if it was not).
    pub fn batch_error(&self, i: usize) -> &str {
        self.batch_errors.get(i).map_or("", String::as_str)
    }

    /// Handles requests that were ready together (at most [`Self::batch_capacity`]): JPEG
    /// inferences are decoded and preprocessed one by one into the slots of the engine's
    /// batch input (on the engine's device where it decodes there, else on the CPU) and run
    /// as one batch; anything else goes through [`Self::handle`]. Reply `i` lands in
    /// `outs[i]`, its outcome in `outcomes[i]`, a rejection's text in
    /// [`Self::batch_error`]`(i)`. A request that fails (bad JPEG) is rejected alone; the
    /// others still run.
    pub fn handle_batch<J: ServerJob>(
        &mut self,
        jobs: &[Queued<J>],
        outs: &mut [Vec<u8>],
        outcomes: &mut [Outcome],
    ) {
        self.pending.clear();
        let classes = self.logits.len();
        let slots = self.engine.max_batch();
        for (i, job) in jobs.iter().enumerate().take(self.batch_errors.len()) {
            let (msg, received) = (job.message(), job.received_ns());
            self.batch_errors[i].clear();
            let slot = self.pending.len();
            let staged = match batchable(job) {
                Some(header) if slot < slots => {
                    let mut ts = ServerTimestamps {
                        received,
                        started: realtime_ns(),
                        ..Default::default()
                    };
                    let payload = &msg[HEADER_LEN..];
                    let staged =
                        stage_slot(&mut self.pre, self.engine.as_mut(), payload, slot, &mut ts);
                    Some((header, ts, staged))
                }
                _ => None,
            };
            match staged {
                Some((header, ts, Ok(true))) => self.pending.push(Staged {
                    index: i,
                    header,
                    ts,
                }),
                Some((header, _, Err((code, text)))) => {
                    outcomes[i] = reject(
                        &header,
                        code,
                        &text,
                        &mut outs[i],
                        &mut self.batch_errors[i],
                    );
                }
                // Not batchable, or refused by the device decoder: on its own.
                None | Some((_, _, Ok(false))) => {
                    outcomes[i] = self.handle(job, &mut outs[i]);
                    self.batch_errors[i].push_str(&self.last_error);
                }
            }
        }
        let n = self.pending.len();
        if n == 0 {
            return;
        }
        let logits = &mut self.batch_logits[..n * classes];
        let ran = self.engine.run_slots(n, logits);
        let inferred = realtime_ns();
        for (k, staged) in self.pending.iter_mut().enumerate() {
            let i = staged.index;
            match &ran {
                Err(e) => {
                    outcomes[i] = reject(
                        &staged.header,
                        ErrorCode::Internal,
                        &e.to_string(),
                        &mut outs[i],
                        &mut self.batch_errors[i],
                    );
                }
                Ok(()) => {
                    let mut body = ResponseBody::default();
                    top_k_softmax(&logits[k * classes..(k + 1) * classes], &mut body);
                    staged.ts.inferred = inferred;
                    body.timestamps = staged.ts;
                    outcomes[i] = write_response(&staged.header, &mut body, &[], &mut outs[i]);
                }
            }
        }
    }

    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// Why the last request was rejected (empty after a success).
    pub fn last_error(&self) -> &str {
        &self.last_error
    }

    /// Handles one request the serving core queued; the reply message (header + body) is
    /// written into `out`. Its header was validated once, in the receive loop; a job queued
    /// without one (forwarded untouched) is validated here.
    pub fn handle<J: ServerJob>(&mut self, job: &Queued<J>, out: &mut Vec<u8>) -> Outcome {
        match job.header {
            Some(header) => self.handle_valid(&header, job.message(), job.received_ns(), out),
            None => self.handle_message(job.message(), job.received_ns(), out),
        }
    }

    /// Handles one whole, not yet validated request message received at `received_ns`.
    pub fn handle_message(&mut self, msg: &[u8], received_ns: u64, out: &mut Vec<u8>) -> Outcome {
        let header = match answer_without_engine(
            msg,
            received_ns,
            self.max_payload,
            out,
            &mut self.last_error,
        ) {
            Triage::Answered(outcome) => return outcome,
            Triage::NeedsWorker(header) => header,
        };
        self.handle_valid(&header, msg, received_ns, out)
    }

    /// Runs the task of a request whose `header` was validated against `msg` (exactly
    /// `payload_len` bytes follow it).
    fn handle_valid(
        &mut self,
        header: &Header,
        msg: &[u8],
        received_ns: u64,
        out: &mut Vec<u8>,
    ) -> Outcome {
        self.last_error.clear();
        let header = *header;
        let started = realtime_ns();
        let payload = &msg[HEADER_LEN..];
        let mut ts = ServerTimestamps {
            received: received_ns,
            started,
            ..Default::default()
        };
        let mut body = ResponseBody::default();
        match header.task {
            // Answered by answer_without_engine; kept for exhaustiveness.
            Task::Echo | Task::Sink => {
                ts.decoded = started;
                ts.preprocessed = started;
                ts.inferred = started;
            }
            Task::Infer | Task::Preprocess => {
                let infer = header.task == Task::Infer;
                let on_device = self
                    .engine
                    .device_images()
                    .map(|device| device_stages(device, payload, infer, &mut ts, &mut self.logits));
                let done = match on_device {
                    Some(DeviceStages::Done(done)) => done,
                    // An image the device decoder cannot take (CMYK, arithmetic coding, ...)
                    // gets the CPU decoder's verdict, so every backend answers alike.
                    Some(DeviceStages::Refused(why)) => {
                        log::debug!(
                            "client {} request {}: device decoder refused the image ({why}); decoding it on the CPU",
                            header.client_id,
                            header.request_id
                        );
                        cpu_stages(
                            &mut self.pre,
                            self.engine.as_mut(),
                            payload,
                            infer,
                            &mut ts,
                            &mut self.logits,
                        )
                    }
                    None => cpu_stages(
                        &mut self.pre,
                        self.engine.as_mut(),
                        payload,
                        infer,
                        &mut ts,
                        &mut self.logits,
                    ),
                };
                if let Err((code, text)) = done {
                    return self.reject(&header, code, &text, out);
                }
                if infer {
                    top_k_softmax(&self.logits, &mut body);
                }
            }
            Task::InferTensor => {
                if let Err((code, text)) = load_tensor(self.engine.as_mut(), payload) {
                    return self.reject(&header, code, &text, out);
                }
                ts.decoded = started;
                ts.preprocessed = realtime_ns();
                if let Err(e) = self.engine.run(&mut self.logits) {
                    return self.reject(&header, ErrorCode::Internal, &e.to_string(), out);
                }
                ts.inferred = realtime_ns();
                top_k_softmax(&self.logits, &mut body);
            }
        }
        body.timestamps = ts;
        write_response(&header, &mut body, payload_if_echo(&header, payload), out)
    }

    fn reject(
        &mut self,
        header: &Header,
        code: ErrorCode,
        text: &str,
        out: &mut Vec<u8>,
    ) -> Outcome {
        reject(header, code, text, out, &mut self.last_error)
    }
}

/// The validated header of a JPEG inference request (what a batch takes); anything else
/// goes through [`Pipeline::handle`].
fn batchable<J>(job: &Queued<J>) -> Option<Header> {
    job.header.filter(|h| h.task == Task::Infer)
}

/// A stage's failure: the error code for the sender and the text for both.
type StageError = (ErrorCode, String);

fn engine_error(e: EngineError) -> StageError {
    match e {
        EngineError::BadInput(text) => (ErrorCode::BadImage, text),
        other => (ErrorCode::Internal, other.to_string()),
    }
}

/// Decode and preprocess on the CPU into the engine's input buffer, then (for Infer) run.
fn cpu_stages(
    pre: &mut Preprocessor,
    engine: &mut dyn InferenceEngine,
    jpeg: &[u8],
    infer: bool,
    ts: &mut ServerTimestamps,
    logits: &mut [f32],
) -> Result<(), StageError> {
    pre.decode(jpeg)
        .map_err(|e| (ErrorCode::BadImage, e.to_string()))?;
    ts.decoded = realtime_ns();
    let input = engine.input_mut().map_err(engine_error)?;
    pre.preprocess(input)
        .map_err(|e| (ErrorCode::BadImage, e.to_string()))?;
    ts.preprocessed = realtime_ns();
    ts.inferred = ts.preprocessed;
    if infer {
        engine.run(logits).map_err(engine_error)?;
        ts.inferred = realtime_ns();
    }
    Ok(())
}

/// What the device stages did with an image.
enum DeviceStages {
    Done(Result<(), StageError>),
    /// The device decoder refused the image (why): the CPU decoder has the last word.
    Refused(String),
}

/// The same stages on the engine's device (nvJPEG and the preprocessing kernel).
fn device_stages(
    device: &mut dyn DeviceImages,
    jpeg: &[u8],
    infer: bool,
    ts: &mut ServerTimestamps,
    logits: &mut [f32],
) -> DeviceStages {
    match device.decode(jpeg) {
        Ok(_) => {}
        Err(EngineError::BadInput(why)) => return DeviceStages::Refused(why),
        Err(e) => return DeviceStages::Done(Err(engine_error(e))),
    }
    DeviceStages::Done(device_rest(device, infer, ts, logits))
}

/// The device stages after a successful decode.
fn device_rest(
    device: &mut dyn DeviceImages,
    infer: bool,
    ts: &mut ServerTimestamps,
    logits: &mut [f32],
) -> Result<(), StageError> {
    ts.decoded = realtime_ns();
    device.preprocess().map_err(engine_error)?;
    ts.preprocessed = realtime_ns();
    ts.inferred = ts.preprocessed;
    if infer {
        device.run_preprocessed(logits).map_err(engine_error)?;
        ts.inferred = realtime_ns();
    }
    Ok(())
}

/// Decode and preprocess of one JPEG into slot `slot` of the engine's batch input: on the
/// engine's device where it decodes there, else on the CPU into the slot's host input.
/// Ok(false): the device decoder refused the image; it is to be handled on its own (where
/// the CPU decoder has the last word) rather than in this batch.
fn stage_slot(
    pre: &mut Preprocessor,
    engine: &mut dyn InferenceEngine,
    jpeg: &[u8],
    slot: usize,
    ts: &mut ServerTimestamps,
) -> Result<bool, StageError> {
    if let Some(device) = engine.device_images() {
        match device.decode(jpeg) {
            Ok(_) => {}
            Err(EngineError::BadInput(_)) => return Ok(false),
            Err(e) => return Err(engine_error(e)),
        }
        ts.decoded = realtime_ns();
        device.preprocess_slot(slot).map_err(engine_error)?;
    } else {
        pre.decode(jpeg)
            .map_err(|e| (ErrorCode::BadImage, e.to_string()))?;
        ts.decoded = realtime_ns();
        let input = engine.slot_input_mut(slot).map_err(engine_error)?;
        pre.preprocess(input)
            .map_err(|e| (ErrorCode::BadImage, e.to_string()))?;
    }
    ts.preprocessed = realtime_ns();
    Ok(true)
}

/// Task 1's payload (1x3x224x224 f32 LE) straight into the engine's input buffer.
fn load_tensor(engine: &mut dyn InferenceEngine, payload: &[u8]) -> Result<(), StageError> {
    if payload.len() != TENSOR_LEN * 4 {
        let text = format!(
            "tensor payload is {} bytes, expected {} (1x3x224x224 f32 LE)",
            payload.len(),
            TENSOR_LEN * 4
        );
        return Err((ErrorCode::BadTensor, text));
    }
    let input = engine.input_mut().map_err(engine_error)?;
    if input.len() != TENSOR_LEN {
        let text = format!(
            "the model takes {} input values, task 1 sends {TENSOR_LEN}",
            input.len()
        );
        return Err((ErrorCode::Internal, text));
    }
    for (dst, src) in input.iter_mut().zip(payload.chunks_exact(4)) {
        *dst = f32::from_le_bytes([src[0], src[1], src[2], src[3]]);
    }
    if let Some(i) = input.iter().position(|v| !v.is_finite()) {
        return Err((
            ErrorCode::BadTensor,
            format!("tensor value {i} is not finite"),
        ));
    }
    Ok(())
}

/// What a request needs: answered already (rejected, or an echo), or a worker with an engine.
pub enum Triage {
    Answered(Outcome),
    NeedsWorker(Header),
}

/// Validation and the engine-free answers, for wherever a message lands first: a transport's
/// receive loop answers errors and echoes itself (no queue hop, as eRPC's dispatch thread
/// does for small requests) and queues only what needs a worker. `error_text` receives the
/// reason of a rejection, for the log.
pub fn answer_without_engine<B: ReplyBuffer + ?Sized>(
    msg: &[u8],
    received_ns: u64,
    max_payload: usize,
    out: &mut B,
    error_text: &mut String,
) -> Triage {
    error_text.clear();
    let (header, payload) = match Header::decode(msg, max_payload) {
        Ok(hp) => hp,
        Err(e) => {
            let (client, request) = Header::salvage_ids(msg);
            let text = e.to_string();
            error_text.push_str(&text);
            encode_error(out, client, request, Task::Echo, e.code(), &text);
            return Triage::Answered(Outcome::Rejected(e.code()));
        }
    };
    if header.kind != MessageKind::Request {
        let e = ProtocolError::BadKind(header.kind as u8);
        return Triage::Answered(reject(&header, e.code(), &e.to_string(), out, error_text));
    }
    if header.model_id != 0 {
        let text = format!(
            "model {} is not served here (only model 0)",
            header.model_id
        );
        return Triage::Answered(reject(
            &header,
            ErrorCode::UnknownModel,
            &text,
            out,
            error_text,
        ));
    }
    if header.task != Task::Echo && header.task != Task::Sink {
        return Triage::NeedsWorker(header);
    }
    let now = realtime_ns();
    let mut body = ResponseBody {
        timestamps: ServerTimestamps {
            received: received_ns,
            started: now,
            decoded: now,
            preprocessed: now,
            inferred: now,
            replied: now,
        },
        ..Default::default()
    };
    // Sink: the payload was received whole and validated; only the body goes back.
    let echo = if header.task == Task::Echo {
        payload
    } else {
        &[]
    };
    Triage::Answered(write_response(&header, &mut body, echo, out))
}

fn payload_if_echo<'a>(header: &Header, payload: &'a [u8]) -> &'a [u8] {
    if header.task == Task::Echo {
        payload
    } else {
        &[]
    }
}

fn reject<B: ReplyBuffer + ?Sized>(
    header: &Header,
    code: ErrorCode,
    text: &str,
    out: &mut B,
    error_text: &mut String,
) -> Outcome {
    error_text.clear();
    error_text.push_str(text);
    encode_error(
        out,
        header.client_id,
        header.request_id,
        header.task,
        code,
        text,
    );
    Outcome::Rejected(code)
}

/// Writes header + body (+ echoed bytes) into `out`, stamping `replied` last.
fn write_response<B: ReplyBuffer + ?Sized>(
    header: &Header,
    body: &mut ResponseBody,
    echo: &[u8],
    out: &mut B,
) -> Outcome {
    body.timestamps.replied = realtime_ns();
    let reply_len = RESPONSE_BODY_LEN + echo.len();
    let out = out.prepare(HEADER_LEN + reply_len);
    let mut h = [0u8; HEADER_LEN];
    header
        .reply(MessageKind::Response, reply_len)
        .encode(&mut h);
    out[..HEADER_LEN].copy_from_slice(&h);
    body.encode(&mut out[HEADER_LEN..]);
    out[HEADER_LEN + RESPONSE_BODY_LEN..].copy_from_slice(echo);
    Outcome::Answered {
        task: header.task,
        top1: (body.top_k > 0).then_some(body.classes[0]),
    }
}

/// Softmax over all logits, top-5 by score, into `body` (no allocation).
pub fn top_k_softmax(logits: &[f32], body: &mut ResponseBody) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    let mut best: [(f32, u32); TOP_K] = [(f32::NEG_INFINITY, 0); TOP_K];
    for (i, &l) in logits.iter().enumerate() {
        if l > best[TOP_K - 1].0 {
            let mut j = TOP_K - 1;
            while j > 0 && best[j - 1].0 < l {
                best[j] = best[j - 1];
                j -= 1;
            }
            best[j] = (l, i as u32);
        }
    }
    let k = TOP_K.min(logits.len());
    body.top_k = k as u32;
    for (slot, (l, class)) in best.iter().take(k).enumerate() {
        body.classes[slot] = *class;
        body.scores[slot] = (l - max).exp() / sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top5_is_sorted_and_softmax_normalised() {
        let logits: Vec<f32> = (0..1000)
            .map(|i| ((i * 37) % 1000) as f32 / 100.0)
            .collect();
        let mut body = ResponseBody::default();
        top_k_softmax(&logits, &mut body);
        let mut idx: Vec<usize> = (0..1000).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let want: Vec<u32> = idx[..5].iter().map(|&i| i as u32).collect();
        assert_eq!(body.classes.to_vec(), want);
        assert!(body.scores.windows(2).all(|w| w[0] >= w[1]));
        let total: f32 = logits.iter().map(|l| (l - 9.99).exp()).sum();
        assert!((body.scores[0] - 1.0 / total).abs() < 1e-6);
    }
}

#[cfg(test)]
mod sink_tests {
    use super::*;

    fn request(task: Task, payload: &[u8]) -> Vec<u8> {
        let mut m = vec![0u8; HEADER_LEN];
        let mut h = [0u8; HEADER_LEN];
        Header::request(task, 7, 42, payload.len()).encode(&mut h);
        m.copy_from_slice(&h);
        m.extend_from_slice(payload);
        m
    }

    fn answer(msg: &[u8], max_payload: usize) -> (Triage, Vec<u8>) {
        let (mut out, mut text) = (Vec::new(), String::new());
        let t = answer_without_engine(msg, 1, max_payload, &mut out, &mut text);
        (t, out)
    }

    #[test]
    fn sink_is_answered_without_the_payload_echo_with_it() {
        let payload: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        for (task, back) in [(Task::Sink, 0), (Task::Echo, payload.len())] {
            let (t, out) = answer(&request(task, &payload), 1 << 20);
            assert!(
                matches!(t, Triage::Answered(Outcome::Answered { task: got, top1: None }) if got == task),
                "{task:?}"
            );
            assert_eq!(out.len(), HEADER_LEN + RESPONSE_BODY_LEN + back, "{task:?}");
            let (h, body) = Header::decode(&out, usize::MAX).unwrap();
            assert_eq!(h.kind, MessageKind::Response);
            assert_eq!((h.task, h.client_id, h.request_id), (task, 7, 42));
            assert_eq!(body.len(), RESPONSE_BODY_LEN + back);
            assert_eq!(&body[RESPONSE_BODY_LEN..], &payload[..back]);
            assert_eq!(ResponseBody::decode(body).unwrap().top_k, 0);
        }
        // Validated like any request: the payload limit and its length still apply.
        let (t, _) = answer(&request(Task::Sink, &payload), 1000);
        assert!(matches!(
            t,
            Triage::Answered(Outcome::Rejected(ErrorCode::PayloadTooLarge))
        ));
        let mut short = request(Task::Sink, &payload);
        short.pop();
        let (t, _) = answer(&short, 1 << 20);
        assert!(matches!(
            t,
            Triage::Answered(Outcome::Rejected(ErrorCode::Truncated))
        ));
    }
}

#[cfg(test)]
mod batch_tests {
    //! Batching through the engine contract alone: an engine with a host input of two slots
    //! and no device images batches CPU-decoded JPEGs.
    use super::*;

    const CLASSES: usize = 10;

    /// Two host slots; logit k of an image is k times its first input value, so the top-1
    /// class is the last one for any image brighter than the mean (and the first otherwise).
    struct TwoSlots {
        slots: [Vec<f32>; 2],
        /// n of every run_slots call, read by the test after the pipeline took the engine.
        batch_runs: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
    }

    impl InferenceEngine for TwoSlots {
        fn name(&self) -> &str {
            "two-slots"
        }
        fn input_shape(&self) -> [usize; 4] {
            [1, 3, 224, 224]
        }
        fn num_classes(&self) -> usize {
            CLASSES
        }
        fn input_mut(&mut self) -> Result<&mut [f32], EngineError> {
            Ok(&mut self.slots[0])
        }
        fn run(&mut self, logits: &mut [f32]) -> Result<(), EngineError> {
            self.run_slots(1, logits)
        }
        fn max_batch(&self) -> usize {
            2
        }
        fn slot_input_mut(&mut self, slot: usize) -> Result<&mut [f32], EngineError> {
            self.slots
                .get_mut(slot)
                .map(Vec::as_mut_slice)
                .ok_or_else(|| EngineError::Run(format!("slot {slot}")))
        }
        fn run_slots(&mut self, n: usize, logits: &mut [f32]) -> Result<(), EngineError> {
            self.batch_runs
                .lock()
                .map_err(|_| EngineError::Run("poisoned".into()))?
                .push(n);
            for (slot, out) in logits.chunks_mut(CLASSES).take(n).enumerate() {
                for (k, l) in out.iter_mut().enumerate() {
                    *l = k as f32 * self.slots[slot][0];
                }
            }
            Ok(())
        }
    }

    struct Job(Vec<u8>);

    impl ServerJob for Job {
        fn message(&self) -> &[u8] {
            &self.0
        }
        fn received_ns(&self) -> u64 {
            1
        }
    }

    /// A request as the serving core queues it: with its validated header.
    fn queued(m: Vec<u8>) -> Queued<Job> {
        let header = Header::decode(&m, usize::MAX).ok().map(|(h, _)| h);
        Queued {
            job: Job(m),
            header,
        }
    }

    fn request(task: Task, request_id: u64, payload: &[u8]) -> Queued<Job> {
        let mut h = [0u8; HEADER_LEN];
        Header::request(task, 7, request_id, payload.len()).encode(&mut h);
        let mut m = h.to_vec();
        m.extend_from_slice(payload);
        queued(m)
    }

    #[test]
    fn cpu_decoded_jpegs_run_as_one_batch() {
        let jpeg = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/grace_hopper.jpg"
        ))
        .unwrap();
        let runs = std::sync::Arc::default();
        let engine = TwoSlots {
            slots: [vec![0.0; TENSOR_LEN], vec![0.0; TENSOR_LEN]],
            batch_runs: std::sync::Arc::clone(&runs),
        };
        let mut pipeline = Pipeline::new(Box::new(engine), 1 << 24);
        assert_eq!(pipeline.batch_capacity(), 2);
        let jobs = [
            request(Task::Infer, 1, &jpeg),
            request(Task::Infer, 2, b"not a jpeg"),
            request(Task::Infer, 3, &jpeg),
        ];
        let mut outs = vec![Vec::new(); 2];
        let mut outcomes = [Outcome::Rejected(ErrorCode::Internal); 2];
        pipeline.handle_batch(&jobs[..2], &mut outs, &mut outcomes);
        // The bad JPEG is rejected alone; the good one still runs (a batch of 1).
        assert!(matches!(
            outcomes[0],
            Outcome::Answered { top1: Some(_), .. }
        ));
        assert_eq!(outcomes[1], Outcome::Rejected(ErrorCode::BadImage));
        assert!(!pipeline.batch_error(1).is_empty());
        let mut outs = vec![Vec::new(); 2];
        let both = [jobs[0].job.0.clone(), jobs[2].job.0.clone()].map(queued);
        pipeline.handle_batch(&both, &mut outs, &mut outcomes);
        assert_eq!(outcomes[0], outcomes[1]);
        // And the same answer as the per-request path.
        let mut single = Vec::new();
        assert_eq!(pipeline.handle(&jobs[0], &mut single), outcomes[0]);
        assert_eq!(*runs.lock().unwrap(), [1, 2, 1]);
        for (out, id) in outs.iter().zip([1, 3]) {
            let (h, _) = Header::decode(out, usize::MAX).unwrap();
            assert_eq!((h.kind, h.request_id), (MessageKind::Response, id));
        }
    }
}

#[cfg(test)]
mod fallback_tests {
    //! An engine whose device decoder refuses every image: the pipeline must answer from the
    //! CPU decoder instead, alone and in a batch, exactly as an engine without device stages.
    use super::*;
    use crate::engine::DeviceImages;

    const CLASSES: usize = 10;

    struct RefusingDevice {
        input: Vec<f32>,
        refused: usize,
    }

    impl InferenceEngine for RefusingDevice {
        fn name(&self) -> &str {
            "refusing-device"
        }
        fn input_shape(&self) -> [usize; 4] {
            [1, 3, 224, 224]
        }
        fn num_classes(&self) -> usize {
            CLASSES
        }
        fn input_mut(&mut self) -> Result<&mut [f32], EngineError> {
            Ok(&mut self.input)
        }
        fn run(&mut self, logits: &mut [f32]) -> Result<(), EngineError> {
            // Top-1 depends on the decoded pixels: the last class for a bright first value.
            for (k, l) in logits.iter_mut().enumerate() {
                *l = k as f32 * self.input[0];
            }
            Ok(())
        }
        fn max_batch(&self) -> usize {
            2
        }
        fn device_images(&mut self) -> Option<&mut dyn DeviceImages> {
            Some(self)
        }
    }

    impl DeviceImages for RefusingDevice {
        fn decode(&mut self, _: &[u8]) -> Result<(usize, usize), EngineError> {
            self.refused += 1;
            Err(EngineError::BadInput(
                "4 components: not an RGB/gray JPEG".into(),
            ))
        }
        fn preprocess(&mut self) -> Result<(), EngineError> {
            Err(EngineError::Run("nothing was decoded".into()))
        }
        fn run_preprocessed(&mut self, _: &mut [f32]) -> Result<(), EngineError> {
            Err(EngineError::Run("nothing was decoded".into()))
        }
        fn preprocess_slot(&mut self, _: usize) -> Result<(), EngineError> {
            Err(EngineError::Run("nothing was decoded".into()))
        }
    }

    struct Job(Vec<u8>);
    impl ServerJob for Job {
        fn message(&self) -> &[u8] {
            &self.0
        }
        fn received_ns(&self) -> u64 {
            1
        }
    }

    fn infer(request_id: u64, jpeg: &[u8]) -> Queued<Job> {
        let mut h = [0u8; HEADER_LEN];
        let header = Header::request(Task::Infer, 3, request_id, jpeg.len());
        header.encode(&mut h);
        let mut m = h.to_vec();
        m.extend_from_slice(jpeg);
        Queued {
            job: Job(m),
            header: Some(header),
        }
    }

    fn top1(reply: &[u8]) -> u32 {
        let (h, body) = Header::decode(reply, usize::MAX).unwrap();
        assert_eq!(
            h.kind,
            MessageKind::Response,
            "{:?}",
            decode_error_text(body)
        );
        ResponseBody::decode(body).unwrap().classes[0]
    }

    fn decode_error_text(body: &[u8]) -> Option<String> {
        crate::protocol::decode_error(body).ok().map(|(_, t)| t)
    }

    #[test]
    fn images_the_device_refuses_are_decoded_on_the_cpu() {
        let jpeg = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/grace_hopper.jpg"
        ))
        .unwrap();
        let engine = RefusingDevice {
            input: vec![0.0; TENSOR_LEN],
            refused: 0,
        };
        let mut pipeline = Pipeline::new(Box::new(engine), 1 << 24);
        let mut alone = Vec::new();
        let outcome = pipeline.handle(&infer(1, &jpeg), &mut alone);
        assert!(matches!(outcome, Outcome::Answered { top1: Some(_), .. }));
        // The CPU decoder's verdict stands for images it refuses too.
        let mut bad = Vec::new();
        let outcome = pipeline.handle(&infer(2, b"\xff\xd8 not a jpeg"), &mut bad);
        assert_eq!(outcome, Outcome::Rejected(ErrorCode::BadImage));
        // In a batch the refused images are answered one by one, with the same answers.
        let jobs = [infer(3, &jpeg), infer(4, &jpeg)];
        let mut outs = vec![Vec::new(); 2];
        let mut outcomes = [Outcome::Rejected(ErrorCode::Internal); 2];
        pipeline.handle_batch(&jobs, &mut outs, &mut outcomes);
        assert_eq!(outcomes[0], outcomes[1]);
        assert_eq!(
            (top1(&outs[0]), top1(&outs[1])),
            (top1(&alone), top1(&alone))
        );
    }
}
