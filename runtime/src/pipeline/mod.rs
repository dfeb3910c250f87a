//! One request through the server: validate the header, run the task's stages (decode,
//! preprocess, infer, top-5), write the reply. Owned by one worker; every buffer is allocated
//! once in [`Pipeline::new`] and reused.

use crate::clock::realtime_ns;
use hacserve_ffi::gpu::resident::TOP5_BYTES;
use hacserve_ffi::gpu::transfer::Mover;

use crate::contract::{Queued, Resident, ServerJob};
use crate::engine::{DeviceImages, EngineError, InferenceEngine, SlotStage};
use crate::preprocess::{jpeg_dimensions, PreprocessError, Preprocessor, TENSOR_LEN};
use crate::protocol::{
    ErrorCode, Header, RawImage, RawImageError, ResponseBody, ServerTimestamps, Task, FLAG_LOGITS,
    HEADER_LEN, RAW_HEADER_LEN,
};

mod triage;

pub use triage::{answer_without_engine, top_k_softmax, Tail, Triage};
use triage::{logits_if_asked, reject, write_resident_response, write_response};

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
    /// `--max-image-pixels`: checked from the JPEG's frame header before any decoder runs.
    max_image_pixels: usize,
    /// Log text of the last rejection (for the server's log line), reused.
    last_error: String,
    /// Dynamic batching (engines whose [`InferenceEngine::max_batch`] > 1): the requests
    /// staged into the batch, their logits, and each request's rejection text.
    pending: Vec<Staged>,
    batch_logits: Vec<f32>,
    batch_errors: Vec<String>,
    /// A GPU-resident request's header + payload, where a stage needs them on the host (a
    /// JPEG for nvJPEG's CPU-side Huffman decode, or an engine without device input): grows
    /// to the largest such request once, then is reused.
    resident_copy: Vec<u8>,
    /// A device-decoded batch: the JPEGs handed to [`DeviceImages::stage_batch`] (empty
    /// between batches; only its allocation is kept) and what it did with each.
    jpegs: Vec<&'static [u8]>,
    stages: Vec<SlotStage>,
    /// Engines with two batch input sets ([`InferenceEngine::batch_sets`]): the other set's
    /// `pending`, `batch_logits` and `batch_errors` (swapped in with the engine's set by
    /// [`Self::begin_batch`] and [`Self::finish_batch`]), and which set is in the fields.
    spare_set: Option<Box<BatchState>>,
    current_set: usize,
}

/// One batch set's requests in flight (the [`Pipeline`] fields of the same names).
struct BatchState {
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

pub use crate::preprocess::{DEFAULT_MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS};

impl Pipeline {
    /// A worker's pipeline over `engine`: payloads up to `max_payload` bytes, JPEGs up to
    /// `max_image_pixels` (w*h; at most [`MAX_IMAGE_PIXELS`]).
    pub fn new(
        mut engine: Box<dyn InferenceEngine>,
        max_payload: usize,
        max_image_pixels: usize,
    ) -> Pipeline {
        let classes = engine.num_classes();
        let batch = engine.max_batch().max(1);
        let max_image_pixels = max_image_pixels.min(MAX_IMAGE_PIXELS);
        if let Some(device) = engine.device_images() {
            device.limit_image_pixels(max_image_pixels);
        }
        Pipeline {
            pre: Preprocessor::new(max_image_pixels),
            logits: vec![0.0; classes],
            max_payload,
            max_image_pixels,
            last_error: String::with_capacity(256),
            pending: Vec::with_capacity(batch),
            batch_logits: vec![0.0; batch * classes],
            batch_errors: (0..batch).map(|_| String::with_capacity(256)).collect(),
            resident_copy: Vec::new(),
            jpegs: Vec::with_capacity(batch),
            stages: Vec::with_capacity(batch),
            spare_set: (engine.batch_sets() > 1).then(|| {
                Box::new(BatchState {
                    pending: Vec::with_capacity(batch),
                    batch_logits: vec![0.0; batch * classes],
                    batch_errors: (0..batch).map(|_| String::with_capacity(256)).collect(),
                })
            }),
            current_set: 0,
            engine,
        }
    }

    /// Batches that can be in flight at once: 2 where the engine keeps two batch input sets
    /// (`--overlap-batches on`), so [`Self::begin_batch`] of one set may come while the
    /// other's run is on the device; else 1 ([`Self::handle_batch`] only).
    pub fn batch_sets(&self) -> usize {
        1 + usize::from(self.spare_set.is_some())
    }

    /// Makes `set` the one the batch fields and the engine's batch input work on.
    fn use_set(&mut self, set: usize) -> Result<(), EngineError> {
        if set == self.current_set {
            return Ok(());
        }
        let Some(spare) = self.spare_set.as_deref_mut() else {
            return Err(EngineError::Run(format!("batch set {set} of 1")));
        };
        self.engine.select_batch_set(set)?;
        std::mem::swap(&mut self.pending, &mut spare.pending);
        std::mem::swap(&mut self.batch_logits, &mut spare.batch_logits);
        std::mem::swap(&mut self.batch_errors, &mut spare.batch_errors);
        self.current_set = set;
        Ok(())
    }

    /// The first half of [`Self::handle_batch`] on batch set `set`: everything up to the
    /// launch of the batch run, which is left in flight on the device (requests that are
    /// not staged, refused or failed are answered in `outs`/`outcomes` now). The staged ones
    /// are answered by [`Self::finish_batch`] of the same set with the same `outs` and
    /// `outcomes`; in between the other set may be begun and finished. Err: `set` is not one
    /// of [`Self::batch_sets`] (nothing was done).
    pub fn begin_batch<J: ServerJob>(
        &mut self,
        set: usize,
        jobs: &[Queued<J>],
        outs: &mut [Vec<u8>],
        outcomes: &mut [Outcome],
    ) -> Result<(), EngineError> {
        self.use_set(set)?;
        self.stage_jobs(jobs, outs, outcomes);
        Ok(())
    }

    /// Waits for the run [`Self::begin_batch`] launched on `set` and writes its requests'
    /// replies; [`Self::batch_error`] then reads this set's rejections.
    pub fn finish_batch(&mut self, set: usize, outs: &mut [Vec<u8>], outcomes: &mut [Outcome]) {
        match self.use_set(set) {
            Ok(()) => self.finish_pending(outs, outcomes),
            Err(e) => self.reject_pending(&e, outs, outcomes),
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
        self.stage_jobs(jobs, outs, outcomes);
        self.finish_pending(outs, outcomes);
    }

    /// [`Self::handle_batch`] up to the launch of the batch run ([`Self::launch_pending`]).
    fn stage_jobs<J: ServerJob>(
        &mut self,
        jobs: &[Queued<J>],
        outs: &mut [Vec<u8>],
        outcomes: &mut [Outcome],
    ) {
        if self.engine.device_images().is_some() {
            return self.handle_device_batch(jobs, outs, outcomes);
        }
        self.pending.clear();
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
                    let staged = check_image_size(payload, self.max_image_pixels).and_then(|()| {
                        stage_slot(&mut self.pre, self.engine.as_mut(), payload, slot, &mut ts)
                    });
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
        self.launch_pending(outs, outcomes);
    }

    /// [`Self::handle_batch`] on an engine that decodes on its device: the JPEG inferences
    /// go to [`DeviceImages::stage_batch`] together (nvJPEG's hardware backend decodes them
    /// in one call), each lands in the next slot, the batch runs once. What the device
    /// decoders refuse is handled on its own (the CPU decoder has the last word).
    fn handle_device_batch<J: ServerJob>(
        &mut self,
        jobs: &[Queued<J>],
        outs: &mut [Vec<u8>],
        outcomes: &mut [Outcome],
    ) {
        self.pending.clear();
        let slots = self.engine.max_batch();
        let mut jpegs = recycle(std::mem::take(&mut self.jpegs));
        let started = realtime_ns();
        for (i, job) in jobs.iter().enumerate().take(self.batch_errors.len()) {
            self.batch_errors[i].clear();
            match batchable(job) {
                Some(header) if jpegs.len() < slots => {
                    let payload = &job.message()[HEADER_LEN..];
                    if let Err((code, text)) = check_image_size(payload, self.max_image_pixels) {
                        outcomes[i] = reject(
                            &header,
                            code,
                            &text,
                            &mut outs[i],
                            &mut self.batch_errors[i],
                        );
                        continue;
                    }
                    jpegs.push(payload);
                    self.pending.push(Staged {
                        index: i,
                        header,
                        ts: ServerTimestamps {
                            received: job.received_ns(),
                            started,
                            ..Default::default()
                        },
                    });
                }
                _ => {
                    outcomes[i] = self.handle(job, &mut outs[i]);
                    self.batch_errors[i].push_str(&self.last_error);
                }
            }
        }
        let mut stages = std::mem::take(&mut self.stages);
        match self.engine.device_images() {
            Some(device) if !jpegs.is_empty() => device.stage_batch(&jpegs, &mut stages),
            _ => stages.clear(),
        }
        self.jpegs = recycle(jpegs);
        // Keep the staged ones in slot order (stage_batch fills slots 0, 1, ... in the
        // order of the images); answer the others now.
        let mut kept = 0;
        for k in 0..self.pending.len() {
            let i = self.pending[k].index;
            match stages.get(k) {
                Some(SlotStage::Staged {
                    decoded_ns,
                    preprocessed_ns,
                    ..
                }) => {
                    self.pending[k].ts.decoded = *decoded_ns;
                    self.pending[k].ts.preprocessed = *preprocessed_ns;
                    self.pending.swap(kept, k);
                    kept += 1;
                }
                Some(SlotStage::Refused(_)) => {
                    outcomes[i] = self.handle(&jobs[i], &mut outs[i]);
                    self.batch_errors[i].push_str(&self.last_error);
                }
                failed => {
                    let text = match failed {
                        Some(SlotStage::Failed(e)) => e.to_string(),
                        _ => "the device staged no answer for this image".to_string(),
                    };
                    let header = self.pending[k].header;
                    outcomes[i] = reject(
                        &header,
                        ErrorCode::Internal,
                        &text,
                        &mut outs[i],
                        &mut self.batch_errors[i],
                    );
                }
            }
        }
        self.stages = stages;
        self.pending.truncate(kept);
        self.launch_pending(outs, outcomes);
    }

    /// Launches the batch of `pending` (slot k = `pending[k]`) without waiting for it; if
    /// the launch fails, each of its requests is answered with the error now.
    fn launch_pending(&mut self, outs: &mut [Vec<u8>], outcomes: &mut [Outcome]) {
        let n = self.pending.len();
        if n == 0 {
            return;
        }
        if let Err(e) = self.engine.launch_slots(n) {
            self.reject_pending(&e, outs, outcomes);
        }
    }

    /// Every request of `pending` answered `Internal` with `e`; `pending` is emptied.
    fn reject_pending(&mut self, e: &EngineError, outs: &mut [Vec<u8>], outcomes: &mut [Outcome]) {
        let text = e.to_string();
        for staged in self.pending.drain(..) {
            let i = staged.index;
            outcomes[i] = reject(
                &staged.header,
                ErrorCode::Internal,
                &text,
                &mut outs[i],
                &mut self.batch_errors[i],
            );
        }
    }

    /// Waits for the launched batch of `pending` and writes each reply; `pending` is emptied.
    fn finish_pending(&mut self, outs: &mut [Vec<u8>], outcomes: &mut [Outcome]) {
        let classes = self.logits.len();
        let n = self.pending.len();
        if n == 0 {
            return;
        }
        let logits = &mut self.batch_logits[..n * classes];
        if let Err(e) = self.engine.finish_slots(n, logits) {
            return self.reject_pending(&e, outs, outcomes);
        }
        let inferred = realtime_ns();
        for (k, staged) in self.pending.iter_mut().enumerate() {
            let i = staged.index;
            let mut body = ResponseBody::default();
            top_k_softmax(&logits[k * classes..(k + 1) * classes], &mut body);
            staged.ts.inferred = inferred;
            body.timestamps = staged.ts;
            let logits = &logits[k * classes..(k + 1) * classes];
            let tail = logits_if_asked(&staged.header, logits);
            outcomes[i] = write_response(&staged.header, &mut body, tail, &mut outs[i]);
        }
        self.pending.clear();
    }

    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// After a request's reply has gone: gives back what an outsized image made the decode
    /// buffers grow by (host and device), so one large image does not pin memory for the
    /// life of the process. Costs nothing when nothing grew.
    pub fn release_growth(&mut self) {
        self.pre.release_growth();
        if let Some(device) = self.engine.device_images() {
            device.release_growth();
        }
    }

    /// How the engine's device decoder has decoded so far (None: no device decoder).
    pub fn decode_counts(&mut self) -> Option<crate::engine::DecodeCounts> {
        self.engine.device_images()?.decode_counts()
    }

    /// Bytes the decode buffers hold now: (host, device).
    pub fn decode_buffer_bytes(&mut self) -> (usize, usize) {
        let device = self
            .engine
            .device_images()
            .map_or(0, |d| d.decode_buffer_bytes());
        (self.pre.buffer_bytes(), device)
    }

    /// Why the last request was rejected (empty after a success).
    pub fn last_error(&self) -> &str {
        &self.last_error
    }

    /// Handles one request the serving core queued; the reply message (header + body) is
    /// written into `out`. Its header was validated once, in the receive loop; a job queued
    /// without one (forwarded untouched) is validated here.
    pub fn handle<J: ServerJob>(&mut self, job: &Queued<J>, out: &mut Vec<u8>) -> Outcome {
        match (job.header, job.job.resident()) {
            (Some(header), Some(resident)) => {
                self.handle_resident(&header, job.message(), resident, job.received_ns(), out)
            }
            (Some(header), None) => {
                self.handle_valid(&header, job.message(), job.received_ns(), out)
            }
            // Forwarded untouched (a proxy's jobs are never GPU-resident).
            (None, _) => self.handle_message(job.message(), job.received_ns(), out),
        }
    }

    /// A validated request whose payload stayed in GPU memory (`head` holds its header):
    /// processed and JPEG inference run on the device and write the reply's top-5 part into
    /// the device reply slot (`out` gets the host part: header and timestamps); anything
    /// else, or an engine without device input, gets the payload copied to the host and the
    /// host path.
    fn handle_resident(
        &mut self,
        header: &Header,
        head: &[u8],
        resident: Resident<'_>,
        received_ns: u64,
        out: &mut Vec<u8>,
    ) -> Outcome {
        self.last_error.clear();
        let started = realtime_ns();
        let mut ts = ServerTimestamps {
            received: received_ns,
            started,
            ..Default::default()
        };
        // The device part of the reply: the top-5, and the logits when asked (FLAG_LOGITS).
        let logits = header.flags & FLAG_LOGITS != 0;
        let device_len = TOP5_BYTES + if logits { 4 * self.logits.len() } else { 0 };
        let Some(reply) = resident.reply.sub(0, device_len) else {
            let text = format!(
                "the {}-byte device reply slot cannot hold a {device_len}-byte reply",
                resident.reply.len()
            );
            return self.reject(header, ErrorCode::Internal, &text, out);
        };
        match header.task {
            Task::Processed if self.engine.resident_requests().is_some() => {
                if let Err((code, text)) =
                    check_tensor(self.engine.as_mut(), resident.payload.len())
                {
                    return self.reject(header, code, &text, out);
                }
                ts.decoded = started;
                let ran = match self.engine.resident_requests() {
                    Some(device) => device.infer_resident_tensor(resident.payload, reply, logits),
                    None => Err(EngineError::Run("no device input".into())),
                };
                match ran {
                    Ok(()) => {}
                    Err(EngineError::BadInput(text)) => {
                        return self.reject(header, ErrorCode::BadTensor, &text, out)
                    }
                    Err(e) => return self.reject(header, ErrorCode::Internal, &e.to_string(), out),
                }
                ts.preprocessed = realtime_ns();
                ts.inferred = ts.preprocessed;
                return write_resident_response(header, &mut ts, device_len, out);
            }
            Task::Raw if self.engine.resident_requests().is_some() => {
                return self.resident_raw(header, resident, reply, &mut ts, out);
            }
            Task::Jpeg
                if self.engine.resident_requests().is_some()
                    && self.engine.device_images().is_some() =>
            {
                // nvJPEG's default backend parses and Huffman-decodes on the CPU: the
                // compressed bytes (not the pixels) come to the host.
                let mut copy = std::mem::take(&mut self.resident_copy);
                let outcome = match copy_resident(&mut copy, head, &resident) {
                    Err(text) => self.reject(header, ErrorCode::Internal, &text, out),
                    Ok(()) => self.resident_jpeg(header, &copy, reply, &mut ts, out),
                };
                self.resident_copy = copy;
                return outcome;
            }
            _ => {}
        }
        let mut copy = std::mem::take(&mut self.resident_copy);
        let outcome = match copy_resident(&mut copy, head, &resident) {
            Err(text) => self.reject(header, ErrorCode::Internal, &text, out),
            Ok(()) => self.handle_valid(header, &copy, received_ns, out),
        };
        self.resident_copy = copy;
        outcome
    }

    /// Raw inference of a GPU-resident request: only the 16-byte width and height come to
    /// the host; the kernel reads the BGR pixels in the GPU slot, the model runs and the
    /// top-5 (and logits when asked) go into `reply`.
    fn resident_raw(
        &mut self,
        header: &Header,
        resident: Resident<'_>,
        reply: hacserve_ffi::gpu::resident::DeviceSpan<'_>,
        ts: &mut ServerTimestamps,
        out: &mut Vec<u8>,
    ) -> Outcome {
        let mut dims = [0u8; RAW_HEADER_LEN];
        let read = match resident.payload.sub(0, RAW_HEADER_LEN) {
            Some(span) => span
                .copy_to_host(resident.stream, &mut dims, Mover::Server)
                .map_err(|e| {
                    (
                        ErrorCode::Internal,
                        format!("reading the raw image's size: {e}"),
                    )
                }),
            None => Err(raw_error(RawImageError::NoDimensions(
                resident.payload.len(),
            ))),
        };
        // The same checks as the host path's, on the size and the length the header gave.
        let parsed = read.and_then(|()| {
            RawImage::check_dims(&dims, resident.payload.len(), self.max_image_pixels)
                .map_err(raw_error)
        });
        let (width, height) = match parsed {
            Ok(wh) => wh,
            Err((code, text)) => return self.reject(header, code, &text, out),
        };
        let Some(pixels) = resident
            .payload
            .sub(RAW_HEADER_LEN, resident.payload.len() - RAW_HEADER_LEN)
        else {
            return self.reject(
                header,
                ErrorCode::Internal,
                "raw pixels outside the slot",
                out,
            );
        };
        ts.decoded = ts.started;
        let logits = header.flags & FLAG_LOGITS != 0;
        let ran = match self.engine.resident_requests() {
            Some(device) => device
                .preprocess_resident_bgr(width, height, pixels)
                .map(|()| ts.preprocessed = realtime_ns())
                .and_then(|()| device.run_preprocessed_into(reply, logits)),
            None => Err(EngineError::Run("no device input".into())),
        };
        self.resident_answer(header, ran, reply.len(), ts, out)
    }

    /// The reply of a GPU-resident inference that `ran` (its device part, `device_len`
    /// bytes, written into the device reply slot), or its rejection.
    fn resident_answer(
        &mut self,
        header: &Header,
        ran: Result<(), EngineError>,
        device_len: usize,
        ts: &mut ServerTimestamps,
        out: &mut Vec<u8>,
    ) -> Outcome {
        if let Err(e) = ran {
            let (code, text) = engine_error(e);
            return self.reject(header, code, &text, out);
        }
        ts.inferred = realtime_ns();
        write_resident_response(header, ts, device_len, out)
    }

    /// JPEG inference of a GPU-resident request whose bytes `msg` were copied to the host:
    /// decode and preprocess on the device, the model and the top-5 into `reply`. An image
    /// the device decoder refuses gets the host path's verdict (CPU decode, host reply).
    fn resident_jpeg(
        &mut self,
        header: &Header,
        msg: &[u8],
        reply: hacserve_ffi::gpu::resident::DeviceSpan<'_>,
        ts: &mut ServerTimestamps,
        out: &mut Vec<u8>,
    ) -> Outcome {
        let payload = &msg[HEADER_LEN..];
        if let Err((code, text)) = check_image_size(payload, self.max_image_pixels) {
            return self.reject(header, code, &text, out);
        }
        let staged = match self.engine.device_images() {
            Some(device) => device_stages(device, payload, false, ts, &mut self.logits),
            None => DeviceStages::Refused("no device decoder".into()),
        };
        match staged {
            DeviceStages::Done(Ok(())) => {}
            DeviceStages::Done(Err((code, text))) => return self.reject(header, code, &text, out),
            DeviceStages::Refused(_) => return self.handle_valid(header, msg, ts.received, out),
        }
        let logits = header.flags & FLAG_LOGITS != 0;
        let ran = match self.engine.resident_requests() {
            Some(device) => device.run_preprocessed_into(reply, logits),
            None => Err(EngineError::Run("no device input".into())),
        };
        self.resident_answer(header, ran, reply.len(), ts, out)
    }

    /// Handles one whole, not yet validated request message received at `received_ns`.
    pub fn handle_message(&mut self, msg: &[u8], received_ns: u64, out: &mut Vec<u8>) -> Outcome {
        let header = match answer_without_engine(
            msg,
            0,
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
        let stages = match header.task {
            // Answered by answer_without_engine; kept for exhaustiveness.
            Task::Ping | Task::Echo | Task::Sink => {
                ts.decoded = started;
                ts.preprocessed = started;
                ts.inferred = started;
                let echo = if header.task == Task::Echo {
                    payload
                } else {
                    &[]
                };
                body.timestamps = ts;
                return write_response(&header, &mut body, Tail::Echo(echo), out);
            }
            Task::Jpeg | Task::Preprocess => self.jpeg_stages(&header, payload, &mut ts),
            Task::Raw => self.raw_stages(payload, &mut ts),
            Task::Processed => self.processed_stages(payload, &mut ts),
        };
        if let Err((code, text)) = stages {
            return self.reject(&header, code, &text, out);
        }
        body.timestamps = ts;
        if !header.task.infers() {
            return write_response(&header, &mut body, Tail::Echo(&[]), out);
        }
        top_k_softmax(&self.logits, &mut body);
        let tail = logits_if_asked(&header, &self.logits);
        write_response(&header, &mut body, tail, out)
    }

    /// Task jpeg (decode, preprocess, infer) and preprocess (the same without inference):
    /// on the engine's device where it decodes there, else on the CPU.
    fn jpeg_stages(
        &mut self,
        header: &Header,
        payload: &[u8],
        ts: &mut ServerTimestamps,
    ) -> Result<(), StageError> {
        let infer = header.task == Task::Jpeg;
        check_image_size(payload, self.max_image_pixels)?;
        let on_device = self
            .engine
            .device_images()
            .map(|device| device_stages(device, payload, infer, ts, &mut self.logits));
        match on_device {
            Some(DeviceStages::Done(done)) => done,
            other => {
                // An image the device decoder cannot take (CMYK, arithmetic coding, ...)
                // gets the CPU decoder's verdict, so every backend answers alike.
                if let Some(DeviceStages::Refused(why)) = other {
                    log::debug!(
                        "client {} request {}: device decoder refused the image ({why}); decoding it on the CPU",
                        header.client_id,
                        header.request_id
                    );
                }
                cpu_stages(
                    &mut self.pre,
                    self.engine.as_mut(),
                    payload,
                    infer,
                    ts,
                    &mut self.logits,
                )
            }
        }
    }

    /// Task raw: the client decoded the image; resize, crop and normalise its BGR pixels
    /// (on the engine's device where it takes them, else on the CPU), then infer.
    fn raw_stages(&mut self, payload: &[u8], ts: &mut ServerTimestamps) -> Result<(), StageError> {
        let raw = RawImage::parse(payload, self.max_image_pixels).map_err(raw_error)?;
        ts.decoded = ts.started;
        // The device takes the pixels where it can (Ok(false): not this device), and then
        // runs on the input it left there; else the CPU preprocesses into the engine's input.
        if let Some(device) = self.engine.device_images() {
            if device
                .preprocess_bgr(raw.width, raw.height, raw.bgr, None)
                .map_err(engine_error)?
            {
                ts.preprocessed = realtime_ns();
                device
                    .run_preprocessed(&mut self.logits)
                    .map_err(engine_error)?;
                ts.inferred = realtime_ns();
                return Ok(());
            }
        }
        let input = self.engine.input_mut().map_err(engine_error)?;
        self.pre
            .preprocess_bgr(raw.bgr, raw.width, raw.height, input)
            .map_err(preprocess_error)?;
        ts.preprocessed = realtime_ns();
        self.engine.run(&mut self.logits).map_err(engine_error)?;
        ts.inferred = realtime_ns();
        Ok(())
    }

    /// Task processed: the client's tensor straight into the engine's input, then infer.
    fn processed_stages(
        &mut self,
        payload: &[u8],
        ts: &mut ServerTimestamps,
    ) -> Result<(), StageError> {
        check_tensor(self.engine.as_mut(), payload.len())?;
        ts.decoded = ts.started;
        // The bytes straight to the device where the engine converts them there (no host
        // conversion, no staging copy: from a registered RDMA copy ring, a DMA in place).
        let ran = match self.engine.run_tensor_bytes(payload, &mut self.logits) {
            Ok(ran) => ran,
            Err(EngineError::BadInput(text)) => return Err((ErrorCode::BadTensor, text)),
            Err(e) => return Err(engine_error(e)),
        };
        if ran {
            // Upload, conversion and the model ran as one: the stage times share the mark.
            ts.preprocessed = ts.started;
            ts.inferred = realtime_ns();
            return Ok(());
        }
        load_tensor(self.engine.as_mut(), payload)?;
        ts.preprocessed = realtime_ns();
        self.engine.run(&mut self.logits).map_err(engine_error)?;
        ts.inferred = realtime_ns();
        Ok(())
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

/// An empty vector of borrowed byte slices with `v`'s allocation, for borrows of another
/// lifetime: the in-place collect of an empty iterator over elements of the same layout
/// keeps the buffer, so the batch's JPEG list allocates once per worker.
fn recycle<'a>(mut v: Vec<&[u8]>) -> Vec<&'a [u8]> {
    v.clear();
    v.into_iter().map(|_| -> &'a [u8] { &[] }).collect()
}

/// The validated header of a JPEG inference request (what a batch takes); anything else
/// goes through [`Pipeline::handle`].
fn batchable<J: ServerJob>(job: &Queued<J>) -> Option<Header> {
    job.header
        .filter(|h| h.task == Task::Jpeg && job.job.resident().is_none())
}

/// A stage's failure: the error code for the sender and the text for both.
type StageError = (ErrorCode, String);

fn engine_error(e: EngineError) -> StageError {
    match e {
        EngineError::BadInput(text) => (ErrorCode::BadImage, text),
        other => (ErrorCode::Internal, other.to_string()),
    }
}

/// A raw payload's refusal: too many pixels is `PayloadTooLarge` (as for a JPEG), the rest
/// `BadImage`.
fn raw_error(e: RawImageError) -> StageError {
    match e {
        RawImageError::TooLarge { .. } => (
            ErrorCode::PayloadTooLarge,
            format!("{e} (--max-image-pixels)"),
        ),
        other => (ErrorCode::BadImage, other.to_string()),
    }
}

/// `--max-image-pixels`, from the frame header before any decoder sees the image: the same
/// check and the same answer on every backend. An image whose header cannot be read is left
/// to the decoder's verdict (`BadImage`).
fn check_image_size(jpeg: &[u8], max_pixels: usize) -> Result<(), StageError> {
    match jpeg_dimensions(jpeg) {
        Some((w, h)) if w.saturating_mul(h) > max_pixels => Err((
            ErrorCode::PayloadTooLarge,
            format!(
                "image is {w}x{h} = {} pixels, above this server's limit of {max_pixels} (--max-image-pixels)",
                w * h
            ),
        )),
        _ => Ok(()),
    }
}

/// The CPU decoder's verdicts: an image above the limit (seen from zune-jpeg's header parse
/// where ours found no frame header) is `PayloadTooLarge` as from [`check_image_size`].
fn preprocess_error(e: PreprocessError) -> StageError {
    let code = match e {
        PreprocessError::TooLarge { .. } => ErrorCode::PayloadTooLarge,
        _ => ErrorCode::BadImage,
    };
    (code, e.to_string())
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
    pre.decode(jpeg).map_err(preprocess_error)?;
    ts.decoded = realtime_ns();
    let input = engine.input_mut().map_err(engine_error)?;
    pre.preprocess(input).map_err(preprocess_error)?;
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
        pre.decode(jpeg).map_err(preprocess_error)?;
        ts.decoded = realtime_ns();
        let input = engine.slot_input_mut(slot).map_err(engine_error)?;
        pre.preprocess(input).map_err(preprocess_error)?;
    }
    ts.preprocessed = realtime_ns();
    Ok(true)
}

/// The processed task's payload length against what it must be and what the model takes.
fn check_tensor(engine: &mut dyn InferenceEngine, payload_len: usize) -> Result<(), StageError> {
    if payload_len != TENSOR_LEN * 4 {
        let text = format!(
            "tensor payload is {payload_len} bytes, expected {} (1x3x224x224 f32 LE)",
            TENSOR_LEN * 4
        );
        return Err((ErrorCode::BadTensor, text));
    }
    let values: usize = engine.input_shape()[1..].iter().product();
    if values != TENSOR_LEN {
        let text =
            format!("the model takes {values} input values, task processed sends {TENSOR_LEN}");
        return Err((ErrorCode::Internal, text));
    }
    Ok(())
}

/// A GPU-resident request's header (`head`) and payload into `copy` (device -> host,
/// counted as the server's).
fn copy_resident(copy: &mut Vec<u8>, head: &[u8], resident: &Resident<'_>) -> Result<(), String> {
    let len = HEADER_LEN + resident.payload.len();
    let head = head
        .get(..HEADER_LEN)
        .ok_or("GPU-resident request without its header")?;
    // Keeps its capacity: steady traffic allocates nothing here.
    copy.resize(len, 0);
    copy[..HEADER_LEN].copy_from_slice(head);
    resident
        .payload
        .copy_to_host(resident.stream, &mut copy[HEADER_LEN..], Mover::Server)
        .map_err(|e| format!("copying the request out of GPU memory: {e}"))
}

/// Task processed's payload (1x3x224x224 f32 LE) straight into the engine's input buffer.
fn load_tensor(engine: &mut dyn InferenceEngine, payload: &[u8]) -> Result<(), StageError> {
    check_tensor(engine, payload.len())?;
    let input = engine.input_mut().map_err(engine_error)?;
    if input.len() != TENSOR_LEN {
        let text = format!(
            "the model takes {} input values, task processed sends {TENSOR_LEN}",
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

#[cfg(test)]
mod tests;
