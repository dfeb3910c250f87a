//! The raw nvJPEG layer, written by hand and loaded at run time (libnvjpeg.so.13, then .12):
//! no build-time CUDA dependency, and a machine without it gets an error naming the library.
//! The safe decoders over it are in [`crate::gpu::nvjpeg`].
//!
//! Mirrors of nvjpeg.h (CUDA 12/13): handles are opaque pointers, `nvjpegImage_t` is four
//! channel pointers and four pitches. The layout is checked against the real header by
//! `ffi/tests/nvjpeg_gpu.rs` wherever the header exists (the GPU machine).

#![allow(non_camel_case_types)]

use std::ffi::{c_int, c_uchar, c_uint, c_void};
use std::sync::OnceLock;

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
/// Opaque handles of the decoupled API (decoder per backend, parsed stream, output
/// parameters, pinned and device work buffers).
pub type nvjpegJpegDecoder_t = *mut c_void;
pub type nvjpegJpegStream_t = *mut c_void;
pub type nvjpegDecodeParams_t = *mut c_void;
pub type nvjpegBufferPinned_t = *mut c_void;
pub type nvjpegBufferDevice_t = *mut c_void;
pub type nvjpegBackend_t = c_int;
/// CPU Huffman decoding (best for small images).
pub const NVJPEG_BACKEND_HYBRID: nvjpegBackend_t = 1;
/// GPU-assisted Huffman decoding (decoupled API; pays off on large images).
pub const NVJPEG_BACKEND_GPU_HYBRID: nvjpegBackend_t = 2;
/// The NVJPG hardware engines (A100, H100, H200), through the batched API only; baseline
/// JPEGs only, each checked with `nvjpegDecodeBatchedSupported` first.
pub const NVJPEG_BACKEND_HARDWARE: nvjpegBackend_t = 3;
/// `cudaStream_t`, the same object as the driver API's `CUstream`.
pub type cudaStream_t = *mut c_void;

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct nvjpegImage_t {
    pub channel: [*mut c_uchar; NVJPEG_MAX_COMPONENT],
    pub pitch: [usize; NVJPEG_MAX_COMPONENT],
}

pub type CreateSimple = unsafe extern "C" fn(*mut nvjpegHandle_t) -> nvjpegStatus_t;
pub type Destroy = unsafe extern "C" fn(nvjpegHandle_t) -> nvjpegStatus_t;
/// `nvjpegGetProperty(libraryPropertyType type, int *value)`: 0 = major, 1 = minor, 2 = patch.
pub type GetProperty = unsafe extern "C" fn(c_int, *mut c_int) -> nvjpegStatus_t;
pub type StateCreate =
    unsafe extern "C" fn(nvjpegHandle_t, *mut nvjpegJpegState_t) -> nvjpegStatus_t;
pub type StateDestroy = unsafe extern "C" fn(nvjpegJpegState_t) -> nvjpegStatus_t;
pub type GetImageInfo = unsafe extern "C" fn(
    nvjpegHandle_t,
    *const c_uchar,
    usize,
    *mut c_int,
    *mut nvjpegChromaSubsampling_t,
    *mut c_int,
    *mut c_int,
) -> nvjpegStatus_t;
pub type Decode = unsafe extern "C" fn(
    nvjpegHandle_t,
    nvjpegJpegState_t,
    *const c_uchar,
    usize,
    nvjpegOutputFormat_t,
    *mut nvjpegImage_t,
    cudaStream_t,
) -> nvjpegStatus_t;

pub type DecoderCreate = unsafe extern "C" fn(
    nvjpegHandle_t,
    nvjpegBackend_t,
    *mut nvjpegJpegDecoder_t,
) -> nvjpegStatus_t;
pub type DecoderDestroy = unsafe extern "C" fn(nvjpegJpegDecoder_t) -> nvjpegStatus_t;
pub type DecoderStateCreate = unsafe extern "C" fn(
    nvjpegHandle_t,
    nvjpegJpegDecoder_t,
    *mut nvjpegJpegState_t,
) -> nvjpegStatus_t;
pub type StreamCreate =
    unsafe extern "C" fn(nvjpegHandle_t, *mut nvjpegJpegStream_t) -> nvjpegStatus_t;
pub type StreamDestroy = unsafe extern "C" fn(nvjpegJpegStream_t) -> nvjpegStatus_t;
pub type StreamParse = unsafe extern "C" fn(
    nvjpegHandle_t,
    *const c_uchar,
    usize,
    c_int,
    c_int,
    nvjpegJpegStream_t,
) -> nvjpegStatus_t;
pub type ParamsCreate =
    unsafe extern "C" fn(nvjpegHandle_t, *mut nvjpegDecodeParams_t) -> nvjpegStatus_t;
pub type ParamsDestroy = unsafe extern "C" fn(nvjpegDecodeParams_t) -> nvjpegStatus_t;
pub type ParamsSetOutputFormat =
    unsafe extern "C" fn(nvjpegDecodeParams_t, nvjpegOutputFormat_t) -> nvjpegStatus_t;
pub type PinnedCreate =
    unsafe extern "C" fn(nvjpegHandle_t, *mut c_void, *mut nvjpegBufferPinned_t) -> nvjpegStatus_t;
pub type PinnedDestroy = unsafe extern "C" fn(nvjpegBufferPinned_t) -> nvjpegStatus_t;
pub type DeviceCreate =
    unsafe extern "C" fn(nvjpegHandle_t, *mut c_void, *mut nvjpegBufferDevice_t) -> nvjpegStatus_t;
pub type DeviceDestroy = unsafe extern "C" fn(nvjpegBufferDevice_t) -> nvjpegStatus_t;
pub type AttachPinned =
    unsafe extern "C" fn(nvjpegJpegState_t, nvjpegBufferPinned_t) -> nvjpegStatus_t;
pub type AttachDevice =
    unsafe extern "C" fn(nvjpegJpegState_t, nvjpegBufferDevice_t) -> nvjpegStatus_t;
pub type DecodeJpeg = unsafe extern "C" fn(
    nvjpegHandle_t,
    nvjpegJpegDecoder_t,
    nvjpegJpegState_t,
    nvjpegJpegStream_t,
    *mut nvjpegImage_t,
    nvjpegDecodeParams_t,
    cudaStream_t,
) -> nvjpegStatus_t;

/// `nvjpegCreateEx(backend, dev_allocator, pinned_allocator, flags, handle)`; null
/// allocators mean the library's own.
pub type CreateEx = unsafe extern "C" fn(
    nvjpegBackend_t,
    *mut c_void,
    *mut c_void,
    c_uint,
    *mut nvjpegHandle_t,
) -> nvjpegStatus_t;
/// `nvjpegJpegStreamParseHeader(handle, data, length, jpeg_stream)`: headers only.
pub type StreamParseHeader = unsafe extern "C" fn(
    nvjpegHandle_t,
    *const c_uchar,
    usize,
    nvjpegJpegStream_t,
) -> nvjpegStatus_t;
/// `nvjpegDecodeBatchedSupported(handle, jpeg_stream, is_supported)`: 0 in `is_supported`
/// means the handle's backend (the hardware one) can decode the parsed stream.
pub type DecodeBatchedSupported =
    unsafe extern "C" fn(nvjpegHandle_t, nvjpegJpegStream_t, *mut c_int) -> nvjpegStatus_t;
/// `nvjpegDecodeBatchedInitialize(handle, state, batch_size, max_cpu_threads, format)`.
pub type DecodeBatchedInitialize = unsafe extern "C" fn(
    nvjpegHandle_t,
    nvjpegJpegState_t,
    c_int,
    c_int,
    nvjpegOutputFormat_t,
) -> nvjpegStatus_t;
/// `nvjpegDecodeBatched(handle, state, data[], lengths[], destinations[], stream)`.
pub type DecodeBatched = unsafe extern "C" fn(
    nvjpegHandle_t,
    nvjpegJpegState_t,
    *const *const c_uchar,
    *const usize,
    *mut nvjpegImage_t,
    cudaStream_t,
) -> nvjpegStatus_t;
/// `nvjpegGetHardwareDecoderInfo(handle, num_engines, num_cores_per_engine)`.
pub type GetHardwareDecoderInfo =
    unsafe extern "C" fn(nvjpegHandle_t, *mut c_uint, *mut c_uint) -> nvjpegStatus_t;

/// The batched API with the hardware backend, resolved where the library has it.
pub struct Batched {
    pub(crate) create_ex: CreateEx,
    pub(crate) parse_header: StreamParseHeader,
    pub(crate) supported: DecodeBatchedSupported,
    pub(crate) initialize: DecodeBatchedInitialize,
    pub(crate) decode: DecodeBatched,
    pub(crate) stream_create: StreamCreate,
    pub(crate) stream_destroy: StreamDestroy,
    /// Only for the log line naming the engines; None where a library lacks it.
    pub(crate) hardware_info: Option<GetHardwareDecoderInfo>,
}

/// The decoupled decode API (a decoder per backend), resolved where the library has it.
pub struct Decoupled {
    pub(crate) decoder_create: DecoderCreate,
    pub(crate) decoder_destroy: DecoderDestroy,
    pub(crate) decoder_state_create: DecoderStateCreate,
    pub(crate) stream_create: StreamCreate,
    pub(crate) stream_destroy: StreamDestroy,
    pub(crate) stream_parse: StreamParse,
    pub(crate) params_create: ParamsCreate,
    pub(crate) params_destroy: ParamsDestroy,
    pub(crate) params_set_output_format: ParamsSetOutputFormat,
    pub(crate) pinned_create: PinnedCreate,
    pub(crate) pinned_destroy: PinnedDestroy,
    pub(crate) device_create: DeviceCreate,
    pub(crate) device_destroy: DeviceDestroy,
    pub(crate) attach_pinned: AttachPinned,
    pub(crate) attach_device: AttachDevice,
    pub(crate) decode_jpeg: DecodeJpeg,
}

/// The resolved entry points.
pub struct NvJpeg {
    pub(crate) create_simple: CreateSimple,
    pub(crate) destroy: Destroy,
    pub(crate) state_create: StateCreate,
    pub(crate) state_destroy: StateDestroy,
    pub(crate) get_image_info: GetImageInfo,
    pub(crate) decode: Decode,
    /// None where this libnvjpeg lacks the decoupled API (then one backend serves all sizes).
    pub(crate) decoupled: Option<Decoupled>,
    /// None where this libnvjpeg lacks the batched API or nvjpegCreateEx.
    pub(crate) batched: Option<Batched>,
    /// Only for `--check`'s version line; None where a library lacks it.
    pub(crate) get_property: Option<GetProperty>,
    pub(crate) lib: Library,
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
                decoupled: Self::decoupled(&lib),
                batched: Self::batched(&lib),
                get_property: lib.sym_opt("nvjpegGetProperty", None),
                lib,
            })
        }
    }

    /// The decoupled API's entry points, all or nothing.
    ///
    /// # Safety
    /// As for `load_from`: each alias is the prototype of the same-named nvjpeg.h function.
    unsafe fn decoupled(lib: &Library) -> Option<Decoupled> {
        // SAFETY: the caller's contract (prototypes match nvjpeg.h).
        unsafe {
            Some(Decoupled {
                decoder_create: lib.sym_opt("nvjpegDecoderCreate", None)?,
                decoder_destroy: lib.sym_opt("nvjpegDecoderDestroy", None)?,
                decoder_state_create: lib.sym_opt("nvjpegDecoderStateCreate", None)?,
                stream_create: lib.sym_opt("nvjpegJpegStreamCreate", None)?,
                stream_destroy: lib.sym_opt("nvjpegJpegStreamDestroy", None)?,
                stream_parse: lib.sym_opt("nvjpegJpegStreamParse", None)?,
                params_create: lib.sym_opt("nvjpegDecodeParamsCreate", None)?,
                params_destroy: lib.sym_opt("nvjpegDecodeParamsDestroy", None)?,
                params_set_output_format: lib.sym_opt("nvjpegDecodeParamsSetOutputFormat", None)?,
                pinned_create: lib.sym_opt("nvjpegBufferPinnedCreate", None)?,
                pinned_destroy: lib.sym_opt("nvjpegBufferPinnedDestroy", None)?,
                device_create: lib.sym_opt("nvjpegBufferDeviceCreate", None)?,
                device_destroy: lib.sym_opt("nvjpegBufferDeviceDestroy", None)?,
                attach_pinned: lib.sym_opt("nvjpegStateAttachPinnedBuffer", None)?,
                attach_device: lib.sym_opt("nvjpegStateAttachDeviceBuffer", None)?,
                decode_jpeg: lib.sym_opt("nvjpegDecodeJpeg", None)?,
            })
        }
    }

    /// The batched API's entry points, all or nothing (but the hardware-info query).
    ///
    /// # Safety
    /// As for `load_from`: each alias is the prototype of the same-named nvjpeg.h function.
    unsafe fn batched(lib: &Library) -> Option<Batched> {
        // SAFETY: the caller's contract (prototypes match nvjpeg.h).
        unsafe {
            Some(Batched {
                create_ex: lib.sym_opt("nvjpegCreateEx", None)?,
                parse_header: lib.sym_opt("nvjpegJpegStreamParseHeader", None)?,
                supported: lib.sym_opt("nvjpegDecodeBatchedSupported", None)?,
                initialize: lib.sym_opt("nvjpegDecodeBatchedInitialize", None)?,
                decode: lib.sym_opt("nvjpegDecodeBatched", None)?,
                stream_create: lib.sym_opt("nvjpegJpegStreamCreate", None)?,
                stream_destroy: lib.sym_opt("nvjpegJpegStreamDestroy", None)?,
                hardware_info: lib.sym_opt("nvjpegGetHardwareDecoderInfo", None),
            })
        }
    }

    pub fn soname(&self) -> &'static str {
        self.lib.soname()
    }

    /// The library's version (major, minor, patch) from nvjpegGetProperty, where it has it.
    pub fn version(&self) -> Option<(i32, i32, i32)> {
        let get = self.get_property?;
        let mut parts = [0 as c_int; 3];
        for (kind, part) in parts.iter_mut().enumerate() {
            // SAFETY: get is nvjpegGetProperty with its nvjpeg.h prototype; kind is one of the
            // three libraryPropertyType values and part a live int it writes.
            let status = unsafe { get(kind as c_int, part) };
            if status != NVJPEG_STATUS_SUCCESS {
                return None;
            }
        }
        Some((parts[0], parts[1], parts[2]))
    }
}
