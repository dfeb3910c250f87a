//! cuDNN and cuBLAS through cudarc (loaded at run time): the few layer launches the GPU engine
//! needs, each a safe wrapper that checks every buffer size before the `unsafe` launch.
//!
//! * [`GpuDevice`]: one CUDA context with cudarc's event tracking turned off, and a stream to
//!   upload weights (shared, read-only, by every session of a loader).
//! * [`Handles`]: one session's stream with its own cuDNN and cuBLAS handles bound to it.
//! * [`ConvLayer`]: `cudnnConvolutionBiasActivationForward`, y = act(conv(x, w) + alpha2 * z + b)
//!   with act RELU or IDENTITY and an optional residual input z.
//! * [`PoolLayer`]: `cudnnPoolingForward`, max pooling or a global average.
//! * [`GemmLayer`]: y = x * w^T + b (ONNX Gemm with transB = 1) with `cublasSgemm`.
//!
//! cuDNN handles are not thread-safe; cudarc marks them `!Send`. Everything here that holds one
//! is `Send` (not `Sync`): each launch takes `&mut Handles` of the very handle the layer was built
//! with (checked), so two threads can never use one handle at the same time.

use std::sync::Arc;

use cudarc::cublas::{self, CudaBlas, Gemm, GemmConfig};
use cudarc::cudnn::{
    self, sys as dnn, ActivationDescriptor, ConvBiasActivationForward, ConvDescriptor, ConvForward,
    Cudnn, FilterDescriptor, PoolingDescriptor, PoolingForward, TensorDescriptor,
};
use cudarc::driver::{DevicePtr, PushKernelArg};
use thiserror::Error;

use super::cuda::{self, cu, CudaError};
use super::transfer::{count_d2h, count_h2d, Mover};

pub use cudarc::cudnn::sys::cudnnConvolutionFwdAlgo_t as ConvAlgo;

/// An IEEE half-precision value as stored on the GPU (the bits; host conversion through the
/// `half` crate). Own type, so cudarc's "f16" feature (which changes `half`'s features for the
/// whole workspace) is not needed.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub struct f16(pub u16);

impl f16 {
    pub const ZERO: f16 = f16(0);

    pub fn from_f32(v: f32) -> Self {
        f16(half::f16::from_f32(v).to_bits())
    }

    pub fn from_f64(v: f64) -> Self {
        f16(half::f16::from_f64(v).to_bits())
    }

    pub fn to_f32(self) -> f32 {
        half::f16::from_bits(self.0).to_f32()
    }
}

// SAFETY: repr(transparent) over u16, a plain 2-byte value with no padding or invalid bit
// patterns; this is exactly what the GPU kernels and cuDNN (CUDNN_DATA_HALF) read and write.
unsafe impl cu::DeviceRepr for f16 {}
// SAFETY: all-zero bits are +0.0 in IEEE half precision.
unsafe impl cu::ValidAsZeroBits for f16 {}

impl cudnn::CudnnDataType for f16 {
    const DATA_TYPE: dnn::cudnnDataType_t = dnn::cudnnDataType_t::CUDNN_DATA_HALF;
    /// cuDNN takes alpha/beta as float for half data (as cudarc does for half::f16).
    type Scalar = f32;
    fn into_scaling_parameter(self) -> f32 {
        self.to_f32()
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for super::f16 {}
}

/// Element type of activations and conv weights: f32 in NCHW (KCRS filters), or f16 in NHWC
/// (KRSC filters), the layout cuDNN's FP16 tensor-core kernels run on directly.
pub trait Elem:
    sealed::Sealed
    + cudnn::CudnnDataType
    + cu::DeviceRepr
    + cu::ValidAsZeroBits
    + Copy
    + Send
    + Sync
    + Unpin
    + std::fmt::Debug
    + 'static
{
    /// Memory layout of tensors and filters of this type.
    const FORMAT: dnn::cudnnTensorFormat_t;
    /// A scaling factor (alpha/beta) in this type (exact for the 0 and 1 used here).
    fn from_f64(v: f64) -> Self;
}

impl Elem for f32 {
    const FORMAT: dnn::cudnnTensorFormat_t = dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Elem for f16 {
    const FORMAT: dnn::cudnnTensorFormat_t = dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
    fn from_f64(v: f64) -> Self {
        f16::from_f64(v)
    }
}

#[derive(Debug, Error)]
pub enum GpuOpsError {
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error("cuDNN unavailable: libcudnn.so.9 not found")]
    NoCudnn,
    #[error("cuBLAS unavailable: libcublas.so.13 not found")]
    NoCublas,
    #[error("cuDNN {call} failed: {err:?}")]
    Cudnn {
        call: &'static str,
        err: cudnn::CudnnError,
    },
    #[error("cuBLAS {call} failed: {err:?}")]
    Cublas {
        call: &'static str,
        err: cublas::result::CublasError,
    },
    #[error("bad layer geometry: {0}")]
    Geometry(String),
    #[error("layer launched with the handles of another session")]
    ForeignHandles,
}

impl From<cu::DriverError> for GpuOpsError {
    fn from(e: cu::DriverError) -> Self {
        GpuOpsError::Cuda(CudaError::Driver(e))
    }
}

impl GpuOpsError {
    /// True for cuDNN's CUDNN_STATUS_NOT_SUPPORTED family (3000..3999 in cuDNN 9): the algorithm
    /// or fusion is not available for these descriptors, another algorithm may be.
    pub fn is_not_supported(&self) -> bool {
        matches!(self, GpuOpsError::Cudnn { err, .. } if (err.0 as u32) / 1000 == 3)
    }

    /// True for any status cuDNN returned (as opposed to driver, size or handle errors).
    pub fn is_cudnn(&self) -> bool {
        matches!(self, GpuOpsError::Cudnn { .. })
    }
}

fn dnn_err(call: &'static str) -> impl FnOnce(cudnn::CudnnError) -> GpuOpsError {
    move |err| GpuOpsError::Cudnn { call, err }
}

fn geometry<T>(msg: String) -> Result<T, GpuOpsError> {
    Err(GpuOpsError::Geometry(msg))
}

/// Checks for the driver, cuDNN and cuBLAS, without loading anything else: cudarc panics on a
/// missing library, so this must come before any other call here.
pub fn available() -> Result<(), GpuOpsError> {
    if !cuda::driver_present() {
        return Err(GpuOpsError::Cuda(CudaError::NoDriver));
    }
    // SAFETY: only tries to dlopen libcudnn by name and drops it; no symbol is called.
    if !unsafe { cudnn::sys::is_culib_present() } {
        return Err(GpuOpsError::NoCudnn);
    }
    // SAFETY: as above, a dlopen probe of libcublas only.
    if !unsafe { cublas::sys::is_culib_present() } {
        return Err(GpuOpsError::NoCublas);
    }
    Ok(())
}

/// Math allowed in convolutions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvMath {
    /// CUDNN_FMA_MATH: plain FP32 FMA kernels, no tensor cores (closest to the CPU result).
    Fp32,
    /// CUDNN_DEFAULT_MATH: on Ampere and later cuDNN may run FP32 convolutions on tensor cores
    /// in TF32 (10-bit mantissa inputs, FP32 accumulation), unless NVIDIA_TF32_OVERRIDE=0.
    Tf32,
    /// CUDNN_TENSOR_OP_MATH on FP16 NHWC tensors (FP32 accumulation, the conv descriptor's
    /// compute type is FLOAT: cuDNN's PSEUDO_HALF_CONFIG). Only with [`f16`] layers.
    Fp16,
}

/// One GPU: a context with cudarc's per-buffer event tracking off (every buffer is used on one
/// stream only, see [`GpuDevice::open`]) and a stream for uploads.
pub struct GpuDevice {
    ctx: Arc<cu::CudaContext>,
    upload: Arc<cu::CudaStream>,
}

impl GpuDevice {
    /// Opens GPU `ordinal` after checking that the driver, cuDNN and cuBLAS are present.
    pub fn open(ordinal: usize) -> Result<Self, GpuOpsError> {
        available()?;
        let ctx = cuda::driver(ordinal)?;
        // SAFETY: this context object is private to this GpuDevice and the sessions made from
        // it. Without tracking, cudarc records no events per buffer use; what tracking would
        // guard is kept by construction: weights are written once on `upload` and
        // [`GpuDevice::upload`] synchronises before returning, so sessions only read them after
        // the write; every other buffer is allocated, used and freed on one session stream;
        // sessions synchronise their stream before they drop (Handles::drop), so no buffer is
        // freed while a launch that reads it may still run.
        unsafe { ctx.disable_event_tracking() };
        let upload = ctx.new_stream()?;
        Ok(GpuDevice { ctx, upload })
    }

    pub fn name(&self) -> Result<String, GpuOpsError> {
        Ok(self.ctx.name()?)
    }

    /// The device's context (for modules loaded next to the engine, such as preprocessing).
    pub fn context(&self) -> &Arc<cu::CudaContext> {
        &self.ctx
    }

    /// Copies `host` to a new device buffer and waits for the copy.
    pub fn upload<T: cu::DeviceRepr>(&self, host: &[T]) -> Result<cu::CudaSlice<T>, GpuOpsError> {
        let slice = self.upload.clone_htod(host)?;
        self.upload.synchronize()?;
        count_h2d(Mover::Server, std::mem::size_of_val(host));
        Ok(slice)
    }

    /// A new stream with its own cuDNN and cuBLAS handles.
    pub fn handles(&self) -> Result<Handles, GpuOpsError> {
        self.handles_with_priority(false)
    }

    /// As [`GpuDevice::handles`]; `high_priority` puts the stream at the context's greatest
    /// stream priority, so its kernels are scheduled ahead of the other sessions' queued ones.
    pub fn handles_with_priority(&self, high_priority: bool) -> Result<Handles, GpuOpsError> {
        self.ctx.bind_to_thread()?;
        let stream = if high_priority {
            let (_least, greatest) = cu::result::stream::get_priority_range()?;
            self.ctx.new_stream_with_priority(greatest)?
        } else {
            self.ctx.new_stream()?
        };
        let cudnn = Cudnn::new(stream.clone()).map_err(dnn_err("cudnnCreate"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|err| GpuOpsError::Cublas {
            call: "cublasCreate",
            err,
        })?;
        Ok(Handles {
            stream,
            cudnn,
            blas,
        })
    }
}

/// Page-locked host memory that device values are downloaded into asynchronously
/// ([`Handles::download_async`]), and the event recorded after the last such download.
pub struct HostLanding {
    host: cu::PinnedHostSlice<f32>,
    landed: cu::CudaEvent,
}

impl HostLanding {
    /// Waits for the last download into this memory and returns its first `len` values.
    pub fn wait(&self, len: usize) -> Result<&[f32], GpuOpsError> {
        self.landed.synchronize()?;
        let all = self.host.as_slice()?;
        match all.get(..len) {
            Some(values) => Ok(values),
            None => geometry(format!("{len} values of a landing of {}", all.len())),
        }
    }
}

impl Drop for HostLanding {
    fn drop(&mut self) {
        // A download still in flight writes into `host`: let it land before the pinned
        // memory is freed. A failed wait (a dead context) leaves nothing to wait for.
        let _ = self.landed.synchronize();
    }
}

/// One session's stream, cuDNN handle and cuBLAS handle.
pub struct Handles {
    stream: Arc<cu::CudaStream>,
    cudnn: Arc<Cudnn>,
    blas: CudaBlas,
}

// SAFETY: the cuDNN handle (the only !Send part) is used only through `&mut Handles` or by
// layers whose launch takes `&mut Handles` of the same handle (checked with Arc::ptr_eq), so it
// is never used by two threads at once, which is all cuDNN requires; Handles is not Sync.
unsafe impl Send for Handles {}

impl Handles {
    pub fn stream(&self) -> &Arc<cu::CudaStream> {
        &self.stream
    }

    /// Makes the context current on the calling thread (cuDNN and cuBLAS launch into the
    /// current context; a session may move between threads).
    pub fn bind(&self) -> Result<(), GpuOpsError> {
        Ok(self.stream.context().bind_to_thread()?)
    }

    /// A zero-filled device buffer of `len` values on this stream.
    pub fn zeros<T: cu::DeviceRepr + cu::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<cu::CudaSlice<T>, GpuOpsError> {
        Ok(self.stream.alloc_zeros::<T>(len.max(1))?)
    }

    /// A page-locked host buffer of `len` zeros (cached, not write-combined: callers read it
    /// back), so that uploads from it are asynchronous DMA.
    pub fn pinned_zeros(&self, len: usize) -> Result<cu::PinnedHostSlice<f32>, GpuOpsError> {
        let ctx = self.stream.context();
        // SAFETY: the allocation's contents are undefined until written; it is zero-filled
        // below before anyone can read it.
        let mut host = unsafe { ctx.alloc_pinned_with_flags::<f32>(len.max(1), 0) }?;
        host.as_mut_slice()?.fill(0.0);
        Ok(host)
    }

    /// Host to device on this stream; `host` must fit `dst`. From a page-locked buffer
    /// ([`Handles::pinned_zeros`]) the copy is an asynchronous DMA; from pageable memory the
    /// driver stages it.
    pub fn upload<H: cu::HostSlice<f32> + ?Sized>(
        &self,
        host: &H,
        dst: &mut cu::CudaSlice<f32>,
    ) -> Result<(), GpuOpsError> {
        let len = host.len();
        if len > dst.len() {
            return geometry(format!(
                "upload of {len} values into a buffer of {}",
                dst.len()
            ));
        }
        let mut view = dst.slice_mut(..len);
        self.stream.memcpy_htod(host, &mut view)?;
        count_h2d(Mover::Server, len * std::mem::size_of::<f32>());
        Ok(())
    }

    /// Device to host, waiting for the stream; copies `host.len()` values.
    pub fn download(&self, src: &cu::CudaSlice<f32>, host: &mut [f32]) -> Result<(), GpuOpsError> {
        if host.len() > src.len() {
            return geometry(format!(
                "download of {} values from a buffer of {}",
                host.len(),
                src.len()
            ));
        }
        let view = src.slice(..host.len());
        self.stream.memcpy_dtoh(&view, host)?;
        self.stream.synchronize()?;
        count_d2h(Mover::Server, std::mem::size_of_val(host));
        Ok(())
    }

    pub fn synchronize(&self) -> Result<(), GpuOpsError> {
        Ok(self.stream.synchronize()?)
    }

    /// Page-locked host memory of `len` zeros that [`Handles::download_async`] lands device
    /// values in, with its own completion event.
    pub fn landing(&self, len: usize) -> Result<HostLanding, GpuOpsError> {
        let host = self.pinned_zeros(len)?;
        let landed = self.stream.context().new_event(None)?;
        Ok(HostLanding { host, landed })
    }

    /// Device to page-locked host memory on this stream, without waiting: exactly the first
    /// `len` values of `src` land in `to` once the stream gets there, and
    /// [`HostLanding::wait`] waits for them. (cudarc's own `memcpy_dtoh` into a
    /// `PinnedHostSlice` would copy the host buffer's whole length, past the end of a smaller
    /// `src`, and records the slice's event only with event tracking on, which
    /// [`GpuDevice::open`] turns off: neither is usable here.)
    pub fn download_async(
        &self,
        src: &cu::CudaSlice<f32>,
        len: usize,
        to: &mut HostLanding,
    ) -> Result<(), GpuOpsError> {
        if len > src.len() || len > to.host.len() {
            return geometry(format!(
                "download of {len} values from a buffer of {} into {}",
                src.len(),
                to.host.len()
            ));
        }
        self.bind()?;
        // The last download into `to` (maybe on another stream) has landed before this one
        // may overwrite it.
        to.landed.synchronize()?;
        let src = src.slice(..len);
        let (src_ptr, _src_record) = src.device_ptr(&self.stream);
        let dst = &mut to.host.as_mut_slice()?[..len];
        // SAFETY: src_ptr..+len floats is live device memory of this context (`src` borrows
        // its buffer, which the caller keeps until the run that reads it is waited for, see
        // the session's `settle_launched`); dst is exactly `len` floats of page-locked memory
        // owned by `to`, which is neither read (HostLanding::wait) nor freed (HostLanding's
        // Drop) before `landed`, recorded right after the copy on the same stream, completes.
        unsafe { cu::result::memcpy_dtoh_async(dst, src_ptr, self.stream.cu_stream()) }?;
        to.landed.record(&self.stream)?;
        count_d2h(Mover::Server, len * std::mem::size_of::<f32>());
        Ok(())
    }

    /// Starts capturing this stream's launches into a CUDA graph (thread-local mode: other
    /// threads' CUDA calls are unaffected). Always pair with [`Handles::end_capture`].
    pub fn begin_capture(&mut self) -> Result<(), GpuOpsError> {
        self.bind()?;
        Ok(self
            .stream
            .begin_capture(cu::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?)
    }

    /// Ends the capture (also after a failed launch, to leave capture mode) and instantiates
    /// the graph.
    pub fn end_capture(&mut self) -> Result<Option<Graph>, GpuOpsError> {
        self.bind()?;
        Ok(self
            .stream
            .end_capture(cu::sys::CUgraphInstantiate_flags(0))?
            .map(Graph))
    }

    /// Replays a graph captured on this stream.
    pub fn replay(&mut self, graph: &mut Graph) -> Result<(), GpuOpsError> {
        Ok(graph.0.launch()?)
    }

    /// Two timing events on this stream's context (for profiles, not the request path).
    pub fn timer(&self) -> Result<Timer, GpuOpsError> {
        let ctx = self.stream.context();
        let flags = Some(cu::sys::CUevent_flags::CU_EVENT_DEFAULT);
        Ok(Timer {
            start: ctx.new_event(flags)?,
            end: ctx.new_event(flags)?,
        })
    }

    /// Marks the start of a timed region on this stream.
    pub fn timer_start(&self, t: &Timer) -> Result<(), GpuOpsError> {
        Ok(t.start.record(&self.stream)?)
    }

    /// Marks its end, waits for it, and returns the device time between the marks in ms.
    pub fn timer_stop(&self, t: &Timer) -> Result<f64, GpuOpsError> {
        t.end.record(&self.stream)?;
        Ok(f64::from(t.start.elapsed_ms(&t.end)?))
    }

    fn check_own(&self, cudnn: &Arc<Cudnn>) -> Result<(), GpuOpsError> {
        if Arc::ptr_eq(&self.cudnn, cudnn) {
            Ok(())
        } else {
            Err(GpuOpsError::ForeignHandles)
        }
    }
}

impl Drop for Handles {
    fn drop(&mut self) {
        // Work queued on this stream may read shared weights: finish it before they can go.
        let _ = self.stream.synchronize();
    }
}

/// A captured sequence of launches on one session stream, replayed with one call.
pub struct Graph(cu::CudaGraph);

impl Graph {
    /// (kernel nodes, other nodes: copies, memsets, ...) of the captured graph.
    pub fn node_counts(&self) -> Result<(usize, usize), GpuOpsError> {
        let graph = self.0.cu_graph();
        let mut count = 0usize;
        // SAFETY: a null node array asks only for the count, written to `count`; `graph` is
        // the live graph this value owns.
        unsafe { cu::sys::cuGraphGetNodes(graph, std::ptr::null_mut(), &mut count) }.result()?;
        let mut nodes = vec![std::ptr::null_mut(); count];
        let mut got = count;
        // SAFETY: `nodes` has room for `got` handles, cuGraphGetNodes writes at most that many
        // and stores how many it wrote in `got`.
        unsafe { cu::sys::cuGraphGetNodes(graph, nodes.as_mut_ptr(), &mut got) }.result()?;
        let mut kernels = 0;
        for &node in &nodes[..got.min(count)] {
            let mut kind = cu::sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
            // SAFETY: `node` was just returned by cuGraphGetNodes for this live graph; the type
            // is written to `kind`.
            unsafe { cu::sys::cuGraphNodeGetType(node, &mut kind) }.result()?;
            if kind == cu::sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL {
                kernels += 1;
            }
        }
        Ok((kernels, got.min(count) - kernels))
    }
}

/// Two events with timing on, for device-side timing of a region of one stream.
pub struct Timer {
    start: cu::CudaEvent,
    end: cu::CudaEvent,
}

// SAFETY: CUDA graph objects must not be used by two threads at once; Graph is not Sync and
// replay takes `&mut Graph`, so uses are serialised; launching binds the context first.
unsafe impl Send for Graph {}

fn to_c(dims: &[usize], what: &str) -> Result<Vec<i32>, GpuOpsError> {
    dims.iter()
        .map(|&d| {
            if d == 0 || d > i32::MAX as usize {
                geometry(format!("{what}: dimension {d} out of range in {dims:?}"))
            } else {
                Ok(d as i32)
            }
        })
        .collect()
}

/// A 4-D tensor descriptor; `dims` are always [N, C, H, W], the memory layout is `T::FORMAT`.
fn tensor4<T: Elem>(
    h: &Handles,
    dims: [usize; 4],
    what: &str,
) -> Result<TensorDescriptor<T>, GpuOpsError> {
    let d = to_c(&dims, what)?;
    h.cudnn
        .create_4d_tensor::<T>(T::FORMAT, [d[0], d[1], d[2], d[3]])
        .map_err(dnn_err("cudnnSetTensor4dDescriptor"))
}

/// Geometry of one convolution (NCHW, group 1, dilation 1, symmetric padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Input [N, C, H, W].
    pub x: [usize; 4],
    pub cout: usize,
    /// [kh, kw]
    pub kernel: [usize; 2],
    /// [sh, sw]
    pub stride: [usize; 2],
    /// [ph, pw], applied on both sides.
    pub pad: [usize; 2],
}

impl ConvGeometry {
    /// Output [N, cout, H', W'] (floor division, as ONNX and cuDNN), or an error when the
    /// kernel does not fit the padded input.
    pub fn output(&self) -> Result<[usize; 4], String> {
        let [n, _, h, w] = self.x;
        let out = |size: usize, k: usize, s: usize, p: usize| {
            if s == 0 || k == 0 || size + 2 * p < k {
                None
            } else {
                Some((size + 2 * p - k) / s + 1)
            }
        };
        match (
            out(h, self.kernel[0], self.stride[0], self.pad[0]),
            out(w, self.kernel[1], self.stride[1], self.pad[1]),
        ) {
            (Some(oh), Some(ow)) => Ok([n, self.cout, oh, ow]),
            _ => Err(format!("kernel does not fit the input: {self:?}")),
        }
    }
}

/// y = act(conv(x, w) + alpha2 * z + bias), one `cudnnConvolutionBiasActivationForward`.
/// With `T = f16`: x, w, z, bias and y are HALF (NHWC / KRSC), the convolution computes in
/// FLOAT, alpha1/alpha2 are f32 (cudarc passes f16's scaling parameters as f32).
pub struct ConvLayer<T: Elem = f32> {
    cudnn: Arc<Cudnn>,
    conv: ConvDescriptor<f32>,
    act: ActivationDescriptor<f32>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    bias: TensorDescriptor<T>,
    algo: ConvAlgo,
    workspace: usize,
    relu: bool,
    residual: bool,
    x_len: usize,
    w_len: usize,
    y_len: usize,
    cout: usize,
    y_shape: [usize; 4],
}

// SAFETY: as for Handles: the descriptors are host objects cuDNN lets any thread use or
// destroy; the handle inside them is only used by launch/set_algorithm paths that take
// `&mut Handles` (or `&Handles` during build) of the same handle, checked; not Sync.
unsafe impl<T: Elem> Send for ConvLayer<T> {}

impl<T: Elem> ConvLayer<T> {
    /// Builds the descriptors and picks the algorithm (cuDNN heuristics, once). With `relu`
    /// false (IDENTITY) cuDNN only supports IMPLICIT_PRECOMP_GEMM for this call, so that is
    /// what is used. `residual` says whether launches pass a z to add. `math` must be
    /// [`ConvMath::Fp16`] exactly when `T` is [`f16`].
    pub fn new(
        h: &Handles,
        g: &ConvGeometry,
        relu: bool,
        residual: bool,
        math: ConvMath,
    ) -> Result<Self, GpuOpsError> {
        h.bind()?;
        let half = T::FORMAT == dnn::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
        if half != (math == ConvMath::Fp16) {
            return geometry(format!("conv math {math:?} does not fit element type"));
        }
        let y_shape = g.output().map_err(GpuOpsError::Geometry)?;
        let k = to_c(&g.kernel, "conv kernel")?;
        let s = to_c(&g.stride, "conv stride")?;
        let p: Vec<i32> = g
            .pad
            .iter()
            .map(|&v| i32::try_from(v).map_err(|_| GpuOpsError::Geometry(format!("{g:?}"))))
            .collect::<Result<_, _>>()?;
        let cin = to_c(&[g.x[1]], "conv input channels")?[0];
        let cout = to_c(&[g.cout], "conv output channels")?[0];
        let mut conv = h
            .cudnn
            .create_conv2d::<f32>(
                [p[0], p[1]],
                [s[0], s[1]],
                [1, 1],
                dnn::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )
            .map_err(dnn_err("cudnnSetConvolution2dDescriptor"))?;
        conv.set_math_type(match math {
            ConvMath::Fp32 => dnn::cudnnMathType_t::CUDNN_FMA_MATH,
            ConvMath::Tf32 => dnn::cudnnMathType_t::CUDNN_DEFAULT_MATH,
            ConvMath::Fp16 => dnn::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
        })
        .map_err(dnn_err("cudnnSetConvolutionMathType"))?;
        let w = h
            .cudnn
            .create_4d_filter::<T>(T::FORMAT, [cout, cin, k[0], k[1]])
            .map_err(dnn_err("cudnnSetFilter4dDescriptor"))?;
        let x = tensor4(h, g.x, "conv input")?;
        let y = tensor4(h, y_shape, "conv output")?;
        let bias = tensor4(h, [1, g.cout, 1, 1], "conv bias")?;
        let act = h
            .cudnn
            .create_activation::<f32>(
                if relu {
                    dnn::cudnnActivationMode_t::CUDNN_ACTIVATION_RELU
                } else {
                    dnn::cudnnActivationMode_t::CUDNN_ACTIVATION_IDENTITY
                },
                dnn::cudnnNanPropagation_t::CUDNN_NOT_PROPAGATE_NAN,
                // Ignored by RELU and IDENTITY (a ceiling only for CLIPPED_RELU); the largest
                // value in case a version reads it as one, as cudarc's own tests do.
                f64::MAX,
            )
            .map_err(dnn_err("cudnnSetActivationDescriptor"))?;
        let fwd = ConvForward {
            conv: &conv,
            x: &x,
            w: &w,
            y: &y,
        };
        let algo = if relu {
            // The heuristics' first choice; should they fail (or rank a failing entry first),
            // the algorithm the fused call always supports.
            fwd.pick_algorithm()
                .unwrap_or(ConvAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM)
        } else {
            ConvAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM
        };
        let workspace = fwd
            .get_workspace_size(algo)
            .map_err(dnn_err("cudnnGetConvolutionForwardWorkspaceSize"))?;
        let [n, c, hh, ww] = g.x;
        Ok(ConvLayer {
            cudnn: h.cudnn.clone(),
            conv,
            act,
            x,
            w,
            y,
            bias,
            algo,
            workspace,
            relu,
            residual,
            x_len: n * c * hh * ww,
            w_len: g.cout * g.x[1] * g.kernel[0] * g.kernel[1],
            y_len: y_shape.iter().product(),
            cout: g.cout,
            y_shape,
        })
    }

    pub fn output_shape(&self) -> [usize; 4] {
        self.y_shape
    }

    pub fn algorithm(&self) -> ConvAlgo {
        self.algo
    }

    pub fn relu(&self) -> bool {
        self.relu
    }

    /// Workspace bytes the chosen algorithm needs.
    pub fn workspace_bytes(&self) -> usize {
        self.workspace
    }

    /// Switches to IMPLICIT_PRECOMP_GEMM (supported by the fused call with any activation),
    /// for when a launch reported NOT_SUPPORTED; returns the new workspace size.
    pub fn fall_back(&mut self, h: &Handles) -> Result<usize, GpuOpsError> {
        self.set_algorithm(
            h,
            ConvAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
        )
    }

    /// The algorithms a measured choice may try for this layer: every forward algorithm
    /// with RELU; with IDENTITY only IMPLICIT_PRECOMP_GEMM (all the fused call supports).
    pub fn candidate_algorithms(&self) -> Vec<ConvAlgo> {
        if !self.relu {
            return vec![ConvAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM];
        }
        use ConvAlgo::*;
        vec![
            CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
            CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
            CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
            CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
            CUDNN_CONVOLUTION_FWD_ALGO_FFT,
            CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
            CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
            CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
        ]
    }

    /// Uses `algo` from now on; returns the workspace bytes it needs (an error where cuDNN
    /// has no such algorithm for this geometry; whether the fused call supports it shows at
    /// the first launch, as NOT_SUPPORTED).
    pub fn set_algorithm(&mut self, h: &Handles, algo: ConvAlgo) -> Result<usize, GpuOpsError> {
        h.check_own(&self.cudnn)?;
        h.bind()?;
        let fwd = ConvForward {
            conv: &self.conv,
            x: &self.x,
            w: &self.w,
            y: &self.y,
        };
        self.workspace = fwd
            .get_workspace_size(algo)
            .map_err(dnn_err("cudnnGetConvolutionForwardWorkspaceSize"))?;
        self.algo = algo;
        Ok(self.workspace)
    }

    /// Queues the convolution on the session stream. `z` is the residual (added with weight 1
    /// before the activation) when the layer was built with `residual`; otherwise pass a
    /// zero-filled buffer of at least the output size (it is weighted by 0, and cuDNN may still
    /// read it, so it must be finite).
    #[allow(clippy::too_many_arguments)]
    pub fn launch(
        &self,
        h: &mut Handles,
        x: &cu::CudaSlice<T>,
        w: &cu::CudaSlice<T>,
        bias: &cu::CudaSlice<T>,
        z: &cu::CudaSlice<T>,
        workspace: &mut cu::CudaSlice<u8>,
        y: &mut cu::CudaSlice<T>,
    ) -> Result<(), GpuOpsError> {
        h.check_own(&self.cudnn)?;
        let sizes = [
            ("x", x.len(), self.x_len),
            ("w", w.len(), self.w_len),
            ("bias", bias.len(), self.cout),
            ("z", z.len(), self.y_len),
            ("y", y.len(), self.y_len),
            ("workspace", workspace.len(), self.workspace),
        ];
        for (name, got, want) in sizes {
            if got < want {
                return geometry(format!(
                    "conv {name} buffer has {got} elements, needs {want}"
                ));
            }
        }
        h.bind()?;
        let op = ConvBiasActivationForward {
            conv: &self.conv,
            act: &self.act,
            x: &self.x,
            w: &self.w,
            z: &self.y,
            bias: &self.bias,
            y: &self.y,
        };
        let alpha2 = if self.residual { 1.0f64 } else { 0.0f64 };
        // SAFETY: every descriptor was built by this layer with the shapes checked above against
        // the buffers (x, w, bias, z, y hold at least as many T as their descriptors describe,
        // the workspace at least the bytes the algorithm asked for); the launch goes to the
        // stream of the handle the descriptors belong to (checked), which also owns y; y does
        // not alias x, w, bias or z (distinct &/&mut borrows).
        unsafe {
            op.launch(
                self.algo,
                Some(workspace),
                (T::from_f64(1.0), T::from_f64(alpha2)),
                x,
                w,
                z,
                bias,
                y,
            )
        }
        .map_err(dnn_err("cudnnConvolutionBiasActivationForward"))
    }
}

/// Max pooling or a global average, one `cudnnPoolingForward`.
pub struct PoolLayer<T: Elem = f32> {
    cudnn: Arc<Cudnn>,
    pool: PoolingDescriptor<f32>,
    x: TensorDescriptor<T>,
    y: TensorDescriptor<T>,
    x_len: usize,
    y_len: usize,
    y_shape: [usize; 4],
}

// SAFETY: as for ConvLayer: launches take `&mut Handles` of the same handle (checked).
unsafe impl<T: Elem> Send for PoolLayer<T> {}

impl<T: Elem> PoolLayer<T> {
    /// Max pooling over `kernel` with `stride` and symmetric `pad` (padding never wins a max).
    pub fn max(
        h: &Handles,
        x: [usize; 4],
        kernel: [usize; 2],
        stride: [usize; 2],
        pad: [usize; 2],
    ) -> Result<Self, GpuOpsError> {
        let out = |size: usize, k: usize, s: usize, p: usize| {
            (s > 0 && k > 0 && size + 2 * p >= k && p < k).then(|| (size + 2 * p - k) / s + 1)
        };
        let (Some(oh), Some(ow)) = (
            out(x[2], kernel[0], stride[0], pad[0]),
            out(x[3], kernel[1], stride[1], pad[1]),
        ) else {
            return geometry(format!(
                "max pool {kernel:?}/{stride:?} pad {pad:?} does not fit {x:?}"
            ));
        };
        Self::new(
            h,
            x,
            [x[0], x[1], oh, ow],
            kernel,
            stride,
            pad,
            dnn::cudnnPoolingMode_t::CUDNN_POOLING_MAX,
        )
    }

    /// Mean over each H x W plane: [N, C, H, W] -> [N, C, 1, 1].
    pub fn global_average(h: &Handles, x: [usize; 4]) -> Result<Self, GpuOpsError> {
        Self::new(
            h,
            x,
            [x[0], x[1], 1, 1],
            [x[2], x[3]],
            [x[2], x[3]],
            [0, 0],
            dnn::cudnnPoolingMode_t::CUDNN_POOLING_AVERAGE_COUNT_EXCLUDE_PADDING,
        )
    }

    fn new(
        h: &Handles,
        x: [usize; 4],
        y: [usize; 4],
        kernel: [usize; 2],
        stride: [usize; 2],
        pad: [usize; 2],
        mode: dnn::cudnnPoolingMode_t,
    ) -> Result<Self, GpuOpsError> {
        h.bind()?;
        let k = to_c(&kernel, "pool window")?;
        let s = to_c(&stride, "pool stride")?;
        let p: Vec<i32> = pad
            .iter()
            .map(|&v| i32::try_from(v).map_err(|_| GpuOpsError::Geometry(format!("{pad:?}"))))
            .collect::<Result<_, _>>()?;
        let pool = h
            .cudnn
            .create_poolingnd::<f32>(
                &k,
                &p,
                &s,
                mode,
                dnn::cudnnNanPropagation_t::CUDNN_NOT_PROPAGATE_NAN,
            )
            .map_err(dnn_err("cudnnSetPoolingNdDescriptor"))?;
        Ok(PoolLayer {
            cudnn: h.cudnn.clone(),
            pool,
            x: tensor4(h, x, "pool input")?,
            y: tensor4(h, y, "pool output")?,
            x_len: x.iter().product(),
            y_len: y.iter().product(),
            y_shape: y,
        })
    }

    pub fn output_shape(&self) -> [usize; 4] {
        self.y_shape
    }

    pub fn launch(
        &self,
        h: &mut Handles,
        x: &cu::CudaSlice<T>,
        y: &mut cu::CudaSlice<T>,
    ) -> Result<(), GpuOpsError> {
        h.check_own(&self.cudnn)?;
        if x.len() < self.x_len || y.len() < self.y_len {
            return geometry(format!(
                "pool buffers of {} and {} elements, need {} and {}",
                x.len(),
                y.len(),
                self.x_len,
                self.y_len
            ));
        }
        h.bind()?;
        let op = PoolingForward {
            pooling: &self.pool,
            x: &self.x,
            y: &self.y,
        };
        // SAFETY: descriptors built by this layer; x and y hold at least the elements they
        // describe (checked above); the launch goes to the handle's stream (checked); y is a
        // distinct &mut borrow from x.
        unsafe { op.launch((T::from_f64(1.0), T::from_f64(0.0)), x, y) }
            .map_err(dnn_err("cudnnPoolingForward"))
    }
}

const HALF_KERNELS: &str = r#"
// Conversions for the FP16 path, with PTX cvt so that no header (cuda_fp16.h) is needed.
__device__ __forceinline__ unsigned short f2h(float v) {
    unsigned short r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(v));
    return r;
}
__device__ __forceinline__ float h2f(unsigned short v) {
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(v));
    return r;
}

// x: [n, c, hw] f32 (NCHW); y: [n, hw, cp] f16 (NHWC), channels c..cp zero.
extern "C" __global__ void nchw_f32_to_nhwc_f16(
    const float* __restrict__ x, unsigned short* __restrict__ y, int n, int c, int hw, int cp)
{
    long long total = (long long)n * hw * cp;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int ch = (int)(i % cp);
        long long rest = i / cp;
        int p = (int)(rest % hw);
        int ni = (int)(rest / hw);
        y[i] = ch < c ? f2h(x[((long long)ni * c + ch) * hw + p]) : (unsigned short)0;
    }
}

extern "C" __global__ void f16_to_f32(
    const unsigned short* __restrict__ x, float* __restrict__ y, int len)
{
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < len; i += gridDim.x * blockDim.x) {
        y[i] = h2f(x[i]);
    }
}
"#;

/// The two conversion kernels of the FP16 path (NVRTC, compiled once per loader).
pub struct HalfKernels {
    to_nhwc: cu::CudaFunction,
    to_f32: cu::CudaFunction,
}

impl GpuDevice {
    /// Compiles the FP16 conversion kernels (needs libnvrtc).
    pub fn half_kernels(&self) -> Result<HalfKernels, GpuOpsError> {
        // SAFETY: only tries to dlopen libnvrtc by name; cudarc panics on a missing library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return geometry("NVRTC (libnvrtc) not found: needed for the FP16 path".to_string());
        }
        self.ctx.bind_to_thread()?;
        let ptx = cudarc::nvrtc::compile_ptx(HALF_KERNELS)
            .map_err(|e| GpuOpsError::Geometry(format!("NVRTC compile of FP16 kernels: {e}")))?;
        let module = self.ctx.load_module(ptx)?;
        Ok(HalfKernels {
            to_nhwc: module.load_function("nchw_f32_to_nhwc_f16")?,
            to_f32: module.load_function("f16_to_f32")?,
        })
    }
}

fn grid_for(total: usize) -> cu::LaunchConfig {
    let blocks = total.div_ceil(256).clamp(1, 4096) as u32;
    cu::LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl HalfKernels {
    /// x [n, c, h, w] f32 (NCHW) -> y [n, h, w, cp] f16 (NHWC), zero in channels c..cp.
    pub fn nchw_to_nhwc(
        &self,
        h: &mut Handles,
        x: &cu::CudaSlice<f32>,
        dims: [usize; 4],
        cp: usize,
        y: &mut cu::CudaSlice<f16>,
    ) -> Result<(), GpuOpsError> {
        let [n, c, hh, ww] = dims;
        let hw = hh * ww;
        let (x_len, y_len) = (n * c * hw, n * hw * cp);
        if cp < c || x.len() < x_len || y.len() < y_len {
            return geometry(format!(
                "to NHWC f16: dims {dims:?} cp {cp}, buffers of {} and {}",
                x.len(),
                y.len()
            ));
        }
        let args = to_c(&[n, c, hw, cp, y_len], "to NHWC f16")?;
        h.bind()?;
        let mut b = h.stream.launch_builder(&self.to_nhwc);
        b.arg(x)
            .arg(y)
            .arg(&args[0])
            .arg(&args[1])
            .arg(&args[2])
            .arg(&args[3]);
        // SAFETY: arguments match the kernel signature (two pointers, four ints); it reads
        // x[0..n*c*hw] and writes y[0..n*hw*cp], both within the buffers (checked above; all
        // products fit i32, checked by to_c); x and y are distinct borrows; launched on the
        // session stream that owns both.
        unsafe { b.launch(grid_for(y_len)) }?;
        Ok(())
    }

    /// y[0..len] = x[0..len] as f32.
    pub fn to_f32(
        &self,
        h: &mut Handles,
        x: &cu::CudaSlice<f16>,
        len: usize,
        y: &mut cu::CudaSlice<f32>,
    ) -> Result<(), GpuOpsError> {
        if x.len() < len || y.len() < len {
            return geometry(format!(
                "f16 to f32 of {len}: buffers of {} and {}",
                x.len(),
                y.len()
            ));
        }
        let n = to_c(&[len], "f16 to f32")?[0];
        h.bind()?;
        let mut b = h.stream.launch_builder(&self.to_f32);
        b.arg(x).arg(y).arg(&n);
        // SAFETY: arguments match the kernel (two pointers, one int); it reads x[0..len] and
        // writes y[0..len], within both buffers (checked above); distinct borrows; launched on
        // the session stream that owns both.
        unsafe { b.launch(grid_for(len)) }?;
        Ok(())
    }
}

/// y[m, n] = x[m, k] * w[n, k]^T + bias[n] (row-major), via one device copy of a bias
/// replicated over the m rows and one `cublasSgemm` with beta = 1.
#[derive(Debug, Clone, Copy)]
pub struct GemmLayer {
    m: usize,
    k: usize,
    n: usize,
}

impl GemmLayer {
    pub fn new(m: usize, k: usize, n: usize) -> Result<Self, GpuOpsError> {
        to_c(&[m, k, n], "gemm")?;
        to_c(&[m * n, n * k, m * k], "gemm")?;
        Ok(GemmLayer { m, k, n })
    }

    /// `bias_rows` is the bias repeated for each of the m rows (m * n values).
    pub fn launch(
        &self,
        h: &mut Handles,
        x: &cu::CudaSlice<f32>,
        w: &cu::CudaSlice<f32>,
        bias_rows: &cu::CudaSlice<f32>,
        y: &mut cu::CudaSlice<f32>,
    ) -> Result<(), GpuOpsError> {
        let (m, k, n) = (self.m, self.k, self.n);
        if x.len() < m * k || w.len() < n * k || bias_rows.len() != m * n || y.len() < m * n {
            return geometry(format!(
                "gemm m={m} k={k} n={n}: x {}, w {}, bias {}, y {} elements",
                x.len(),
                w.len(),
                bias_rows.len(),
                y.len()
            ));
        }
        h.bind()?;
        h.stream.memcpy_dtod(bias_rows, y)?;
        // Row-major y = x w^T is column-major y^T (n x m) = w (n x k, stored as column-major
        // k x n, so op T) * x^T (k x m, column-major, op N).
        let cfg = GemmConfig {
            transa: cublas::sys::cublasOperation_t::CUBLAS_OP_T,
            transb: cublas::sys::cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: 1.0f32,
            lda: k as i32,
            ldb: k as i32,
            beta: 1.0f32,
            ldc: n as i32,
        };
        // SAFETY: with the leading dimensions above cuBLAS reads n*k values of w, k*m of x and
        // reads/writes n*m of y, all checked against the buffer lengths (every dimension fits
        // i32, checked in new); the handle is bound to the session stream that owns y.
        unsafe { h.blas.gemm(cfg, w, x, y) }.map_err(|err| GpuOpsError::Cublas {
            call: "cublasSgemm",
            err,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_geometry_output() {
        let g = ConvGeometry {
            x: [1, 3, 224, 224],
            cout: 64,
            kernel: [7, 7],
            stride: [2, 2],
            pad: [3, 3],
        };
        assert_eq!(g.output().unwrap(), [1, 64, 112, 112]);
        let bad = ConvGeometry {
            kernel: [300, 300],
            pad: [0, 0],
            ..g
        };
        assert!(bad.output().is_err());
    }

    #[test]
    fn missing_libraries_are_errors_not_panics() {
        match available() {
            Ok(()) => eprintln!("GPU libraries present"),
            Err(e) => eprintln!("SKIPPED GPU ops check: {e}"),
        }
    }
}
