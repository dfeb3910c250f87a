//! Device images: JPEG decode (nvJPEG) and resize/crop/normalise (the NVRTC kernel) on the
//! GPU, on a session's stream, writing the session's f32 NCHW input buffer (or one slot of
//! its batch context's) in device memory: [`CudnnSession`]'s [`DeviceImages`]. The geometry is the CPU path's
//! (`Resize(256)`, centre crop 224, ImageNet mean/std), so both paths feed the model the same
//! tensor up to decoder rounding (measured in runtime/tests/gpu_preprocess.rs).

use std::sync::Arc;

use hacserve_ffi::gpu::cuda::cu;
use hacserve_ffi::gpu::nvjpeg::{JpegDecoder, NvJpeg, NvJpegError};
use hacserve_ffi::gpu::preprocess::{Geometry, GpuPreprocessor};
use hacserve_ffi::gpu::resident::DeviceSpan;
use hacserve_ffi::gpu::transfer::Mover;

use super::run_err;
use super::session::CudnnSession;
use super::weights::DevBuf;
#[cfg(doc)]
use crate::engine::InferenceEngine;
use crate::engine::{DeviceImages, EngineError};
use crate::preprocess::{
    center_crop_offset, resized_size, INPUT_SIZE, MAX_IMAGE_PIXELS, MEAN, RESIZE_SHORTER, STD,
    STEADY_IMAGE_PIXELS,
};

/// RGB bytes each session allocates at start and keeps: a 12-megapixel photo
/// ([`STEADY_IMAGE_PIXELS`]), so steady traffic allocates nothing. A larger image (up to the
/// pipeline's `--max-image-pixels`, checked before decoding, and never above
/// [`MAX_IMAGE_PIXELS`]) gets a buffer of exactly its size, given back after its request
/// ([`GpuImages::release_growth`]).
const STEADY_RGB_BYTES: usize = 3 * STEADY_IMAGE_PIXELS;

/// Decoded once per session at start: nvJPEG allocates its host and device buffers on first
/// use (2-4 ms on an H100), which would otherwise land on a client's first request to each
/// worker.
const WARMUP_JPEG: &[u8] = include_bytes!("../../../../models/grace_hopper.jpg");

/// Loaded once per GPU and shared by its sessions: nvJPEG and the compiled kernel.
pub struct GpuImageKernels {
    nvjpeg: &'static NvJpeg,
    kernel: GpuPreprocessor,
}

impl GpuImageKernels {
    /// Loads libnvjpeg and compiles the preprocessing kernel into `ctx`; the error names
    /// what is missing.
    pub fn new(ctx: &Arc<cu::CudaContext>) -> Result<Self, EngineError> {
        let nvjpeg = NvJpeg::load()
            .map_err(|e| EngineError::Run(format!("GPU JPEG decoding unavailable: {e}")))?;
        let kernel = GpuPreprocessor::new(ctx)
            .map_err(|e| EngineError::Run(format!("GPU preprocessing unavailable: {e}")))?;
        Ok(GpuImageKernels { nvjpeg, kernel })
    }
}

/// One session's decoder state and decoded-image buffer.
pub struct GpuImages {
    kernels: Arc<GpuImageKernels>,
    decoder: JpegDecoder,
    rgb: cu::CudaSlice<u8>,
    /// (width, height) of the image in `rgb`, once decoded.
    decoded: Option<(usize, usize)>,
    /// An image above the steady size went through the decoder since the last
    /// [`Self::release_growth`]: nvJPEG's own buffers grew with it.
    outsized: bool,
    /// The largest image this session decodes (w*h): `--max-image-pixels`, at most
    /// [`MAX_IMAGE_PIXELS`].
    max_pixels: usize,
}

impl GpuImages {
    /// Needs the stream's context current on the calling thread (nvJPEG's handle binds it).
    pub fn new(
        kernels: Arc<GpuImageKernels>,
        stream: &Arc<cu::CudaStream>,
    ) -> Result<Self, EngineError> {
        // The single-phase API (default backend) for every size: on the H100 it beat the
        // decoupled API's GPU Huffman backend at 0.3 MP (0.23 vs 1.25 ms) and at 12 MP
        // (6.3-6.4 vs 10.6-15.9 ms in three runs), see ffi/tests/nvjpeg_gpu.rs.
        let decoder = JpegDecoder::new(kernels.nvjpeg).map_err(nvjpeg_err)?;
        let rgb = stream
            .alloc_zeros::<u8>(STEADY_RGB_BYTES)
            .map_err(|e| EngineError::Run(format!("decode buffer: {e}")))?;
        let mut images = GpuImages {
            kernels,
            decoder,
            rgb,
            decoded: None,
            outsized: false,
            max_pixels: MAX_IMAGE_PIXELS,
        };
        images.warm_up(stream)?;
        Ok(images)
    }

    fn warm_up(&mut self, stream: &Arc<cu::CudaStream>) -> Result<(), EngineError> {
        self.decode(WARMUP_JPEG, stream)
            .map_err(|e| EngineError::Run(format!("nvJPEG warm-up decode: {e}")))?;
        self.decoded = None;
        Ok(())
    }

    /// Images above `max_pixels` (w*h, at most [`MAX_IMAGE_PIXELS`]) are refused.
    pub fn limit_pixels(&mut self, max_pixels: usize) {
        self.max_pixels = max_pixels.min(MAX_IMAGE_PIXELS);
    }

    /// Device bytes of the decoded-image buffer now ([`STEADY_RGB_BYTES`] between requests
    /// once [`Self::release_growth`] ran; nvJPEG's internal buffers are not counted).
    pub fn buffer_bytes(&self) -> usize {
        self.rgb.len()
    }

    /// Whether an image above the steady size left anything to release.
    pub fn has_grown(&self) -> bool {
        self.outsized || self.rgb.len() > STEADY_RGB_BYTES
    }

    /// After an image above the steady size: the decoded-image buffer goes back to
    /// [`STEADY_RGB_BYTES`], and nvJPEG's decode state, whose internal host and device buffers
    /// grew with that image, is made anew (and warmed up on the sample image, so the next
    /// request does not pay nvJPEG's first-use allocations). Nothing happens otherwise.
    pub fn release_growth(&mut self, stream: &Arc<cu::CudaStream>) -> Result<(), EngineError> {
        if self.rgb.len() > STEADY_RGB_BYTES {
            self.decoded = None;
            let steady = stream
                .alloc_zeros::<u8>(STEADY_RGB_BYTES)
                .map_err(|e| EngineError::Run(format!("decode buffer: {e}")))?;
            let grown = std::mem::replace(&mut self.rgb, steady);
            drop(grown);
            log::info!("GPU decode buffer back to {STEADY_RGB_BYTES} B");
        }
        if self.outsized {
            self.outsized = false;
            self.decoded = None;
            self.decoder
                .reset_state(stream.context())
                .map_err(nvjpeg_err)?;
            self.warm_up(stream)?;
        }
        Ok(())
    }

    /// Decodes `jpeg` into the RGB buffer on `stream` and waits, so the stage can be timed.
    pub fn decode(
        &mut self,
        jpeg: &[u8],
        stream: &Arc<cu::CudaStream>,
    ) -> Result<(usize, usize), EngineError> {
        self.decoded = None;
        // Header errors are the image's: our own arguments are valid by construction.
        let (_, w, h) = self
            .decoder
            .image_info(jpeg)
            .map_err(|e| EngineError::BadInput(format!("not a JPEG nvJPEG can read: {e}")))?;
        if !ends_with_eoi(jpeg) {
            return Err(EngineError::BadInput(
                "JPEG is truncated: no end-of-image marker (FF D9) at its end".into(),
            ));
        }
        let (width, height) = (w.max(0) as usize, h.max(0) as usize);
        let pixels = width.saturating_mul(height);
        if pixels > self.max_pixels {
            return Err(EngineError::BadInput(format!(
                "image of {width}x{height} exceeds the server's limit of {} pixels",
                self.max_pixels
            )));
        }
        if pixels > STEADY_IMAGE_PIXELS {
            self.outsized = true;
        }
        if 3 * pixels > self.rgb.len() {
            let grown = 3 * pixels;
            log::info!(
                "GPU decode buffer grows to {grown} B for a {width}x{height} image (until its reply)"
            );
            self.rgb = stream
                .alloc_zeros::<u8>(grown)
                .map_err(|e| EngineError::Run(format!("decode buffer: {e}")))?;
        }
        let size = self
            .decoder
            .decode_into(jpeg, stream, &mut self.rgb)
            .map_err(decode_error)?;
        stream
            .synchronize()
            .map_err(|e| EngineError::Run(format!("nvJPEG decode: {e}")))?;
        self.decoded = Some(size);
        Ok(size)
    }

    /// Resize, centre crop and normalise of the decoded image into `out` (f32 NCHW,
    /// 3 x 224 x 224: a whole input buffer or one slot of a batch) on `stream`, then waits.
    pub fn preprocess_into(
        &mut self,
        stream: &Arc<cu::CudaStream>,
        out: &mut cu::CudaViewMut<'_, f32>,
    ) -> Result<(), EngineError> {
        let (w, h) = self
            .decoded
            .ok_or_else(|| EngineError::Run("preprocess before a successful decode".into()))?;
        let geometry = imagenet_geometry(w, h);
        self.kernels
            .kernel
            .launch(stream, &self.rgb, &geometry, out)
            .map_err(|e| EngineError::Run(format!("preprocessing kernel: {e}")))?;
        stream
            .synchronize()
            .map_err(|e| EngineError::Run(format!("preprocessing kernel: {e}")))
    }
}

impl GpuImages {
    /// The raw task on the host path: uploads `width` x `height` packed BGR8 `pixels` into
    /// the decoded-image buffer (grown for an image above the steady size, given back after
    /// its request as for a decode), then [`Self::preprocess_bgr_into`].
    pub fn preprocess_bgr_host(
        &mut self,
        stream: &Arc<cu::CudaStream>,
        width: usize,
        height: usize,
        pixels: &[u8],
        out: &mut cu::CudaViewMut<'_, f32>,
    ) -> Result<(), EngineError> {
        self.decoded = None;
        let want = width.saturating_mul(height).saturating_mul(3);
        if want != pixels.len() || width.saturating_mul(height) > self.max_pixels {
            return Err(EngineError::BadInput(format!(
                "{width}x{height} BGR pixels: {} bytes given (at most {} pixels)",
                pixels.len(),
                self.max_pixels
            )));
        }
        if want > self.rgb.len() {
            self.rgb = stream
                .alloc_zeros::<u8>(want)
                .map_err(|e| EngineError::Run(format!("pixel buffer: {e}")))?;
        }
        let span = DeviceSpan::of(&self.rgb, stream, want)
            .ok_or_else(|| EngineError::Run("pixel buffer too small".into()))?;
        span.copy_from_host(stream, pixels, Mover::Server)
            .map_err(|e| EngineError::Run(format!("pixel upload: {e}")))?;
        self.preprocess_bgr_into(stream, width, height, span, out)
    }

    /// Resize, centre crop and normalise of `width` x `height` packed BGR8 `pixels` lying in
    /// device memory (the raw task) into `out`, on `stream`, then waits. Nothing is decoded:
    /// the decoded-image buffer is left alone.
    pub fn preprocess_bgr_into(
        &self,
        stream: &Arc<cu::CudaStream>,
        width: usize,
        height: usize,
        pixels: DeviceSpan<'_>,
        out: &mut cu::CudaViewMut<'_, f32>,
    ) -> Result<(), EngineError> {
        let geometry = imagenet_geometry(width, height);
        self.kernels
            .kernel
            .launch_bgr(stream, pixels, &geometry, out)
            .map_err(|e| EngineError::BadInput(format!("raw pixels: {e}")))?;
        stream
            .synchronize()
            .map_err(|e| EngineError::Run(format!("preprocessing kernel: {e}")))
    }
}

/// Where the CPU path's `Resize(256)` + centre crop 224 + ImageNet normalisation put a
/// `w`x`h` image (packed RGB), for the preprocessing kernel.
pub fn imagenet_geometry(w: usize, h: usize) -> Geometry {
    let (rw, rh) = resized_size(w, h, RESIZE_SHORTER);
    Geometry {
        src_w: w,
        src_h: h,
        src_pitch: 3 * w,
        resized_w: rw,
        resized_h: rh,
        crop_x: center_crop_offset(rw, INPUT_SIZE),
        crop_y: center_crop_offset(rh, INPUT_SIZE),
        out_size: INPUT_SIZE,
        mean: MEAN,
        std: STD,
    }
}

/// Whether an end-of-image marker sits in the last KiB (after it only padding or trailing
/// metadata may follow). nvJPEG may fill a stream cut short with grey and call it decoded;
/// the CPU decoder (strict) refuses such an image, and so does this path. Inside entropy-coded
/// data 0xFF is always followed by 0x00 or a restart marker, so FF D9 there is the real EOI.
fn ends_with_eoi(jpeg: &[u8]) -> bool {
    jpeg[jpeg.len().saturating_sub(1024)..]
        .windows(2)
        .any(|w| w == [0xFF, 0xD9])
}

fn nvjpeg_err(e: NvJpegError) -> EngineError {
    EngineError::Run(format!("nvJPEG: {e}"))
}

/// nvJPEG's verdicts on the bitstream are the sender's fault; the rest are ours.
fn decode_error(e: NvJpegError) -> EngineError {
    match &e {
        // BAD_JPEG, JPEG_NOT_SUPPORTED, IMPLEMENTATION_NOT_SUPPORTED, INCOMPLETE_BITSTREAM
        NvJpegError::Call {
            status: 3 | 4 | 9 | 10,
            ..
        } => EngineError::BadInput(format!("JPEG rejected by nvJPEG: {e}")),
        NvJpegError::TooLarge { .. } | NvJpegError::Unsupported { .. } => {
            EngineError::BadInput(e.to_string())
        }
        _ => nvjpeg_err(e),
    }
}

impl DeviceImages for CudnnSession {
    fn decode(&mut self, jpeg: &[u8]) -> Result<(usize, usize), EngineError> {
        self.handles.bind().map_err(run_err)?;
        let images = self
            .images
            .as_mut()
            .ok_or_else(|| EngineError::Run("session made without GPU decoding".into()))?;
        images.decode(jpeg, self.handles.stream())
    }

    /// The kernel writes the f32 NCHW input where `run` would have uploaded it: the FP16
    /// staging buffer (the first layer converts it) or the FP32 input tensor.
    fn preprocess(&mut self) -> Result<(), EngineError> {
        self.handles.bind().map_err(run_err)?;
        let CudnnSession {
            handles,
            images,
            staging,
            buffers,
            ..
        } = self;
        let images = images
            .as_mut()
            .ok_or_else(|| EngineError::Run("session made without GPU decoding".into()))?;
        let mut slot = input_slot(staging, buffers, 0, 1)?;
        images.preprocess_into(handles.stream(), &mut slot)
    }

    fn run_preprocessed(&mut self, logits: &mut [f32]) -> Result<(), EngineError> {
        self.check_logits(logits)?;
        self.handles.bind().map_err(run_err)?;
        self.run_and_download(logits)
    }

    fn limit_image_pixels(&mut self, max_pixels: usize) {
        if let Some(images) = self.images.as_mut() {
            images.limit_pixels(max_pixels);
        }
    }

    fn release_growth(&mut self) {
        // Called after every request: nothing, not even the context bind, unless it grew.
        let Some(images) = self.images.as_mut().filter(|i| i.has_grown()) else {
            return;
        };
        let released = self
            .handles
            .bind()
            .map_err(run_err)
            .and_then(|()| images.release_growth(self.handles.stream()));
        if let Err(e) = released {
            log::warn!("GPU decode buffers not released after an outsized image: {e}");
        }
    }

    fn decode_buffer_bytes(&self) -> usize {
        self.images.as_ref().map_or(0, GpuImages::buffer_bytes)
    }

    /// The raw task on the host path: the pixels are uploaded into the decode buffer (one
    /// H2D copy of the pixels, counted) and preprocessed by the kernel's BGR variant, into the
    /// input `run_preprocessed` (or, with a slot, `run_slots`) runs.
    fn preprocess_bgr(
        &mut self,
        width: usize,
        height: usize,
        bgr: &[u8],
        slot: Option<usize>,
    ) -> Result<bool, EngineError> {
        if self.images.is_none() {
            return Ok(false);
        }
        self.handles.bind().map_err(run_err)?;
        let CudnnSession {
            handles,
            images,
            staging,
            buffers,
            batched,
            device_slots,
            ..
        } = self;
        let Some(images) = images.as_mut() else {
            return Ok(false);
        };
        match (slot, batched.as_mut()) {
            (Some(slot), Some(batched)) => {
                let count = batched.batch;
                let mut out = input_slot(&mut batched.staging, &mut batched.buffers, slot, count)?;
                images.preprocess_bgr_host(handles.stream(), width, height, bgr, &mut out)?;
                *device_slots |= 1 << slot;
            }
            (slot, _) => {
                if slot.unwrap_or(0) != 0 {
                    return Err(EngineError::Run(format!(
                        "slot {slot:?} without a batch context"
                    )));
                }
                let mut out = input_slot(staging, buffers, 0, 1)?;
                images.preprocess_bgr_host(handles.stream(), width, height, bgr, &mut out)?;
                if slot.is_some() {
                    *device_slots |= 1;
                }
            }
        }
        Ok(true)
    }

    /// Into slot `slot` of the batch context's input (the input [`InferenceEngine::run_slots`]
    /// runs) (on this session's stream, which
    /// decoded the image; the wait at the end orders it before the batch run).
    fn preprocess_slot(&mut self, slot: usize) -> Result<(), EngineError> {
        let CudnnSession {
            handles,
            images,
            batched,
            device_slots,
            ..
        } = self;
        let Some(batched) = batched.as_mut() else {
            if slot != 0 {
                return Err(EngineError::Run(format!(
                    "slot {slot} without a batch context"
                )));
            }
            self.preprocess()?;
            self.device_slots |= 1;
            return Ok(());
        };
        handles.bind().map_err(run_err)?;
        let images = images
            .as_mut()
            .ok_or_else(|| EngineError::Run("session made without GPU decoding".into()))?;
        let count = batched.batch;
        let mut out = input_slot(&mut batched.staging, &mut batched.buffers, slot, count)?;
        images.preprocess_into(handles.stream(), &mut out)?;
        *device_slots |= 1 << slot;
        Ok(())
    }
}

/// Image `slot` of `count` of a session's f32 NCHW input: the FP16 staging buffer, or the
/// FP32 input tensor.
pub(super) fn input_slot<'a>(
    staging: &'a mut Option<cu::CudaSlice<f32>>,
    buffers: &'a mut [Option<DevBuf>],
    slot: usize,
    count: usize,
) -> Result<cu::CudaViewMut<'a, f32>, EngineError> {
    let input = match staging.as_mut() {
        Some(staging) => staging,
        None => match buffers.first_mut().and_then(Option::as_mut) {
            Some(DevBuf::F32(first)) => first,
            _ => return Err(EngineError::Run("no f32 input buffer".into())),
        },
    };
    let per_image = input.len() / count.max(1);
    if slot >= count {
        return Err(EngineError::Run(format!(
            "slot {slot} of a batch of {count}"
        )));
    }
    Ok(input.slice_mut(slot * per_image..(slot + 1) * per_image))
}

#[cfg(test)]
mod tests {
    use super::ends_with_eoi;

    #[test]
    fn truncation_is_seen_at_the_end() {
        let jpeg = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/grace_hopper.jpg"
        ))
        .unwrap();
        assert!(ends_with_eoi(&jpeg));
        let mut padded = jpeg.clone();
        padded.extend_from_slice(&[0u8; 100]);
        assert!(ends_with_eoi(&padded));
        assert!(!ends_with_eoi(&jpeg[..jpeg.len() / 3]));
        assert!(!ends_with_eoi(&jpeg[..jpeg.len() - 2]));
        assert!(!ends_with_eoi(&[]));
    }
}
