//! The pipeline's batching and device-fallback paths, over test engines.

#[cfg(test)]
mod batch_tests {
    //! Batching through the engine contract alone: an engine with a host input of two slots
    //! and no device images batches CPU-decoded JPEGs.
    use super::super::*;
    use crate::protocol::MessageKind;

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
    fn an_image_over_the_limit_is_payload_too_large_alone_and_in_a_batch() {
        let jpeg = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/grace_hopper.jpg"
        ))
        .unwrap();
        let (w, h) = crate::preprocess::jpeg_dimensions(&jpeg).unwrap();
        let engine = TwoSlots {
            slots: [vec![0.0; TENSOR_LEN], vec![0.0; TENSOR_LEN]],
            batch_runs: std::sync::Arc::default(),
        };
        let mut pipeline = Pipeline::new(Box::new(engine), 1 << 24, w * h - 1);
        let mut out = Vec::new();
        let alone = pipeline.handle(&request(Task::Jpeg, 1, &jpeg), &mut out);
        assert_eq!(alone, Outcome::Rejected(ErrorCode::PayloadTooLarge));
        assert!(
            pipeline.last_error().contains(&format!("{w}x{h}")),
            "{}",
            pipeline.last_error()
        );
        let (head, body) = Header::decode(&out, usize::MAX).unwrap();
        assert_eq!(head.kind, MessageKind::Error);
        let (code, _) = crate::protocol::decode_error(body).unwrap();
        assert_eq!(code, ErrorCode::PayloadTooLarge as u32);
        let jobs = [
            request(Task::Jpeg, 2, &jpeg),
            request(Task::Preprocess, 3, &jpeg),
        ];
        let mut outs = vec![Vec::new(); 2];
        let mut outcomes = [Outcome::Answered {
            task: Task::Echo,
            top1: None,
        }; 2];
        pipeline.handle_batch(&jobs, &mut outs, &mut outcomes);
        assert_eq!(outcomes, [Outcome::Rejected(ErrorCode::PayloadTooLarge); 2]);
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
        let mut pipeline = Pipeline::new(
            Box::new(engine),
            1 << 24,
            crate::preprocess::DEFAULT_MAX_IMAGE_PIXELS,
        );
        assert_eq!(pipeline.batch_capacity(), 2);
        let jobs = [
            request(Task::Jpeg, 1, &jpeg),
            request(Task::Jpeg, 2, b"not a jpeg"),
            request(Task::Jpeg, 3, &jpeg),
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
    use super::super::*;
    use crate::engine::DeviceImages;
    use crate::protocol::MessageKind;

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
        let header = Header::request(Task::Jpeg, 3, request_id, jpeg.len());
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
        let mut pipeline = Pipeline::new(
            Box::new(engine),
            1 << 24,
            crate::preprocess::DEFAULT_MAX_IMAGE_PIXELS,
        );
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
