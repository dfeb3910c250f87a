//! Device images: JPEG decode (nvJPEG) and resize/crop/normalise (the NVRTC kernel) on the
//! GPU, on a session's stream, writing the session's f32 NCHW input buffer (or one slot of
//! its batch context's) in device memory: [`CudnnSession`]'s [`DeviceImages`]. The geometry is the CPU path's
//! (`Resize(256)`, centre crop 224, ImageNet mean/std), so both paths feed the model the same
//! tensor up to decoder rounding (measured in runtime/tests/gpu_preprocess.rs).

use std::sync::Arc;

use hacserve_ffi::gpu::cuda::cu;
use hacserve_ffi::gpu::nvjpeg::{JpegDecoder, NvJpeg, NvJpegError};
use hacserve_ffi::gpu::nvjpeg_batched::{HardwareItem, HardwareJpegDecoder};
use hacserve_ffi::gpu::preprocess::{Geometry, GpuPreprocessor};
use hacserve_ffi::gpu::resident::DeviceSpan;
use hacserve_ffi::gpu::transfer::Mover;

use super::run_err;
use super::session::CudnnSession;
use super::weights::DevBuf;
#[cfg(doc)]
use crate::engine::InferenceEngine;
use crate::engine::{DecodeCounts, DeviceImages, EngineError, SlotStage};
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

/// How many 12 MP images one hardware chunk may hold, per NVJPG engine: a batched call
/// decodes an image per engine at a time, so a chunk of twice the engine count keeps every
/// engine busy for two rounds, where a chunk of 8 on the H200's 7 engines ran a second round
/// of one image. Measured on the H200 (1 thread, 12 MP, batch 32): one image per call (the
/// steady buffer alone) 156 img/s, chunks of 8 532, chunks of 14 711 (torchvision's single
/// call of 32, decode only: 915).
const CHUNK_IMAGES_PER_ENGINE: usize = 2;

/// The chunk budget where nvJPEG does not say how many engines it has.
const CHUNK_IMAGES_UNKNOWN_ENGINES: usize = 8;

/// The most the decode buffer may grow to for one chunk of a batch whose images each fit
/// the steady buffer, so a batch of large photos reaches the NVJPG engines together: room
/// for [`CHUNK_IMAGES_PER_ENGINE`] 12 MP images per engine (at most 16), and no growth
/// without the hardware backend (the hybrid path decodes one image at a time anyway). Kept
/// while consecutive batches need it, given back after the first batch that fits the steady
/// buffer ([`GpuImages::release_growth`]).
fn chunk_budget(hardware: Option<&HardwareJpegDecoder>) -> usize {
    let images = match hardware {
        None => 1,
        Some(hw) => hw
            .engines()
            .map_or(CHUNK_IMAGES_UNKNOWN_ENGINES, |(engines, _)| {
                (CHUNK_IMAGES_PER_ENGINE * engines as usize).clamp(1, 16)
            }),
    };
    images * STEADY_RGB_BYTES
}

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
    /// The most decode-buffer bytes one chunk of the last batch staged (or the last single
    /// image decoded) used: what [`Self::release_growth`] keeps a grown buffer for. Not
    /// reset by it, so with overlapped batches the second batch's answer keeps it too.
    chunk_peak: usize,
    /// The largest image this session decodes (w*h): `--max-image-pixels`, at most
    /// [`MAX_IMAGE_PIXELS`].
    max_pixels: usize,
    /// nvJPEG's hardware backend (batched API), where the GPU has NVJPG engines and
    /// `--decode gpu` asked for it: the images of a batch it takes are decoded in one call
    /// into consecutive places of `rgb`; the rest go to `decoder` one by one.
    hardware: Option<HardwareJpegDecoder>,
    /// One batch's plan, one entry per image (allocated once, `batch` entries).
    plan: Vec<Planned>,
    /// Indices into `plan` of the images the hardware takes, and their decoded sizes.
    hardware_picks: Vec<usize>,
    hardware_sizes: Vec<(usize, usize)>,
    counts: DecodeCounts,
}

/// Where one image of a batch is decoded, and how.
#[derive(Debug, Clone, Copy)]
struct Planned {
    offset: usize,
    width: usize,
    height: usize,
    how: Route,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Hardware,
    Hybrid,
    /// Refused by the header checks or the decoders (its text is in the stage).
    Refused,
    /// Decoded and ready in `rgb` at `offset`.
    Ready,
}

/// Each image's place in the decode buffer starts on this boundary.
const PLACE_ALIGN: usize = 256;

impl GpuImages {
    /// Needs the stream's context current on the calling thread (nvJPEG's handle binds it).
    /// `batch`: the most images [`Self::stage_batch`] takes at once. `hardware`: use nvJPEG's
    /// hardware backend where this GPU and library have it (and it takes the warm-up JPEG,
    /// a baseline 4:2:0 photo); without it, or where it is absent, every image takes the
    /// hybrid path (said once in the log).
    pub fn new(
        kernels: Arc<GpuImageKernels>,
        stream: &Arc<cu::CudaStream>,
        batch: usize,
        hardware: bool,
    ) -> Result<Self, EngineError> {
        // The single-phase API (default backend) for what the hardware does not take: on
        // the H100 it beat the decoupled API's GPU Huffman backend at 0.3 MP (0.23 vs
        // 1.25 ms) and at 12 MP (6.3-6.4 vs 10.6-15.9 ms in three runs), see
        // ffi/tests/nvjpeg_gpu.rs.
        let decoder = JpegDecoder::new(kernels.nvjpeg).map_err(nvjpeg_err)?;
        let rgb = stream
            .alloc_zeros::<u8>(STEADY_RGB_BYTES)
            .map_err(|e| EngineError::Run(format!("decode buffer: {e}")))?;
        let batch = batch.max(1);
        let hardware = if hardware {
            hardware_decoder(kernels.nvjpeg, batch)
        } else {
            None
        };
        let mut images = GpuImages {
            kernels,
            decoder,
            rgb,
            decoded: None,
            outsized: false,
            chunk_peak: 0,
            max_pixels: MAX_IMAGE_PIXELS,
            hardware,
            plan: Vec::with_capacity(batch),
            hardware_picks: Vec::with_capacity(batch),
            hardware_sizes: Vec::with_capacity(batch),
            counts: DecodeCounts::default(),
        };
        images.warm_up(stream)?;
        Ok(images)
    }

    /// nvJPEG allocates on first use: one decode on each path (the hardware one at the
    /// batch size, as many copies of the sample as the buffer holds) at start.
    fn warm_up(&mut self, stream: &Arc<cu::CudaStream>) -> Result<(), EngineError> {
        let hardware = self.hardware.take();
        let hybrid = self.decode(WARMUP_JPEG, stream);
        self.hardware = hardware;
        hybrid.map_err(|e| EngineError::Run(format!("nvJPEG warm-up decode: {e}")))?;
        if let Some(hw) = self.hardware.as_mut() {
            let place = (3 * 512 * 600usize).next_multiple_of(PLACE_ALIGN);
            let n = hw.capacity().min(self.rgb.len() / place).max(1);
            let ran = match DeviceSpan::of(&self.rgb, stream, n * place) {
                Some(all) => hw.decode_batch(
                    n,
                    |k| HardwareItem {
                        jpeg: WARMUP_JPEG,
                        dst: all.sub(k * place, place).unwrap_or(all),
                    },
                    stream,
                    &mut self.hardware_sizes,
                ),
                None => Ok(()),
            };
            if let Err(e) = ran {
                log::warn!("nvJPEG hardware backend failed its warm-up batch ({e}): hybrid decode for this worker");
                self.hardware = None;
            }
        }
        self.decoded = None;
        self.counts = DecodeCounts::default();
        Ok(())
    }

    /// Whether nvJPEG's hardware backend decodes here.
    pub fn has_hardware(&self) -> bool {
        self.hardware.is_some()
    }

    pub fn counts(&self) -> DecodeCounts {
        self.counts
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
    /// request does not pay nvJPEG's first-use allocations). A buffer grown for a chunk of
    /// steady-size images (at most [`chunk_budget`]) is kept while the last batch needed
    /// it, so a stream of large photos allocates once, and goes back after the first batch
    /// that did not. Nothing happens otherwise.
    pub fn release_growth(&mut self, stream: &Arc<cu::CudaStream>) -> Result<(), EngineError> {
        let chunk_in_use = !self.outsized
            && self.rgb.len() <= chunk_budget(self.hardware.as_ref())
            && self.chunk_peak > STEADY_RGB_BYTES;
        if self.rgb.len() > STEADY_RGB_BYTES && !chunk_in_use {
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
        self.chunk_peak = 3 * pixels;
        self.grow_for(3 * pixels, 1, (width, height), stream)?;
        if let Some(hw) = self.hardware.as_mut() {
            if hw.supported(jpeg).unwrap_or(false) {
                let ran = match DeviceSpan::of(&self.rgb, stream, 3 * pixels) {
                    Some(dst) => hw.decode_batch(
                        1,
                        |_| HardwareItem { jpeg, dst },
                        stream,
                        &mut self.hardware_sizes,
                    ),
                    None => Ok(()),
                };
                match (ran, self.hardware_sizes.first()) {
                    (Ok(()), Some(&size)) => {
                        self.counts.hardware += 1;
                        self.counts.hardware_batches += 1;
                        self.decoded = Some(size);
                        return Ok(size);
                    }
                    (ran, _) => {
                        log::debug!("nvJPEG hardware decode of one image failed ({ran:?}): hybrid");
                        self.counts.hardware_failures += 1;
                    }
                }
            }
        }
        let size = self
            .decoder
            .decode_into(jpeg, stream, &mut self.rgb)
            .map_err(decode_error)?;
        stream
            .synchronize()
            .map_err(|e| EngineError::Run(format!("nvJPEG decode: {e}")))?;
        self.counts.hybrid += 1;
        self.decoded = Some(size);
        Ok(size)
    }

    /// The decode buffer holds at least `need` bytes, for `images` images, the largest
    /// `width` x `height` (grown for an outsized image or a chunk of large ones, given back
    /// by [`Self::release_growth`]).
    fn grow_for(
        &mut self,
        need: usize,
        images: usize,
        (width, height): (usize, usize),
        stream: &Arc<cu::CudaStream>,
    ) -> Result<(), EngineError> {
        if need > self.rgb.len() {
            log::info!(
                "GPU decode buffer grows to {need} B for {images} image(s) of up to {width}x{height}"
            );
            self.decoded = None;
            self.rgb = stream
                .alloc_zeros::<u8>(need)
                .map_err(|e| EngineError::Run(format!("decode buffer: {e}")))?;
        }
        Ok(())
    }

    /// The header checks of [`Self::decode`] (readable, ends with EOI, within the pixel
    /// limit): (width, height), or why the image is refused.
    fn check_header(&mut self, jpeg: &[u8]) -> Result<(usize, usize), String> {
        let (_, w, h) = self
            .decoder
            .image_info(jpeg)
            .map_err(|e| format!("not a JPEG nvJPEG can read: {e}"))?;
        if !ends_with_eoi(jpeg) {
            return Err("JPEG is truncated: no end-of-image marker (FF D9) at its end".into());
        }
        let (width, height) = (w.max(0) as usize, h.max(0) as usize);
        let pixels = width.saturating_mul(height);
        if pixels > self.max_pixels {
            return Err(format!(
                "image of {width}x{height} exceeds the server's limit of {} pixels",
                self.max_pixels
            ));
        }
        Ok((width, height))
    }

    /// Decodes the images of `jpegs` from `start` on that fit the decode buffer together
    /// (at least one: an outsized one grows the buffer), each at its own place: those the
    /// hardware backend takes in one batch, the others one by one on the hybrid path.
    /// Refusals go into `stages[i]` (which holds a placeholder for every image of the
    /// chunk on return); returns the end of the chunk. Waits for the decodes.
    fn decode_chunk(
        &mut self,
        jpegs: &[&[u8]],
        start: usize,
        stream: &Arc<cu::CudaStream>,
        stages: &mut Vec<SlotStage>,
    ) -> Result<usize, EngineError> {
        self.plan.clear();
        self.hardware_picks.clear();
        // Images are placed up to the chunk budget; the buffer grows to what the places
        // need once, after the plan (nothing is decoded into it before).
        let capacity = self.rgb.len().max(chunk_budget(self.hardware.as_ref()));
        let mut offset = 0;
        let mut used = 0;
        let mut end = start;
        for (i, jpeg) in jpegs.iter().enumerate().skip(start) {
            let checked = self.check_header(jpeg);
            let (width, height) = match checked {
                Ok(wh) => wh,
                Err(why) => {
                    self.plan.push(Planned {
                        offset: 0,
                        width: 0,
                        height: 0,
                        how: Route::Refused,
                    });
                    stages.push(SlotStage::Refused(why));
                    self.counts.refused += 1;
                    end = i + 1;
                    continue;
                }
            };
            let need = 3 * width * height;
            if offset > 0 && offset + need > capacity {
                break;
            }
            if width * height > STEADY_IMAGE_PIXELS {
                self.outsized = true;
            }
            let hardware = match self.hardware.as_mut() {
                Some(hw) => hw.supported(jpeg).unwrap_or(false),
                None => false,
            };
            if hardware {
                self.hardware_picks.push(self.plan.len());
            }
            self.plan.push(Planned {
                offset,
                width,
                height,
                how: if hardware {
                    Route::Hardware
                } else {
                    Route::Hybrid
                },
            });
            stages.push(SlotStage::Refused(String::new()));
            used = offset + need;
            offset = used.next_multiple_of(PLACE_ALIGN);
            end = i + 1;
        }
        let placed = self.plan.iter().filter(|p| p.how != Route::Refused);
        let largest = placed
            .clone()
            .map(|p| (p.width, p.height))
            .max_by_key(|&(w, h)| w * h);
        if let Some(largest) = largest {
            self.grow_for(used, placed.count(), largest, stream)?;
        }
        // The most any chunk of this batch needed (a batch's first chunk starts at 0).
        self.chunk_peak = if start == 0 {
            used
        } else {
            self.chunk_peak.max(used)
        };
        self.decode_hardware_picks(jpegs, start, stream);
        // The hybrid path, one image at a time (nvJPEG's single-phase API on one state).
        for k in 0..self.plan.len() {
            let p = self.plan[k];
            if p.how != Route::Hybrid {
                continue;
            }
            let jpeg = jpegs[start + k];
            let Some(dst) = DeviceSpan::of(&self.rgb, stream, p.offset + 3 * p.width * p.height)
                .and_then(|all| all.sub(p.offset, 3 * p.width * p.height))
            else {
                return Err(EngineError::Run("decode place outside the buffer".into()));
            };
            match self.decoder.decode_into_span(jpeg, stream, dst) {
                Ok(_) => {
                    self.counts.hybrid += 1;
                    self.plan[k].how = Route::Ready;
                }
                Err(e) => match decode_error(e) {
                    EngineError::BadInput(why) => {
                        self.plan[k].how = Route::Refused;
                        self.counts.refused += 1;
                        stages[start + k] = SlotStage::Refused(why);
                    }
                    other => return Err(other),
                },
            }
        }
        Ok(end)
    }

    /// The plan's hardware images in one `nvjpegDecodeBatched`; where the batch fails as a
    /// whole, its images go to the hybrid path instead.
    fn decode_hardware_picks(
        &mut self,
        jpegs: &[&[u8]],
        start: usize,
        stream: &Arc<cu::CudaStream>,
    ) {
        let n = self.hardware_picks.len();
        let Some(hw) = self.hardware.as_mut() else {
            return;
        };
        if n == 0 {
            return;
        }
        let (plan, picks) = (&self.plan, &self.hardware_picks);
        let ran = match DeviceSpan::of(&self.rgb, stream, self.rgb.len()) {
            Some(all) => hw.decode_batch(
                n,
                |k| {
                    let p = plan[picks[k]];
                    HardwareItem {
                        jpeg: jpegs[start + picks[k]],
                        dst: all.sub(p.offset, 3 * p.width * p.height).unwrap_or(all),
                    }
                },
                stream,
                &mut self.hardware_sizes,
            ),
            None => Err(NvJpegError::Sync("decode buffer unavailable".into())),
        };
        let sizes_match = self
            .hardware_sizes
            .iter()
            .zip(picks.iter())
            .all(|(&(w, h), &k)| (w, h) == (plan[k].width, plan[k].height));
        let route = if ran.is_ok() && sizes_match && self.hardware_sizes.len() == n {
            self.counts.hardware += n as u64;
            self.counts.hardware_batches += 1;
            Route::Ready
        } else {
            log::debug!("nvJPEG hardware batch of {n} failed ({ran:?}): decoding it again on the hybrid path");
            self.counts.hardware_failures += 1;
            Route::Hybrid
        };
        for &k in &self.hardware_picks {
            self.plan[k].how = route;
        }
    }

    /// Preprocesses image `k` of the last chunk (decoded, [`Route::Ready`]) into `out` on
    /// `stream`, without waiting.
    fn launch_planned(
        &self,
        k: usize,
        stream: &Arc<cu::CudaStream>,
        out: &mut cu::CudaViewMut<'_, f32>,
    ) -> Result<(), EngineError> {
        let p = self.plan[k];
        let len = 3 * p.width * p.height;
        let src = DeviceSpan::of(&self.rgb, stream, p.offset + len)
            .and_then(|all| all.sub(p.offset, len))
            .ok_or_else(|| EngineError::Run("decoded image outside the buffer".into()))?;
        self.kernels
            .kernel
            .launch_rgb(stream, src, &imagenet_geometry(p.width, p.height), out)
            .map_err(|e| EngineError::Run(format!("preprocessing kernel: {e}")))
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
        self.chunk_peak = want;
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

/// nvJPEG's hardware backend for batches of `batch`, if this GPU and library have it and it
/// takes the warm-up JPEG (a baseline 4:2:0 photo, what clients send); the reason it is not
/// used is logged once per process, its engines likewise.
fn hardware_decoder(nvjpeg: &'static NvJpeg, batch: usize) -> Option<HardwareJpegDecoder> {
    static SAID: std::sync::Once = std::sync::Once::new();
    let made = HardwareJpegDecoder::new(nvjpeg, batch)
        .and_then(|mut hw| hw.supported(WARMUP_JPEG).map(|yes| (hw, yes)));
    match made {
        Ok((hw, true)) => {
            SAID.call_once(|| match hw.engines() {
                Some((engines, cores)) => log::info!(
                    "nvJPEG hardware backend: {engines} engines x {cores} cores, batches of up to {batch}"
                ),
                None => log::info!("nvJPEG hardware backend, batches of up to {batch}"),
            });
            Some(hw)
        }
        Ok((_, false)) => {
            SAID.call_once(|| {
                log::warn!("nvJPEG hardware backend does not take a baseline 4:2:0 JPEG here: hybrid decode")
            });
            None
        }
        Err(e) => {
            SAID.call_once(|| {
                log::warn!("nvJPEG hardware backend unavailable ({e}): hybrid decode")
            });
            None
        }
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

    fn decode_counts(&self) -> Option<DecodeCounts> {
        self.images.as_ref().map(GpuImages::counts)
    }

    /// Chunks of images that fit the decode buffer together: each decoded (the hardware's
    /// share in one batched call), then preprocessed into consecutive slots of the batch
    /// input with one wait per chunk. A refused image takes no slot.
    fn stage_batch(&mut self, jpegs: &[&[u8]], stages: &mut Vec<SlotStage>) {
        stages.clear();
        if let Err(e) = self.handles.bind().map_err(run_err) {
            stages.extend(
                jpegs
                    .iter()
                    .map(|_| SlotStage::Failed(EngineError::Run(e.to_string()))),
            );
            return;
        }
        let CudnnSession {
            handles,
            images,
            staging,
            buffers,
            batched,
            preferred,
            staged_in,
            device_slots,
            ..
        } = self;
        let Some(images) = images.as_mut() else {
            let why = "session made without GPU decoding";
            stages.extend(
                jpegs
                    .iter()
                    .map(|_| SlotStage::Failed(EngineError::Run(why.into()))),
            );
            return;
        };
        let stream = handles.stream();
        // The smallest context that takes them all: a preferred size, else the largest.
        *staged_in = preferred.iter().position(|c| c.batch >= jpegs.len());
        let context = match *staged_in {
            Some(i) => preferred.get_mut(i),
            None => batched.as_deref_mut(),
        };
        let (count, staging, buffers) = match context {
            Some(b) => (b.batch, &mut b.staging, &mut b.buffers),
            None => (1, staging, buffers),
        };
        let mut slot = 0;
        let mut start = 0;
        while start < jpegs.len() {
            let end = match images.decode_chunk(jpegs, start, stream, stages) {
                Ok(end) => end,
                Err(e) => {
                    let text = e.to_string();
                    stages.truncate(start);
                    stages.extend(
                        jpegs[start..]
                            .iter()
                            .map(|_| SlotStage::Failed(EngineError::Run(text.clone()))),
                    );
                    return;
                }
            };
            let decoded_ns = crate::clock::realtime_ns();
            let first_slot = slot;
            for (k, stage) in stages[start..end].iter_mut().enumerate() {
                if images.plan[k].how != Route::Ready {
                    continue;
                }
                let launched = input_slot(staging, buffers, slot, count)
                    .and_then(|mut out| images.launch_planned(k, stream, &mut out));
                *stage = match launched {
                    Ok(()) => {
                        *device_slots |= 1 << slot;
                        slot += 1;
                        SlotStage::Staged {
                            slot: slot - 1,
                            decoded_ns,
                            preprocessed_ns: 0,
                        }
                    }
                    Err(e) => SlotStage::Failed(e),
                };
            }
            let waited = stream
                .synchronize()
                .map_err(|e| EngineError::Run(format!("preprocessing kernel: {e}")));
            let preprocessed = crate::clock::realtime_ns();
            for stage in &mut stages[start..end] {
                if let SlotStage::Staged {
                    slot: s,
                    preprocessed_ns,
                    ..
                } = stage
                {
                    match &waited {
                        Ok(()) => *preprocessed_ns = preprocessed,
                        Err(e) if *s >= first_slot => {
                            *stage = SlotStage::Failed(EngineError::Run(e.to_string()))
                        }
                        Err(_) => {}
                    }
                }
            }
            start = end;
        }
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
