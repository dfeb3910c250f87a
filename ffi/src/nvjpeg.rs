//! nvJPEG, written by hand and loaded at run time (libnvjpeg.so.13, then .12): no build-time
//! CUDA dependency, and a machine without it gets an error naming the library.
//!
//! Mirrors of nvjpeg.h (CUDA 12/13): handles are opaque pointers, `nvjpegImage_t` is four
//! channel pointers and four pitches. The layout is checked against the real header by
//! `ffi/tests/nvjpeg_gpu.rs` wherever the header exists (the GPU machine).

#![allow(non_camel_case_types)]

use std::ffi::{c_int, c_uchar, c_void};
use std::sync::OnceLock;

use thiserror::Error;

pub use crate::dl::DlError;
use crate::dl::Library;

pub const NVJPEG_MAX_COMPONENT: usize = 4;
pub type nvjpegStatus_t = c_int;
pub const NVJPEG_STATUS_SUCCESS: nvjpegStatus_t = 0;
pub type nvjpegOutputFormat_t = c_int;
/// Interleaved RGB in channel[0] (what the preprocessing kernel reads).
pub const NVJPEG_OUTPUT_RGBI: nvjpegOutputFormat_t = 5;
pub type nvjpegChromaSubsampling_t = c_int;

#[repr(C)]
pub struct nvjpegHandle {
    _opaque: [u8; 0],
}
#[repr(C)]
pub struct nvjpegJpegState {
    _opaque: [u8; 0],
}
pub type nvjpegHandle_t = *mut nvjpegHandle;
pub type nvjpegJpegState_t = *mut nvjpegJpegState;
/// `cudaStream_t`, the same object as the driver API's `CUstream`.
pub type cudaStream_t = *mut c_void;

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct nvjpegImage_t {
    pub channel: [*mut c_uchar; NVJPEG_MAX_COMPONENT],
    pub pitch: [usize; NVJPEG_MAX_COMPONENT],
}

type CreateSimple = unsafe extern "C" fn(*mut nvjpegHandle_t) -> nvjpegStatus_t;
type Destroy = unsafe extern "C" fn(nvjpegHandle_t) -> nvjpegStatus_t;
type StateCreate = unsafe extern "C" fn(nvjpegHandle_t, *mut nvjpegJpegState_t) -> nvjpegStatus_t;
type StateDestroy = unsafe extern "C" fn(nvjpegJpegState_t) -> nvjpegStatus_t;
type GetImageInfo = unsafe extern "C" fn(
    nvjpegHandle_t,
    *const c_uchar,
    usize,
    *mut c_int,
    *mut nvjpegChromaSubsampling_t,
    *mut c_int,
    *mut c_int,
) -> nvjpegStatus_t;
type Decode = unsafe extern "C" fn(
    nvjpegHandle_t,
    nvjpegJpegState_t,
    *const c_uchar,
    usize,
    nvjpegOutputFormat_t,
    *mut nvjpegImage_t,
    cudaStream_t,
) -> nvjpegStatus_t;

/// The resolved entry points.
pub struct NvJpeg {
    create_simple: CreateSimple,
    destroy: Destroy,
    state_create: StateCreate,
    state_destroy: StateDestroy,
    get_image_info: GetImageInfo,
    decode: Decode,
    lib: Library,
}

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

fn check(call: &'static str, status: nvjpegStatus_t) -> Result<(), NvJpegError> {
    if status == NVJPEG_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(NvJpegError::Call { call, status })
    }
}

const SONAMES: &[&str] = &["libnvjpeg.so.13", "libnvjpeg.so.12"];
const PACKAGE: &str = "the CUDA toolkit's nvJPEG (libnvjpeg)";

impl NvJpeg {
    /// Loads libnvjpeg once per process.
    pub fn load() -> Result<&'static NvJpeg, DlError> {
        static CELL: OnceLock<Result<NvJpeg, DlError>> = OnceLock::new();
        CELL.get_or_init(|| Self::load_from(SONAMES))
            .as_ref()
            .map_err(Clone::clone)
    }

    pub fn load_from(sonames: &[&'static str]) -> Result<NvJpeg, DlError> {
        let lib = Library::open(sonames, PACKAGE)?;
        // SAFETY: each alias above is the prototype of the same-named function in nvjpeg.h;
        // nvJPEG exports unversioned symbols.
        unsafe {
            Ok(NvJpeg {
                create_simple: lib.sym("nvjpegCreateSimple", None)?,
                destroy: lib.sym("nvjpegDestroy", None)?,
                state_create: lib.sym("nvjpegJpegStateCreate", None)?,
                state_destroy: lib.sym("nvjpegJpegStateDestroy", None)?,
                get_image_info: lib.sym("nvjpegGetImageInfo", None)?,
                decode: lib.sym("nvjpegDecode", None)?,
                lib,
            })
        }
    }

    pub fn soname(&self) -> &'static str {
        self.lib.soname()
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
        let mut components = 0;
        let mut subsampling = 0;
        let mut widths = [0 as c_int; NVJPEG_MAX_COMPONENT];
        let mut heights = [0 as c_int; NVJPEG_MAX_COMPONENT];
        // SAFETY: jpeg is a live slice of the length passed; the width/height arrays hold
        // NVJPEG_MAX_COMPONENT entries as the API requires.
        check("nvjpegGetImageInfo", unsafe {
            (self.api.get_image_info)(
                self.handle,
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
        stream: &std::sync::Arc<crate::cuda::cu::CudaStream>,
        dst: &mut crate::cuda::cu::CudaSlice<u8>,
    ) -> Result<(usize, usize), NvJpegError> {
        use crate::cuda::cu::DevicePtrMut;
        let (components, w, h) = self.image_info(jpeg)?;
        let (width, height) = (w.max(0) as usize, h.max(0) as usize);
        if !(components == 1 || components == 3) || width == 0 || height == 0 {
            return Err(NvJpegError::Unsupported {
                width: w,
                height: h,
                components,
            });
        }
        if dst.len() < width * height * 3 {
            return Err(NvJpegError::TooLarge {
                width,
                height,
                capacity: dst.len(),
            });
        }
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
