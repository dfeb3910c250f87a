//! Requests that stay in GPU memory (GPUDirect RDMA rings): [`DeviceSpan`], a borrowed byte
//! range of device memory (a request slot, a reply slot) that kernels read or write by
//! address; [`DeviceMemory`], a plain device allocation laid out as such slots (the device
//! reply ring, and the loopback ring source's request ring); and [`ResidentKernels`], the
//! NVRTC kernels that read a request's tensor straight from its slot and write the reply's
//! top-5 (and logits) into a device reply slot. Every launch checks its sizes first, so
//! callers stay safe.
//!
//! Device memory is not Rust memory: no host reference into it exists, so a span only has to
//! stay allocated while used (its lifetime borrows the owner). Which thread may write which
//! slot is the ring protocol's rule (a slot's request token), as for host rings.

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::{DevicePtr, PushKernelArg};
use thiserror::Error;

use super::cuda::{cu, CudaError};
use super::transfer::{count_d2h, count_h2d, Mover};

/// Bytes of the top-5 part of a reply body (the 96-byte body minus its 48 bytes of host
/// timestamps): top_k (u32), 0 (u32), 5 class ids (u32), 5 softmax scores (f32), LE.
pub const TOP5_BYTES: usize = 48;

const KERNELS: &str = r#"
#define NEG_INF __int_as_float(0xff800000)
// src: n f32 little-endian values at any alignment (a request slot's payload). dst: n f32.
// *bad (zeroed before the launch) ends as n - i for the first non-finite value i, 0 if none.
extern "C" __global__ void f32_from_le_bytes(
    const unsigned char* __restrict__ src, float* __restrict__ dst, int n,
    unsigned int* __restrict__ bad)
{
    bool aligned = (((unsigned long long)src) & 3ull) == 0ull;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        unsigned int u;
        if (aligned) {
            u = ((const unsigned int*)src)[i];
        } else {
            const unsigned char* p = src + 4 * (size_t)i;
            u = (unsigned int)p[0] | ((unsigned int)p[1] << 8) | ((unsigned int)p[2] << 16)
                | ((unsigned int)p[3] << 24);
        }
        // Exponent all ones: infinity or NaN (NVRTC has no <cmath> for isfinite).
        if ((u & 0x7f800000u) == 0x7f800000u) atomicMax(bad, (unsigned int)(n - i));
        dst[i] = __uint_as_float(u);
    }
}

// One block of 256 threads. The CPU's top_k_softmax on the device: max, sum of exp(l - max),
// the five largest logits in (value desc, index asc) order (the CPU's insertion order), their
// softmax scores; written as the reply body's top-5 part at out (4-byte aligned), followed,
// when with_logits, by the n logits.
extern "C" __global__ void top5_reply(const float* __restrict__ logits, int n,
                                      unsigned char* __restrict__ out, int with_logits)
{
    __shared__ float val[256];
    __shared__ int idx[256];
    __shared__ int chosen[5];
    int t = threadIdx.x;
    float m = NEG_INF;
    for (int i = t; i < n; i += 256) m = fmaxf(m, logits[i]);
    val[t] = m;
    __syncthreads();
    for (int s = 128; s > 0; s >>= 1) {
        if (t < s) val[t] = fmaxf(val[t], val[t + s]);
        __syncthreads();
    }
    float max = val[0];
    __syncthreads();
    float part = 0.0f;
    for (int i = t; i < n; i += 256) part += expf(logits[i] - max);
    val[t] = part;
    __syncthreads();
    for (int s = 128; s > 0; s >>= 1) {
        if (t < s) val[t] += val[t + s];
        __syncthreads();
    }
    float sum = val[0];
    __syncthreads();
    int k = n < 5 ? n : 5;
    for (int r = 0; r < k; ++r) {
        float best = NEG_INF;
        int at = 0x7fffffff;
        for (int i = t; i < n; i += 256) {
            bool taken = false;
            for (int q = 0; q < r; ++q) taken |= (chosen[q] == i);
            float v = logits[i];
            if (!taken && (v > best || (v == best && i < at))) { best = v; at = i; }
        }
        val[t] = best;
        idx[t] = at;
        __syncthreads();
        for (int s = 128; s > 0; s >>= 1) {
            if (t < s) {
                float v = val[t + s];
                int j = idx[t + s];
                if (v > val[t] || (v == val[t] && j < idx[t])) { val[t] = v; idx[t] = j; }
            }
            __syncthreads();
        }
        if (t == 0) chosen[r] = idx[0] == 0x7fffffff ? 0 : idx[0];
        __syncthreads();
    }
    unsigned int* words = (unsigned int*)out;
    float* scores = (float*)(out + 28);
    if (t == 0) {
        words[0] = (unsigned int)k;
        words[1] = 0u;
        for (int r = 0; r < 5; ++r) {
            words[2 + r] = r < k ? (unsigned int)chosen[r] : 0u;
            scores[r] = r < k ? expf(logits[chosen[r]] - max) / sum : 0.0f;
        }
    }
    if (with_logits) {
        float* rest = (float*)(out + 48);
        for (int i = t; i < n; i += 256) rest[i] = logits[i];
    }
}
"#;

#[derive(Debug, Error)]
pub enum ResidentError {
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error("NVRTC unavailable: libnvrtc not found (CUDA toolkit runtime libraries)")]
    NoNvrtc,
    #[error("NVRTC could not compile the GPU-ring kernels: {0}")]
    Compile(String),
    #[error("{0}")]
    Geometry(String),
}

impl From<cu::DriverError> for ResidentError {
    fn from(e: cu::DriverError) -> Self {
        ResidentError::Cuda(CudaError::Driver(e))
    }
}

fn geometry<T>(text: String) -> Result<T, ResidentError> {
    Err(ResidentError::Geometry(text))
}

/// A byte range of live device memory, borrowed from its owner ([`DeviceMemory`], a
/// registered GPU ring): what a kernel reads a request from or writes a reply into.
#[derive(Debug, Clone, Copy)]
pub struct DeviceSpan<'a> {
    ptr: u64,
    len: usize,
    _owner: PhantomData<&'a ()>,
}

impl<'a> DeviceSpan<'a> {
    /// `offset..offset+len` of a device allocation at `base` of `total` bytes, if inside it.
    /// Crate-only: the caller owns that allocation for `'a`.
    pub(crate) fn within(base: u64, total: usize, offset: usize, len: usize) -> Option<Self> {
        let end = offset.checked_add(len)?;
        (end <= total).then_some(DeviceSpan {
            ptr: base + offset as u64,
            len,
            _owner: PhantomData,
        })
    }

    /// The first `len` bytes of `slice` (allocated on `stream`'s context), if it has them.
    pub fn of(
        slice: &'a cu::CudaSlice<u8>,
        stream: &Arc<cu::CudaStream>,
        len: usize,
    ) -> Option<DeviceSpan<'a>> {
        let (ptr, _sync) = slice.device_ptr(stream);
        DeviceSpan::within(ptr, slice.len(), 0, len)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address (for logs and the NIC's scatter entries).
    pub fn addr(&self) -> u64 {
        self.ptr
    }

    /// `offset..offset+len` of this span.
    pub fn sub(&self, offset: usize, len: usize) -> Option<DeviceSpan<'a>> {
        DeviceSpan::within(self.ptr, self.len, offset, len)
    }

    /// Copies the span into `dst` (same length) on `stream` and waits; counted for `mover`.
    pub fn copy_to_host(
        &self,
        stream: &Arc<cu::CudaStream>,
        dst: &mut [u8],
        mover: Mover,
    ) -> Result<(), ResidentError> {
        if dst.len() != self.len {
            return geometry(format!(
                "copy of a {}-byte device span into {} bytes",
                self.len,
                dst.len()
            ));
        }
        stream.context().bind_to_thread()?;
        // SAFETY: ptr..ptr+len is live device memory of this context (the span borrows its
        // owner); dst is a host slice of exactly len bytes, written by the copy, which is
        // complete when synchronize returns (so dst is not touched after this call).
        unsafe { cu::result::memcpy_dtoh_async(dst, self.ptr, stream.cu_stream()) }?;
        stream.synchronize()?;
        count_d2h(mover, dst.len());
        Ok(())
    }

    /// Copies `src` (same length) into the span on `stream` and waits; counted for `mover`.
    pub fn copy_from_host(
        &self,
        stream: &Arc<cu::CudaStream>,
        src: &[u8],
        mover: Mover,
    ) -> Result<(), ResidentError> {
        if src.len() != self.len {
            return geometry(format!(
                "copy of {} bytes into a {}-byte device span",
                src.len(),
                self.len
            ));
        }
        stream.context().bind_to_thread()?;
        // SAFETY: ptr..ptr+len is live device memory of this context; src is read by the
        // copy, which is complete when synchronize returns (src outlives it).
        unsafe { cu::result::memcpy_htod_async(self.ptr, src, stream.cu_stream()) }?;
        stream.synchronize()?;
        count_h2d(mover, src.len());
        Ok(())
    }
}

/// A zeroed device allocation owned by its user, handing out [`DeviceSpan`]s (the device
/// reply ring of a GPU-resident connection; the loopback source's request ring).
pub struct DeviceMemory {
    mem: cu::CudaSlice<u8>,
    addr: u64,
}

impl std::fmt::Debug for DeviceMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceMemory({} B at {:#x})", self.mem.len(), self.addr)
    }
}

impl DeviceMemory {
    /// `len` zeroed bytes on `stream`'s GPU, ready when this returns.
    pub fn new(stream: &Arc<cu::CudaStream>, len: usize) -> Result<DeviceMemory, ResidentError> {
        stream.context().bind_to_thread()?;
        let mem = stream.alloc_zeros::<u8>(len.max(1))?;
        stream.synchronize()?;
        let addr = {
            let (ptr, _sync) = mem.device_ptr(stream);
            ptr
        };
        Ok(DeviceMemory { mem, addr })
    }

    pub fn len(&self) -> usize {
        self.mem.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mem.is_empty()
    }

    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// `offset..offset+len`, if inside the allocation.
    pub fn span(&self, offset: usize, len: usize) -> Option<DeviceSpan<'_>> {
        DeviceSpan::within(self.addr, self.mem.len(), offset, len)
    }
}

/// The GPU-ring kernels, compiled once per context.
pub struct ResidentKernels {
    from_le: cu::CudaFunction,
    top5: cu::CudaFunction,
}

fn grid_for(total: usize) -> cu::LaunchConfig {
    cu::LaunchConfig {
        grid_dim: (total.div_ceil(256).clamp(1, 4096) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl ResidentKernels {
    /// Compiles the kernels with NVRTC and loads them into `ctx`.
    pub fn new(ctx: &Arc<cu::CudaContext>) -> Result<Self, ResidentError> {
        // SAFETY: only tries to dlopen libnvrtc by name; cudarc panics on a missing library,
        // so this check must come first.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(ResidentError::NoNvrtc);
        }
        ctx.bind_to_thread()?;
        let ptx = cudarc::nvrtc::compile_ptx(KERNELS)
            .map_err(|e| ResidentError::Compile(format!("{e:?}")))?;
        let module = ctx.load_module(ptx)?;
        Ok(ResidentKernels {
            from_le: module.load_function("f32_from_le_bytes")?,
            top5: module.load_function("top5_reply")?,
        })
    }

    /// Queues `dst[i] = f32::from_le_bytes(src[4i..4i+4])` for every value of `dst`, reading
    /// `src` where it lies (a request slot); `bad` is zeroed first and ends as `n - i` for
    /// the first non-finite value `i` (0: all finite): see [`first_non_finite`].
    pub fn f32_from_le_bytes(
        &self,
        stream: &Arc<cu::CudaStream>,
        src: DeviceSpan<'_>,
        dst: &mut cu::CudaViewMut<'_, f32>,
        bad: &mut cu::CudaSlice<u32>,
    ) -> Result<(), ResidentError> {
        let n = dst.len();
        if src.len() != 4 * n || n > i32::MAX as usize || bad.is_empty() {
            return geometry(format!(
                "{} source bytes for {n} f32 values (and {} flag words)",
                src.len(),
                bad.len()
            ));
        }
        stream.memset_zeros(bad)?;
        let n32 = n as i32;
        let mut b = stream.launch_builder(&self.from_le);
        b.arg(&src.ptr).arg(dst).arg(&n32).arg(bad);
        // SAFETY: arguments match the kernel (pointer as u64, pointer, int, pointer); it reads
        // src[0..4n] (checked: the span is 4n bytes of live device memory) and writes dst[0..n]
        // and bad[0] (both checked above); src does not overlap dst (a request slot vs. an
        // engine buffer).
        unsafe { b.launch(grid_for(n)) }?;
        Ok(())
    }

    /// Queues the reply's top-5 part (and, with `with_logits`, the logits after it) from
    /// `logits` (`n` values) into `out`, which must be 4-byte aligned and hold
    /// [`TOP5_BYTES`] (+ 4n) bytes.
    pub fn top5_reply(
        &self,
        stream: &Arc<cu::CudaStream>,
        logits: &cu::CudaSlice<f32>,
        n: usize,
        out: DeviceSpan<'_>,
        with_logits: bool,
    ) -> Result<(), ResidentError> {
        let need = TOP5_BYTES + if with_logits { 4 * n } else { 0 };
        if n == 0
            || n > logits.len()
            || n > i32::MAX as usize
            || out.len() < need
            || out.ptr % 4 != 0
        {
            return geometry(format!(
                "top-5 of {n} logits (buffer of {}) into {} bytes at {:#x} (need {need}, aligned)",
                logits.len(),
                out.len(),
                out.ptr
            ));
        }
        let (n32, flag) = (n as i32, with_logits as i32);
        let mut b = stream.launch_builder(&self.top5);
        b.arg(logits).arg(&n32).arg(&out.ptr).arg(&flag);
        let cfg = cu::LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match the kernel (pointer, int, pointer as u64, int); it reads
        // logits[0..n] (checked) and writes out[0..48] (+ 4n with logits), inside the span and
        // 4-byte aligned (checked); the block size is the 256 the kernel's shared arrays hold.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

/// The first non-finite value's index from the flag word [`ResidentKernels::f32_from_le_bytes`]
/// left for `n` values.
pub fn first_non_finite(flag: u32, n: usize) -> Option<usize> {
    (flag != 0).then(|| n.saturating_sub(flag as usize))
}

/// Reads the flag word back (4 bytes, counted for the server) after waiting for `stream`.
pub fn read_flag(
    stream: &Arc<cu::CudaStream>,
    flag: &cu::CudaSlice<u32>,
) -> Result<u32, ResidentError> {
    let mut host = [0u32; 1];
    let view = flag.slice(..1);
    stream.memcpy_dtoh(&view, &mut host)?;
    stream.synchronize()?;
    count_d2h(Mover::Server, 4);
    Ok(host[0])
}
