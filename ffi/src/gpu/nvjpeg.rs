//! nvJPEG decoders, the safe layer over [`crate::gpu::sys::nvjpeg`]: [`JpegDecoder`] (the
//! single-phase API) and [`SizedJpegDecoder`] (both decode paths behind one size rule). Every
//! size is checked before the raw call.

use std::ffi::c_int;

use thiserror::Error;

pub use crate::dl::DlError;
/// The loaded library's entry points (the raw table decoders are built on).
pub use crate::gpu::sys::nvjpeg::NvJpeg;
use crate::gpu::sys::nvjpeg::*;

#[derive(Debug, Error)]
pub enum NvJpegError {
    #[error(transparent)]
    Load(#[from] DlError),
    #[error("{call} failed: nvjpeg status {status} ({})", status_name(*.status))]
    Call { call: &'static str, status: c_int },
    #[error("JPEG of {width}x{height} does not fit the {capacity}-byte decode buffer")]
    TooLarge {
        width: usize,
        height: usize,
        capacity: usize,
    },
    #[error("synchronising the CUDA context: {0}")]
    Sync(String),
    #[error("JPEG is {width}x{height} with {components} components: not an RGB/gray image nvJPEG can decode here")]
    Unsupported {
        width: i32,
        height: i32,
        components: i32,
    },
}

/// nvjpegStatus_t names from nvjpeg.h.
pub fn status_name(status: c_int) -> &'static str {
    match status {
        0 => "SUCCESS",
        1 => "NOT_INITIALIZED",
        2 => "INVALID_PARAMETER",
        3 => "BAD_JPEG",
        4 => "JPEG_NOT_SUPPORTED",
        5 => "ALLOCATOR_FAILURE",
        6 => "EXECUTION_FAILED",
        7 => "ARCH_MISMATCH",
        8 => "INTERNAL_ERROR",
        9 => "IMPLEMENTATION_NOT_SUPPORTED",
        10 => "INCOMPLETE_BITSTREAM",
        _ => "unknown",
    }
}

pub(crate) fn check(call: &'static str, status: nvjpegStatus_t) -> Result<(), NvJpegError> {
    if status == NVJPEG_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(NvJpegError::Call { call, status })
    }
}

/// A decoder: one nvJPEG handle and decode state, used by one thread.
pub struct JpegDecoder {
    api: &'static NvJpeg,
    handle: nvjpegHandle_t,
    state: nvjpegJpegState_t,
}

// SAFETY: nvJPEG handles and states may be used from any thread, one at a time; the decoder is
// not Sync, so no two threads use it at once.
unsafe impl Send for JpegDecoder {}

impl JpegDecoder {
    /// Creates the handle (default backend) and a decode state. Needs a current CUDA context.
    pub fn new(api: &'static NvJpeg) -> Result<JpegDecoder, NvJpegError> {
        let mut handle = std::ptr::null_mut();
        // SAFETY: out-pointer to a local.
        check("nvjpegCreateSimple", unsafe {
            (api.create_simple)(&mut handle)
        })?;
        let mut state = std::ptr::null_mut();
        // SAFETY: handle was just created; out-pointer to a local.
        if let Err(e) = check("nvjpegJpegStateCreate", unsafe {
            (api.state_create)(handle, &mut state)
        }) {
            // SAFETY: handle is valid and not used after this.
            unsafe { (api.destroy)(handle) };
            return Err(e);
        }
        Ok(JpegDecoder { api, handle, state })
    }

    /// (components, width, height) of a JPEG, from its headers only.
    pub fn image_info(&self, jpeg: &[u8]) -> Result<(i32, i32, i32), NvJpegError> {
        image_info(self.api, self.handle, jpeg)
    }

    /// Replaces the decode state with a fresh one, releasing the host and device buffers
    /// nvJPEG grew inside it for the largest image decoded so far. `ctx` is the context the
    /// decoder was made in (current on this thread): it is synchronised first, so no decode
    /// on any of its streams still uses the old state. On failure the old state stays.
    pub fn reset_state(&mut self, ctx: &super::cuda::cu::CudaContext) -> Result<(), NvJpegError> {
        ctx.synchronize()
            .map_err(|e| NvJpegError::Sync(e.to_string()))?;
        let mut state = std::ptr::null_mut();
        // SAFETY: the handle is live; out-pointer to a local.
        check("nvjpegJpegStateCreate", unsafe {
            (self.api.state_create)(self.handle, &mut state)
        })?;
        let old = std::mem::replace(&mut self.state, state);
        // SAFETY: `old` was created on this handle and is no longer reachable: `&mut self`
        // rules out a decode starting with it, and the context synchronised above has no
        // decode left that uses it.
        unsafe { (self.api.state_destroy)(old) };
        Ok(())
    }

    /// Decodes `jpeg` to interleaved RGB at device address `dst` (row pitch `pitch` bytes),
    /// asynchronously on `stream`.
    ///
    /// # Safety
    /// `dst` must be device memory of at least `pitch * height` bytes, `pitch >= 3 * width`,
    /// valid until `stream` has finished the decode; `stream` must be a live CUDA stream of
    /// the current context.
    pub unsafe fn decode_rgbi(
        &mut self,
        jpeg: &[u8],
        dst: *mut u8,
        pitch: usize,
        stream: cudaStream_t,
    ) -> Result<(), NvJpegError> {
        let mut image = nvjpegImage_t {
            channel: [
                dst,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            ],
            pitch: [pitch, 0, 0, 0],
        };
        // SAFETY: the caller guarantees dst/pitch/stream; jpeg is a live slice and nvJPEG's
        // host phase reads it before returning.
        check("nvjpegDecode", unsafe {
            (self.api.decode)(
                self.handle,
                self.state,
                jpeg.as_ptr(),
                jpeg.len(),
                NVJPEG_OUTPUT_RGBI,
                &mut image,
                stream,
            )
        })
    }
}

impl JpegDecoder {
    /// Safe form of [`Self::decode_rgbi`]: decodes into `dst` (tightly packed RGB, pitch
    /// 3 * width) on `stream`, after checking that the image fits. Returns (width, height);
    /// the pixels are ready once the stream has run.
    pub fn decode_into(
        &mut self,
        jpeg: &[u8],
        stream: &std::sync::Arc<super::cuda::cu::CudaStream>,
        dst: &mut super::cuda::cu::CudaSlice<u8>,
    ) -> Result<(usize, usize), NvJpegError> {
        use super::cuda::cu::DevicePtrMut;
        let (width, height) = fitting_size(self.image_info(jpeg)?, dst.len())?;
        let (ptr, _sync) = dst.device_ptr_mut(stream);
        // SAFETY: dst is device memory of at least 3*width*height bytes (checked above) that
        // stays alive and unaliased while _sync orders the stream's later uses after this
        // decode; the stream belongs to dst's context.
        unsafe {
            self.decode_rgbi(
                jpeg,
                ptr as *mut u8,
                width * 3,
                stream.cu_stream() as cudaStream_t,
            )?;
        }
        Ok((width, height))
    }
}

impl JpegDecoder {
    /// As [`Self::decode_into`], into a span of device memory (one image's place in a
    /// buffer shared by a batch), and waits for the stream. Returns (width, height).
    pub fn decode_into_span(
        &mut self,
        jpeg: &[u8],
        stream: &std::sync::Arc<super::cuda::cu::CudaStream>,
        dst: super::resident::DeviceSpan<'_>,
    ) -> Result<(usize, usize), NvJpegError> {
        let (width, height) = fitting_size(self.image_info(jpeg)?, dst.len())?;
        // SAFETY: dst is live device memory (the span borrows its owner) of at least
        // 3*width*height bytes (checked above), and stays so until the wait below has seen
        // the decode finish; the stream belongs to the span's context.
        unsafe {
            self.decode_rgbi(
                jpeg,
                dst.addr() as *mut u8,
                width * 3,
                stream.cu_stream() as cudaStream_t,
            )?;
        }
        stream
            .synchronize()
            .map_err(|e| NvJpegError::Sync(e.to_string()))?;
        Ok((width, height))
    }
}

/// One backend's decoder, decode state and work buffers (decoupled API).
struct BackendStage {
    decoder: nvjpegJpegDecoder_t,
    state: nvjpegJpegState_t,
    pinned: nvjpegBufferPinned_t,
    device: nvjpegBufferDevice_t,
}

/// Both of nvJPEG's decode paths behind one size rule: the single-phase API (default
/// backend) below `gpu_from_pixels`, the decoupled API's GPU_HYBRID backend (GPU-assisted
/// Huffman) from there, falling back to the single-phase API for a stream GPU_HYBRID does not
/// take. `force` picks a path regardless of size. ffi/tests/nvjpeg_gpu.rs times both: on the
/// H100 the single-phase path won at 0.3 MP and at 12 MP, so the server keeps
/// [`JpegDecoder`] for every size; this stays for machines where the crossover differs. One
/// per thread.
pub struct SizedJpegDecoder {
    api: &'static NvJpeg,
    simple: JpegDecoder,
    dec: &'static Decoupled,
    handle: nvjpegHandle_t,
    stream: nvjpegJpegStream_t,
    params: nvjpegDecodeParams_t,
    gpu: Option<BackendStage>,
    gpu_from_pixels: usize,
}

// SAFETY: as for JpegDecoder: nvJPEG objects may move between threads and are used by one
// at a time (not Sync).
unsafe impl Send for SizedJpegDecoder {}

/// Which path decoded an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeBackend {
    /// `nvjpegDecode` (single phase, default backend: Huffman on the CPU).
    CpuHuffman,
    /// The decoupled API with NVJPEG_BACKEND_GPU_HYBRID (Huffman on the GPU).
    GpuHuffman,
}

impl SizedJpegDecoder {
    /// Needs a current CUDA context. GPU_HYBRID is optional: where it cannot be created every
    /// image takes the single-phase path.
    pub fn new(api: &'static NvJpeg, gpu_from_pixels: usize) -> Result<Self, NvJpegError> {
        let dec = api.decoupled.as_ref().ok_or(NvJpegError::Call {
            call: "nvjpegDecoderCreate (decoupled API missing in this libnvjpeg)",
            status: 9,
        })?;
        let simple = JpegDecoder::new(api)?;
        let mut handle = std::ptr::null_mut();
        // SAFETY: out-pointer to a local.
        check("nvjpegCreateSimple", unsafe {
            (api.create_simple)(&mut handle)
        })?;
        let mut this = SizedJpegDecoder {
            api,
            simple,
            dec,
            handle,
            stream: std::ptr::null_mut(),
            params: std::ptr::null_mut(),
            gpu: None,
            gpu_from_pixels,
        };
        // From here Drop releases whatever was created.
        // SAFETY: handle is live; out-pointers to fields.
        check("nvjpegJpegStreamCreate", unsafe {
            (dec.stream_create)(this.handle, &mut this.stream)
        })?;
        // SAFETY: as above.
        check("nvjpegDecodeParamsCreate", unsafe {
            (dec.params_create)(this.handle, &mut this.params)
        })?;
        // SAFETY: params was just created.
        check("nvjpegDecodeParamsSetOutputFormat", unsafe {
            (dec.params_set_output_format)(this.params, NVJPEG_OUTPUT_RGBI)
        })?;
        this.gpu = this.stage(NVJPEG_BACKEND_GPU_HYBRID).ok();
        Ok(this)
    }

    fn stage(&self, backend: nvjpegBackend_t) -> Result<BackendStage, NvJpegError> {
        let dec = self.dec;
        let mut st = BackendStage {
            decoder: std::ptr::null_mut(),
            state: std::ptr::null_mut(),
            pinned: std::ptr::null_mut(),
            device: std::ptr::null_mut(),
        };
        let result = (|| {
            // SAFETY: the handle is live; out-pointers to locals; null allocators mean the
            // library's defaults.
            unsafe {
                check(
                    "nvjpegDecoderCreate",
                    (dec.decoder_create)(self.handle, backend, &mut st.decoder),
                )?;
                check(
                    "nvjpegDecoderStateCreate",
                    (dec.decoder_state_create)(self.handle, st.decoder, &mut st.state),
                )?;
                check(
                    "nvjpegBufferPinnedCreate",
                    (dec.pinned_create)(self.handle, std::ptr::null_mut(), &mut st.pinned),
                )?;
                check(
                    "nvjpegBufferDeviceCreate",
                    (dec.device_create)(self.handle, std::ptr::null_mut(), &mut st.device),
                )?;
                check(
                    "nvjpegStateAttachPinnedBuffer",
                    (dec.attach_pinned)(st.state, st.pinned),
                )?;
                check(
                    "nvjpegStateAttachDeviceBuffer",
                    (dec.attach_device)(st.state, st.device),
                )
            }
        })();
        match result {
            Ok(()) => Ok(st),
            Err(e) => {
                self.release(&st);
                Err(e)
            }
        }
    }

    fn release(&self, st: &BackendStage) {
        let dec = self.dec;
        // SAFETY: each object was created by this decoder (or is null and skipped) and is
        // released once, the state before its buffers and decoder.
        unsafe {
            if !st.state.is_null() {
                (self.api.state_destroy)(st.state);
            }
            if !st.pinned.is_null() {
                (dec.pinned_destroy)(st.pinned);
            }
            if !st.device.is_null() {
                (dec.device_destroy)(st.device);
            }
            if !st.decoder.is_null() {
                (dec.decoder_destroy)(st.decoder);
            }
        }
    }

    /// Whether images of `gpu_from_pixels` and more get GPU Huffman decoding here.
    pub fn has_gpu_backend(&self) -> bool {
        self.gpu.is_some()
    }

    /// (components, width, height) from the headers.
    pub fn image_info(&self, jpeg: &[u8]) -> Result<(i32, i32, i32), NvJpegError> {
        image_info(self.api, self.handle, jpeg)
    }

    /// Decodes `jpeg` into `dst` (tightly packed RGB) on `stream` with the backend its size
    /// picks (or `force`), after checking that it fits. Returns (width, height, backend).
    pub fn decode_into(
        &mut self,
        jpeg: &[u8],
        stream: &std::sync::Arc<super::cuda::cu::CudaStream>,
        dst: &mut super::cuda::cu::CudaSlice<u8>,
        force: Option<DecodeBackend>,
    ) -> Result<(usize, usize, DecodeBackend), NvJpegError> {
        use super::cuda::cu::DevicePtrMut;
        let (width, height) = fitting_size(self.image_info(jpeg)?, dst.len())?;
        let want = force.unwrap_or(if width * height >= self.gpu_from_pixels {
            DecodeBackend::GpuHuffman
        } else {
            DecodeBackend::CpuHuffman
        });
        let gpu = match (&self.gpu, want) {
            (Some(gpu), DecodeBackend::GpuHuffman) => gpu,
            _ => {
                let (w, h) = self.simple.decode_into(jpeg, stream, dst)?;
                return Ok((w, h, DecodeBackend::CpuHuffman));
            }
        };
        // SAFETY: jpeg is a live slice of the length passed; the stream object is ours.
        check("nvjpegJpegStreamParse", unsafe {
            (self.dec.stream_parse)(self.handle, jpeg.as_ptr(), jpeg.len(), 0, 0, self.stream)
        })?;
        let (ptr, _sync) = dst.device_ptr_mut(stream);
        let mut image = nvjpegImage_t {
            channel: [
                ptr as *mut u8,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            ],
            pitch: [width * 3, 0, 0, 0],
        };
        let cu_stream = stream.cu_stream() as cudaStream_t;
        // SAFETY: dst holds at least 3*width*height bytes (checked above) and stays alive and
        // unaliased while _sync orders the stream's later uses after this decode; the parsed
        // stream, params and stage objects are this decoder's.
        let ran = check("nvjpegDecodeJpeg", unsafe {
            (self.dec.decode_jpeg)(
                self.handle,
                gpu.decoder,
                gpu.state,
                self.stream,
                &mut image,
                self.params,
                cu_stream,
            )
        });
        drop(_sync);
        match ran {
            Ok(()) => Ok((width, height, DecodeBackend::GpuHuffman)),
            // JPEG_NOT_SUPPORTED / IMPLEMENTATION_NOT_SUPPORTED: the CPU Huffman path can.
            Err(NvJpegError::Call { status: 4 | 9, .. }) => {
                let (w, h) = self.simple.decode_into(jpeg, stream, dst)?;
                Ok((w, h, DecodeBackend::CpuHuffman))
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for SizedJpegDecoder {
    fn drop(&mut self) {
        if let Some(st) = self.gpu.take() {
            self.release(&st);
        }
        // SAFETY: created in new() (or null and skipped), released once, the handle last.
        unsafe {
            if !self.params.is_null() {
                (self.dec.params_destroy)(self.params);
            }
            if !self.stream.is_null() {
                (self.dec.stream_destroy)(self.stream);
            }
            (self.api.destroy)(self.handle);
        }
    }
}

/// (width, height) of an image nvJPEG reported as (components, width, height), once it is
/// known to be RGB or grey and to fit `capacity` bytes of packed RGB.
pub(crate) fn fitting_size(
    (components, w, h): (i32, i32, i32),
    capacity: usize,
) -> Result<(usize, usize), NvJpegError> {
    let (width, height) = (w.max(0) as usize, h.max(0) as usize);
    if !(components == 1 || components == 3) || width == 0 || height == 0 {
        return Err(NvJpegError::Unsupported {
            width: w,
            height: h,
            components,
        });
    }
    if capacity < width * height * 3 {
        return Err(NvJpegError::TooLarge {
            width,
            height,
            capacity,
        });
    }
    Ok((width, height))
}

/// `nvjpegGetImageInfo` on `handle`.
pub(crate) fn image_info(
    api: &NvJpeg,
    handle: nvjpegHandle_t,
    jpeg: &[u8],
) -> Result<(i32, i32, i32), NvJpegError> {
    let mut components = 0;
    let mut subsampling = 0;
    let mut widths = [0 as c_int; NVJPEG_MAX_COMPONENT];
    let mut heights = [0 as c_int; NVJPEG_MAX_COMPONENT];
    // SAFETY: jpeg is a live slice of the length passed; the width/height arrays hold
    // NVJPEG_MAX_COMPONENT entries as the API requires; handle is live.
    check("nvjpegGetImageInfo", unsafe {
        (api.get_image_info)(
            handle,
            jpeg.as_ptr(),
            jpeg.len(),
            &mut components,
            &mut subsampling,
            widths.as_mut_ptr(),
            heights.as_mut_ptr(),
        )
    })?;
    Ok((components, widths[0], heights[0]))
}

impl Drop for JpegDecoder {
    fn drop(&mut self) {
        // SAFETY: both were created in new() and are released once, state first.
        unsafe {
            (self.api.state_destroy)(self.state);
            (self.api.destroy)(self.handle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_names_itself() {
        let err = NvJpeg::load_from(&["libnvjpeg.so.999"])
            .err()
            .map(|e| e.to_string());
        let text = err.unwrap_or_default();
        assert!(text.contains("libnvjpeg.so.999"), "{text}");
    }

    #[test]
    fn status_names_follow_the_header() {
        assert_eq!(status_name(3), "BAD_JPEG");
        assert_eq!(status_name(10), "INCOMPLETE_BITSTREAM");
        assert_eq!(status_name(77), "unknown");
    }
}
