//! nvJPEG's hardware backend (the NVJPG engines of A100/H100/H200) through the batched API,
//! the safe layer over [`crate::gpu::sys::nvjpeg::Batched`]: [`HardwareJpegDecoder`] decodes
//! several JPEGs in one call, each into its own span of device memory. The engines take
//! baseline JPEGs only: [`HardwareJpegDecoder::supported`] asks nvJPEG about one image
//! (`nvjpegDecodeBatchedSupported`), and the caller sends what it refuses to another decoder.
//! Every size is checked before the raw call.

use std::ffi::{c_int, c_uint};
use std::sync::Arc;

use super::cuda::cu;
use super::nvjpeg::{check, fitting_size, image_info, NvJpegError};
use super::resident::DeviceSpan;
use crate::gpu::sys::nvjpeg::*;

/// One image of a batch: its JPEG bytes and where its packed RGB goes (at least
/// 3 x width x height bytes of device memory).
#[derive(Debug, Clone, Copy)]
pub struct HardwareItem<'a> {
    pub jpeg: &'a [u8],
    pub dst: DeviceSpan<'a>,
}

/// A hardware-backend handle, its batched decode state and a parsed-stream object, with the
/// pointer arrays of one batch allocated once (`capacity` images). Used by one thread.
pub struct HardwareJpegDecoder {
    api: &'static NvJpeg,
    hw: &'static Batched,
    handle: nvjpegHandle_t,
    state: nvjpegJpegState_t,
    stream: nvjpegJpegStream_t,
    /// The batch size the state was last initialised for (0: never).
    initialized: usize,
    capacity: usize,
    data: Vec<*const u8>,
    lengths: Vec<usize>,
    images: Vec<nvjpegImage_t>,
    engines: Option<(u32, u32)>,
}

// SAFETY: as for the other nvJPEG decoders: the handle, state and stream may move between
// threads and are used by one at a time (the decoder is not Sync); the raw pointers in the
// arrays are rewritten before every call and never read otherwise.
unsafe impl Send for HardwareJpegDecoder {}

impl HardwareJpegDecoder {
    /// A hardware-backend handle (`nvjpegCreateEx(NVJPEG_BACKEND_HARDWARE)`) for batches of
    /// up to `capacity` images. Needs a current CUDA context. Fails (typed, with nvJPEG's
    /// status) where the library lacks the batched API or the GPU has no NVJPG engine.
    pub fn new(api: &'static NvJpeg, capacity: usize) -> Result<Self, NvJpegError> {
        let hw = api.batched.as_ref().ok_or(NvJpegError::Call {
            call: "nvjpegCreateEx/nvjpegDecodeBatched (missing in this libnvjpeg)",
            status: 9,
        })?;
        let capacity = capacity.max(1);
        let mut handle = std::ptr::null_mut();
        // SAFETY: null allocators select the library's own; out-pointer to a local.
        check("nvjpegCreateEx(HARDWARE)", unsafe {
            (hw.create_ex)(
                NVJPEG_BACKEND_HARDWARE,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
                &mut handle,
            )
        })?;
        let mut this = HardwareJpegDecoder {
            api,
            hw,
            handle,
            state: std::ptr::null_mut(),
            stream: std::ptr::null_mut(),
            initialized: 0,
            capacity,
            data: vec![std::ptr::null(); capacity],
            lengths: vec![0; capacity],
            images: vec![
                nvjpegImage_t {
                    channel: [std::ptr::null_mut(); NVJPEG_MAX_COMPONENT],
                    pitch: [0; NVJPEG_MAX_COMPONENT],
                };
                capacity
            ],
            engines: None,
        };
        // From here Drop releases whatever was created.
        // SAFETY: the handle is live; out-pointers to fields.
        check("nvjpegJpegStateCreate", unsafe {
            (api.state_create)(this.handle, &mut this.state)
        })?;
        // SAFETY: as above.
        check("nvjpegJpegStreamCreate", unsafe {
            (hw.stream_create)(this.handle, &mut this.stream)
        })?;
        if let Some(info) = hw.hardware_info {
            let (mut engines, mut cores): (c_uint, c_uint) = (0, 0);
            // SAFETY: the handle is live; out-pointers to locals.
            let status = unsafe { info(this.handle, &mut engines, &mut cores) };
            if status == NVJPEG_STATUS_SUCCESS {
                this.engines = Some((engines, cores));
            }
        }
        Ok(this)
    }

    /// (engines, cores per engine) as nvjpegGetHardwareDecoderInfo reports them.
    pub fn engines(&self) -> Option<(u32, u32)> {
        self.engines
    }

    /// The largest batch one [`Self::decode_batch`] takes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// (components, width, height) from the headers.
    pub fn image_info(&self, jpeg: &[u8]) -> Result<(i32, i32, i32), NvJpegError> {
        image_info(self.api, self.handle, jpeg)
    }

    /// Whether the hardware backend takes this JPEG (`nvjpegDecodeBatchedSupported` on its
    /// parsed headers). A header nvJPEG cannot parse is an error (the image's fault).
    pub fn supported(&mut self, jpeg: &[u8]) -> Result<bool, NvJpegError> {
        // SAFETY: jpeg is a live slice of the length passed; the stream object is ours.
        check("nvjpegJpegStreamParseHeader", unsafe {
            (self.hw.parse_header)(self.handle, jpeg.as_ptr(), jpeg.len(), self.stream)
        })?;
        let mut verdict: c_int = -1;
        // SAFETY: handle and parsed stream are ours; out-pointer to a local.
        check("nvjpegDecodeBatchedSupported", unsafe {
            (self.hw.supported)(self.handle, self.stream, &mut verdict)
        })?;
        Ok(verdict == 0)
    }

    /// Decodes `n` images (at most [`Self::capacity`], each one [`Self::supported`] said
    /// yes to; `item(k)` gives image k) to packed RGB in their `dst`, in one
    /// `nvjpegDecodeBatched` on `stream`, and waits. Returns each image's (width, height) in
    /// `sizes` (cleared first). On an error no image's pixels are to be trusted; the caller
    /// decodes them another way.
    pub fn decode_batch<'a>(
        &mut self,
        n: usize,
        mut item: impl FnMut(usize) -> HardwareItem<'a>,
        stream: &Arc<cu::CudaStream>,
        sizes: &mut Vec<(usize, usize)>,
    ) -> Result<(), NvJpegError> {
        sizes.clear();
        if n == 0 {
            return Ok(());
        }
        if n > self.capacity {
            return Err(NvJpegError::Call {
                call: "nvjpegDecodeBatched (batch above the decoder's capacity)",
                status: 2,
            });
        }
        for k in 0..n {
            let item = item(k);
            let (w, h) = fitting_size(self.image_info(item.jpeg)?, item.dst.len())?;
            sizes.push((w, h));
            self.data[k] = item.jpeg.as_ptr();
            self.lengths[k] = item.jpeg.len();
            self.images[k] = nvjpegImage_t {
                channel: [
                    item.dst.addr() as *mut u8,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                ],
                pitch: [3 * w, 0, 0, 0],
            };
        }
        if self.initialized != n {
            self.initialized = 0;
            // SAFETY: handle and state are ours; n <= capacity fits a c_int (capacity is a
            // batch of at most a few hundred images).
            check("nvjpegDecodeBatchedInitialize", unsafe {
                (self.hw.initialize)(self.handle, self.state, n as c_int, 1, NVJPEG_OUTPUT_RGBI)
            })?;
            self.initialized = n;
        }
        // SAFETY: data/lengths/images hold n valid entries written above: each data pointer
        // is a live JPEG slice of the given length (borrowed for 'a, which outlives this
        // call; this call waits for the stream, so nvJPEG reads none of them later); each
        // destination is live device memory of at least pitch * height bytes (checked by
        // fitting_size against the span's length), borrowed for 'a as well.
        let ran = check("nvjpegDecodeBatched", unsafe {
            (self.hw.decode)(
                self.handle,
                self.state,
                self.data.as_ptr(),
                self.lengths.as_ptr(),
                self.images.as_mut_ptr(),
                stream.cu_stream() as cudaStream_t,
            )
        });
        // Whatever the outcome, no decode may still read the items after we return.
        let synced = stream
            .synchronize()
            .map_err(|e| NvJpegError::Sync(e.to_string()));
        if ran.is_err() {
            // A failed batch leaves the state in an unknown phase: initialise it again.
            self.initialized = 0;
        }
        ran.and(synced)
    }
}

impl Drop for HardwareJpegDecoder {
    fn drop(&mut self) {
        // SAFETY: created in new() (or null and skipped), released once, the handle last.
        unsafe {
            if !self.stream.is_null() {
                (self.hw.stream_destroy)(self.stream);
            }
            if !self.state.is_null() {
                (self.api.state_destroy)(self.state);
            }
            (self.api.destroy)(self.handle);
        }
    }
}
