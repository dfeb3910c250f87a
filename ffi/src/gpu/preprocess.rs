//! The GPU preprocessing kernel: interleaved RGB8 (nvJPEG's RGBI output) -> resize so the
//! shorter side is 256 with Pillow's antialiased bilinear filter -> centre crop -> normalise
//! -> NCHW f32, in one pass, compiled by NVRTC at start. The launch is the only `unsafe` and
//! is wrapped here with every size checked, so callers stay safe.
//!
//! Pillow resamples in two passes and rounds to 8 bits between them; this kernel applies the
//! same separable triangle weights in one pass without the intermediate rounding, so values
//! differ from the CPU path by about one 8-bit level at most.

use std::sync::Arc;

use thiserror::Error;

use cudarc::driver::PushKernelArg;

use super::cuda::{self, cu, CudaError};
use super::resident::DeviceSpan;

const KERNEL: &str = r#"
__device__ __forceinline__ float tri(float x) { x = fabsf(x); return x < 1.0f ? 1.0f - x : 0.0f; }

// Pillow's precompute_coeffs for one output coordinate: window [lo, hi) and the weight norm.
__device__ __forceinline__ void window(int out, int in_size, int out_size, int* lo, int* hi,
                                       float* center, float* ss) {
    float scale = (float)in_size / (float)out_size;
    float filterscale = scale < 1.0f ? 1.0f : scale;
    float support = filterscale;  // bilinear support 1.0, scaled
    *center = ((float)out + 0.5f) * scale;
    *ss = 1.0f / filterscale;
    int a = (int)(*center - support + 0.5f);
    int b = (int)(*center + support + 0.5f);
    *lo = a < 0 ? 0 : a;
    *hi = b > in_size ? in_size : b;
}

extern "C" __global__ void resize_crop_normalize(
    const unsigned char* __restrict__ src, int src_w, int src_h, int src_pitch,
    int resized_w, int resized_h, int crop_x, int crop_y, int out_size,
    float* __restrict__ out, float m0, float m1, float m2, float is0, float is1, float is2,
    int bgr)
{
    // Packed BGR (the raw task's pixels, OpenCV's order) is read as RGB by swapping 0 and 2.
    int c0 = bgr ? 2 : 0, c2 = bgr ? 0 : 2;
    int ox = blockIdx.x * blockDim.x + threadIdx.x;
    int oy = blockIdx.y * blockDim.y + threadIdx.y;
    if (ox >= out_size || oy >= out_size) return;
    int xlo, xhi, ylo, yhi; float cx, cy, ssx, ssy;
    window(ox + crop_x, src_w, resized_w, &xlo, &xhi, &cx, &ssx);
    window(oy + crop_y, src_h, resized_h, &ylo, &yhi, &cy, &ssy);
    float wxsum = 0.0f, wysum = 0.0f;
    for (int i = xlo; i < xhi; ++i) wxsum += tri(((float)i - cx + 0.5f) * ssx);
    for (int j = ylo; j < yhi; ++j) wysum += tri(((float)j - cy + 0.5f) * ssy);
    float acc0 = 0.0f, acc1 = 0.0f, acc2 = 0.0f;
    for (int j = ylo; j < yhi; ++j) {
        float wy = tri(((float)j - cy + 0.5f) * ssy);
        if (wy == 0.0f) continue;
        const unsigned char* row = src + (size_t)j * src_pitch;
        float r0 = 0.0f, r1 = 0.0f, r2 = 0.0f;
        for (int i = xlo; i < xhi; ++i) {
            float wx = tri(((float)i - cx + 0.5f) * ssx);
            const unsigned char* p = row + 3 * i;
            r0 += wx * p[c0]; r1 += wx * p[1]; r2 += wx * p[c2];
        }
        acc0 += wy * r0; acc1 += wy * r1; acc2 += wy * r2;
    }
    float norm = 1.0f / (wxsum * wysum * 255.0f);
    int plane = out_size * out_size;
    int at = oy * out_size + ox;
    out[at]             = (acc0 * norm - m0) * is0;
    out[plane + at]     = (acc1 * norm - m1) * is1;
    out[2 * plane + at] = (acc2 * norm - m2) * is2;
}
"#;

#[derive(Debug, Error)]
pub enum GpuPreprocessError {
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error("NVRTC unavailable: libnvrtc not found (CUDA toolkit runtime libraries)")]
    NoNvrtc,
    #[error("NVRTC could not compile the preprocessing kernel: {0}")]
    Compile(String),
    #[error("bad preprocessing geometry: {0}")]
    Geometry(String),
}

impl From<cu::DriverError> for GpuPreprocessError {
    fn from(e: cu::DriverError) -> Self {
        GpuPreprocessError::Cuda(CudaError::Driver(e))
    }
}

/// Where the crop sits: source size, resized size and crop offset (as the CPU path computes
/// them), plus the output side and the normalisation.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub src_w: usize,
    pub src_h: usize,
    /// Bytes per source row (>= 3 * src_w).
    pub src_pitch: usize,
    pub resized_w: usize,
    pub resized_h: usize,
    pub crop_x: usize,
    pub crop_y: usize,
    pub out_size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// The compiled kernel, loaded into one context.
pub struct GpuPreprocessor {
    function: cu::CudaFunction,
}

impl GpuPreprocessor {
    /// Compiles the kernel with NVRTC and loads it into `ctx`.
    pub fn new(ctx: &Arc<cu::CudaContext>) -> Result<Self, GpuPreprocessError> {
        // SAFETY: only tries to dlopen libnvrtc by name; cudarc panics on a missing library,
        // so this check must come first.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(GpuPreprocessError::NoNvrtc);
        }
        let ptx = cudarc::nvrtc::compile_ptx(KERNEL)
            .map_err(|e| GpuPreprocessError::Compile(format!("{e:?}")))?;
        let module = ctx.load_module(ptx)?;
        let function = module.load_function("resize_crop_normalize")?;
        Ok(GpuPreprocessor { function })
    }

    /// Queues the kernel on `stream`: `src` holds the RGB8 image, `out` (a whole buffer, or
    /// one image's slot of a batch) receives 3 x out_size x out_size f32 (NCHW).
    pub fn launch(
        &self,
        stream: &Arc<cu::CudaStream>,
        src: &cu::CudaSlice<u8>,
        g: &Geometry,
        out: &mut cu::CudaViewMut<'_, f32>,
    ) -> Result<(), GpuPreprocessError> {
        use cu::DevicePtr;
        let (ptr, _sync) = src.device_ptr(stream);
        self.launch_at(stream, ptr, src.len(), g, out, false)
    }

    /// As [`Self::launch`] for packed BGR8 pixels wherever they lie in device memory (the
    /// raw task's pixels, in a GPUDirect request slot or an upload buffer).
    pub fn launch_bgr(
        &self,
        stream: &Arc<cu::CudaStream>,
        src: DeviceSpan<'_>,
        g: &Geometry,
        out: &mut cu::CudaViewMut<'_, f32>,
    ) -> Result<(), GpuPreprocessError> {
        self.launch_at(stream, src.addr(), src.len(), g, out, true)
    }

    /// As [`Self::launch`] for packed RGB8 pixels in a span of device memory (one image of
    /// a batch decoded into a shared buffer).
    pub fn launch_rgb(
        &self,
        stream: &Arc<cu::CudaStream>,
        src: DeviceSpan<'_>,
        g: &Geometry,
        out: &mut cu::CudaViewMut<'_, f32>,
    ) -> Result<(), GpuPreprocessError> {
        self.launch_at(stream, src.addr(), src.len(), g, out, false)
    }

    /// `src_len` bytes of live device memory at `src` hold the image.
    fn launch_at(
        &self,
        stream: &Arc<cu::CudaStream>,
        src: u64,
        src_len: usize,
        g: &Geometry,
        out: &mut cu::CudaViewMut<'_, f32>,
        bgr: bool,
    ) -> Result<(), GpuPreprocessError> {
        let bad = |m: String| Err(GpuPreprocessError::Geometry(m));
        if g.src_w == 0 || g.src_h == 0 || g.resized_w == 0 || g.resized_h == 0 || g.out_size == 0 {
            return bad(format!("zero size in {g:?}"));
        }
        if g.src_pitch < 3 * g.src_w || src_len < g.src_pitch * g.src_h {
            return bad(format!("source buffer of {src_len} B too small for {g:?}"));
        }
        if g.crop_x + g.out_size > g.resized_w || g.crop_y + g.out_size > g.resized_h {
            return bad(format!("crop outside the resized image: {g:?}"));
        }
        if out.len() < 3 * g.out_size * g.out_size {
            return bad(format!("output of {} floats too small", out.len()));
        }
        let dims = [
            g.src_w,
            g.src_h,
            g.src_pitch,
            g.resized_w,
            g.resized_h,
            g.crop_x,
            g.crop_y,
            g.out_size,
        ];
        if dims.iter().any(|&d| d > i32::MAX as usize) {
            return bad(format!("dimension above i32 in {g:?}"));
        }
        let [src_w, src_h, src_pitch, resized_w, resized_h, crop_x, crop_y, out_size] =
            dims.map(|d| d as i32);
        let inv = g.std.map(|s| 1.0 / s);
        let cfg = cu::LaunchConfig {
            grid_dim: (
                (out_size as u32).div_ceil(16),
                (out_size as u32).div_ceil(16),
                1,
            ),
            block_dim: (16, 16, 1),
            shared_mem_bytes: 0,
        };
        let bgr = bgr as i32;
        let mut b = stream.launch_builder(&self.function);
        b.arg(&src)
            .arg(&src_w)
            .arg(&src_h)
            .arg(&src_pitch)
            .arg(&resized_w)
            .arg(&resized_h)
            .arg(&crop_x)
            .arg(&crop_y)
            .arg(&out_size)
            .arg(out)
            .arg(&g.mean[0])
            .arg(&g.mean[1])
            .arg(&g.mean[2])
            .arg(&inv[0])
            .arg(&inv[1])
            .arg(&inv[2])
            .arg(&bgr);
        // SAFETY: the argument list matches the kernel's signature one to one (pointers,
        // 8 ints, 6 floats, 1 int in order); src is live device memory of src_len bytes (the
        // callers' slice or span); every read stays inside it (rows < src_h at src_pitch,
        // columns < src_w, checked above against src_len) and every write inside out
        // (3 * out_size^2 floats, checked above).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }
}

/// Whether the GPU preprocessing can run here (driver and NVRTC present), for tests to skip.
pub fn available() -> Result<(), GpuPreprocessError> {
    if !cuda::driver_present() {
        return Err(GpuPreprocessError::Cuda(CudaError::NoDriver));
    }
    // SAFETY: as in new(): a dlopen probe only.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(GpuPreprocessError::NoNvrtc);
    }
    Ok(())
}
