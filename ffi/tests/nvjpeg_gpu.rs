//! nvJPEG on a real GPU: layout against the real nvjpeg.h, decode of the project's test photo
//! compared with Pillow's decode of the same file, typed errors for bad input, and a timing
//! line. Skips loudly where there is no CUDA driver or no libnvjpeg (every machine but the GPU
//! machine).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use hacserve_ffi::gpu::cuda::{self, cu};
use hacserve_ffi::gpu::nvjpeg::{self, DecodeBackend, JpegDecoder, NvJpeg, SizedJpegDecoder};

/// The repository root: HACSERVE_REPO when the test binary was carried to another machine.
fn repo() -> PathBuf {
    std::env::var_os("HACSERVE_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."))
}

/// Pillow's decode of models/grace_hopper.jpg: size and per-channel means (from the fixture
/// written by scripts/make_preprocess_fixture.py).
const PILLOW_SIZE: (i32, i32) = (512, 600);
const PILLOW_MEAN: [f64; 3] = [82.484501953125, 72.430107421875, 86.42437825520834];

fn gpu_or_skip() -> Option<&'static NvJpeg> {
    if !cuda::driver_present() {
        eprintln!("SKIPPED nvJPEG GPU test: no CUDA driver (libcuda.so.1) on this machine");
        return None;
    }
    match NvJpeg::load() {
        Ok(api) => Some(api),
        Err(e) => {
            eprintln!("SKIPPED nvJPEG GPU test: {e}");
            None
        }
    }
}

#[test]
fn nvjpeg_layout_matches_the_header() {
    let header = PathBuf::from("/usr/local/cuda/include/nvjpeg.h");
    if !header.exists() {
        eprintln!("SKIPPED nvjpeg layout: {} not found", header.display());
        return;
    }
    let dir = std::env::temp_dir().join(format!("nvjpeg-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("l.c");
    std::fs::write(
        &src,
        r#"#include <stdio.h>
#include <stddef.h>
#include <nvjpeg.h>
/* The prototypes ffi/src/gpu/sys/nvjpeg.rs declares, as C function pointer types: built with
   -Werror=incompatible-pointer-types, any difference from the header fails the build. */
typedef nvjpegStatus_t (*create_ex_t)(nvjpegBackend_t, nvjpegDevAllocator_t *, nvjpegPinnedAllocator_t *,
                                      unsigned int, nvjpegHandle_t *);
typedef nvjpegStatus_t (*parse_header_t)(nvjpegHandle_t, const unsigned char *, size_t, nvjpegJpegStream_t);
typedef nvjpegStatus_t (*supported_t)(nvjpegHandle_t, nvjpegJpegStream_t, int *);
typedef nvjpegStatus_t (*initialize_t)(nvjpegHandle_t, nvjpegJpegState_t, int, int, nvjpegOutputFormat_t);
typedef nvjpegStatus_t (*batched_t)(nvjpegHandle_t, nvjpegJpegState_t, const unsigned char *const *,
                                    const size_t *, nvjpegImage_t *, cudaStream_t);
typedef nvjpegStatus_t (*hw_info_t)(nvjpegHandle_t, unsigned int *, unsigned int *);
typedef nvjpegStatus_t (*decode_t)(nvjpegHandle_t, nvjpegJpegState_t, const unsigned char *, size_t,
                                   nvjpegOutputFormat_t, nvjpegImage_t *, cudaStream_t);
typedef nvjpegStatus_t (*stream_create_t)(nvjpegHandle_t, nvjpegJpegStream_t *);
typedef nvjpegStatus_t (*state_create_t)(nvjpegHandle_t, nvjpegJpegState_t *);
int main(void) {
  create_ex_t a = nvjpegCreateEx; parse_header_t b = nvjpegJpegStreamParseHeader;
  supported_t c = nvjpegDecodeBatchedSupported; initialize_t d = nvjpegDecodeBatchedInitialize;
  batched_t e = nvjpegDecodeBatched; hw_info_t f = nvjpegGetHardwareDecoderInfo; decode_t g = nvjpegDecode;
  stream_create_t h = nvjpegJpegStreamCreate; state_create_t i = nvjpegJpegStateCreate;
  if (!a || !b || !c || !d || !e || !f || !g || !h || !i) return 1;
  printf("%zu %zu %zu %d %d %d %d %d %d %d %d %d %d\n", sizeof(nvjpegImage_t), offsetof(nvjpegImage_t, pitch),
         sizeof(cudaStream_t), NVJPEG_MAX_COMPONENT, (int)NVJPEG_OUTPUT_RGBI,
         (int)NVJPEG_STATUS_SUCCESS, (int)NVJPEG_STATUS_BAD_JPEG, (int)NVJPEG_STATUS_INCOMPLETE_BITSTREAM,
         (int)NVJPEG_STATUS_JPEG_NOT_SUPPORTED, (int)NVJPEG_STATUS_IMPLEMENTATION_NOT_SUPPORTED,
         (int)NVJPEG_BACKEND_HYBRID, (int)NVJPEG_BACKEND_GPU_HYBRID, (int)NVJPEG_BACKEND_HARDWARE);
  return 0;
}"#,
    )
    .unwrap();
    let exe = dir.join("l");
    let cc = Command::new("cc")
        .args([
            "-I/usr/local/cuda/include",
            "-Werror=incompatible-pointer-types",
            "-Werror=implicit-function-declaration",
            "-o",
        ])
        .arg(&exe)
        .arg(&src)
        .args(["-L/usr/local/cuda/lib64", "-lnvjpeg"])
        .output()
        .unwrap();
    assert!(
        cc.status.success(),
        "{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let out = String::from_utf8(Command::new(&exe).output().unwrap().stdout).unwrap();
    let c: Vec<i64> = out.split_whitespace().map(|v| v.parse().unwrap()).collect();
    let rust = vec![
        std::mem::size_of::<hacserve_ffi::gpu::sys::nvjpeg::nvjpegImage_t>() as i64,
        std::mem::offset_of!(hacserve_ffi::gpu::sys::nvjpeg::nvjpegImage_t, pitch) as i64,
        std::mem::size_of::<hacserve_ffi::gpu::sys::nvjpeg::cudaStream_t>() as i64,
        hacserve_ffi::gpu::sys::nvjpeg::NVJPEG_MAX_COMPONENT as i64,
        hacserve_ffi::gpu::sys::nvjpeg::NVJPEG_OUTPUT_RGBI as i64,
        hacserve_ffi::gpu::sys::nvjpeg::NVJPEG_STATUS_SUCCESS as i64,
        3,
        10,
        4,
        9,
        hacserve_ffi::gpu::sys::nvjpeg::NVJPEG_BACKEND_HYBRID as i64,
        hacserve_ffi::gpu::sys::nvjpeg::NVJPEG_BACKEND_GPU_HYBRID as i64,
        hacserve_ffi::gpu::sys::nvjpeg::NVJPEG_BACKEND_HARDWARE as i64,
    ];
    assert_eq!(c, rust, "C (left) vs Rust (right)");
    assert_eq!(nvjpeg::status_name(3), "BAD_JPEG");
}

#[test]
fn nvjpeg_decodes_like_pillow_and_rejects_bad_input() {
    let Some(api) = gpu_or_skip() else { return };
    let ctx = cuda::driver(0).expect("CUDA context on GPU 0");
    let stream = ctx.default_stream();
    let jpeg = std::fs::read(repo().join("models/grace_hopper.jpg")).unwrap();
    let mut dec = JpegDecoder::new(api).expect("nvJPEG handle");
    let (components, w, h) = dec.image_info(&jpeg).unwrap();
    assert_eq!((components, w, h), (3, PILLOW_SIZE.0, PILLOW_SIZE.1));
    let pitch = w as usize * 3;
    let mut buf = stream.alloc_zeros::<u8>(pitch * h as usize).unwrap();
    let decode = |dec: &mut JpegDecoder, data: &[u8], buf: &mut cu::CudaSlice<u8>| {
        use cu::DevicePtrMut;
        let (ptr, _sync) = buf.device_ptr_mut(&stream);
        // SAFETY: buf holds pitch*h bytes of device memory and lives past the synchronize
        // below; the stream is this context's.
        let r = unsafe { dec.decode_rgbi(data, ptr as *mut u8, pitch, stream.cu_stream() as _) };
        stream.synchronize().unwrap();
        r
    };
    decode(&mut dec, &jpeg, &mut buf).unwrap();
    let host = stream.clone_dtoh(&buf).unwrap();
    let mut sums = [0f64; 3];
    for px in host.chunks_exact(3) {
        for c in 0..3 {
            sums[c] += px[c] as f64;
        }
    }
    let n = (w * h) as f64;
    let means: Vec<f64> = sums.iter().map(|s| s / n).collect();
    for c in 0..3 {
        // Different IDCT and chroma upsampling than libjpeg-turbo: a fraction of a level on
        // average; a wrong channel order or a half-decoded image is off by tens of levels.
        assert!(
            (means[c] - PILLOW_MEAN[c]).abs() < 1.0,
            "channel {c}: nvJPEG mean {:.3} vs Pillow {:.3}",
            means[c],
            PILLOW_MEAN[c]
        );
    }

    // Typed errors, and the decoder still works afterwards.
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let err = decode(&mut dec, &garbage, &mut buf)
        .unwrap_err()
        .to_string();
    assert!(err.contains("nvjpeg"), "{err}");
    assert!(
        dec.image_info(&jpeg[..200]).is_err()
            || decode(&mut dec, &jpeg[..jpeg.len() / 2], &mut buf).is_err()
    );
    decode(&mut dec, &jpeg, &mut buf).unwrap();

    let iters = 200;
    let t0 = Instant::now();
    for _ in 0..iters {
        decode(&mut dec, &jpeg, &mut buf).unwrap();
    }
    let per = t0.elapsed().as_secs_f64() * 1e3 / iters as f64;
    println!(
        "nvJPEG ({}) decode of {}x{} grace_hopper.jpg ({} B) to RGBI on {}: {:.3} ms mean over {iters} (synchronous, default backend)",
        api.soname(),
        w,
        h,
        jpeg.len(),
        ctx.name().unwrap_or_default(),
        per
    );
}

/// A large JPEG made from the test photo by OpenCV, where python3 has it (the GPU machine).
fn large_jpeg(width: usize, height: usize) -> Result<Vec<u8>, String> {
    opencv_jpeg(width, height, false)
}

/// The test photo resized by OpenCV to `width`x`height`, quality 90, baseline or progressive.
fn opencv_jpeg(width: usize, height: usize, progressive: bool) -> Result<Vec<u8>, String> {
    let out = std::env::temp_dir().join(format!(
        "nvjpeg-{width}x{height}-{progressive}-{}.jpg",
        std::process::id()
    ));
    let script = format!(
        "import cv2; im = cv2.imread({src:?}); im = cv2.resize(im, ({width}, {height}), \
         interpolation=cv2.INTER_CUBIC); cv2.imwrite({out:?}, im, [cv2.IMWRITE_JPEG_QUALITY, 90, \
         cv2.IMWRITE_JPEG_PROGRESSIVE, {}])",
        progressive as i32,
        src = repo().join("models/grace_hopper.jpg").display().to_string(),
        out = out.display().to_string(),
    );
    let run = Command::new("python3")
        .args(["-c", &script])
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    if !run.status.success() {
        return Err(String::from_utf8_lossy(&run.stderr).into_owned());
    }
    std::fs::read(&out).map_err(|e| e.to_string())
}

/// The two decode paths nvJPEG offers here, on a small and a large image: the single-phase
/// API (default backend) and the decoupled API's GPU_HYBRID backend (GPU Huffman). Both give
/// the same pixels up to IDCT rounding; the timings decided the server's choice (H100: the
/// single-phase path wins at both sizes, 0.23 vs 1.25-1.5 ms at 512x600 and 6.4 vs 10.6-15.9 ms at
/// 4000x3000, so the server uses it for every size). The size rule itself is checked too.
#[test]
fn sized_decoder_picks_the_backend_by_size_and_backends_agree() {
    let Some(api) = gpu_or_skip() else { return };
    let ctx = cuda::driver(0).expect("CUDA context on GPU 0");
    let stream = ctx.default_stream();
    let threshold = 1_000_000;
    let mut dec = match SizedJpegDecoder::new(api, threshold) {
        Ok(d) => d,
        Err(e) => panic!("decoupled nvJPEG API unavailable in {}: {e}", api.soname()),
    };
    println!("GPU_HYBRID backend available: {}", dec.has_gpu_backend());
    let small = std::fs::read(repo().join("models/grace_hopper.jpg")).unwrap();
    let mut images = vec![("512x600 test photo".to_string(), small)];
    match large_jpeg(4000, 3000) {
        Ok(big) => images.push(("4000x3000 (OpenCV upscale)".to_string(), big)),
        Err(why) => eprintln!("SKIPPED large-JPEG part: cannot make one ({why})"),
    }
    for (label, jpeg) in &images {
        let (_, w, h) = dec.image_info(jpeg).unwrap();
        let (w, h) = (w as usize, h as usize);
        let mut a = stream.alloc_zeros::<u8>(w * h * 3).unwrap();
        let mut b = stream.alloc_zeros::<u8>(w * h * 3).unwrap();
        let (_, _, picked) = dec.decode_into(jpeg, &stream, &mut a, None).unwrap();
        let want = if w * h >= threshold && dec.has_gpu_backend() {
            DecodeBackend::GpuHuffman
        } else {
            DecodeBackend::CpuHuffman
        };
        assert_eq!(picked, want, "{label}");
        let mut times = Vec::new();
        for backend in [DecodeBackend::CpuHuffman, DecodeBackend::GpuHuffman] {
            let out = if backend == DecodeBackend::CpuHuffman {
                &mut a
            } else {
                &mut b
            };
            let (_, _, used) = dec.decode_into(jpeg, &stream, out, Some(backend)).unwrap();
            stream.synchronize().unwrap();
            let iters = 30;
            let t0 = Instant::now();
            for _ in 0..iters {
                dec.decode_into(jpeg, &stream, out, Some(backend)).unwrap();
                stream.synchronize().unwrap();
            }
            times.push((
                backend,
                used,
                t0.elapsed().as_secs_f64() * 1e3 / iters as f64,
            ));
        }
        let ha = stream.clone_dtoh(&a).unwrap();
        let hb = stream.clone_dtoh(&b).unwrap();
        let max = ha
            .iter()
            .zip(&hb)
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap_or(0);
        let mean = ha
            .iter()
            .zip(&hb)
            .map(|(x, y)| x.abs_diff(*y) as f64)
            .sum::<f64>()
            / ha.len() as f64;
        println!(
            "{label}: {times:?} (path asked, path used, ms mean); |CPU - GPU Huffman| max {max} \
             mean {mean:.4} levels"
        );
        // The two paths differ in IDCT/upsampling rounding (measured: at most 3 levels on the
        // test photo); a wrong channel order or a corrupt decode is off by tens of levels.
        assert!(
            max <= 8 && mean < 0.5,
            "{label}: paths disagree: max {max}, mean {mean}"
        );
    }
    // Garbage fails cleanly on both paths, and the decoder still works after.
    let mut buf = stream.alloc_zeros::<u8>(512 * 600 * 3).unwrap();
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for path in [DecodeBackend::CpuHuffman, DecodeBackend::GpuHuffman] {
        assert!(dec
            .decode_into(&garbage, &stream, &mut buf, Some(path))
            .is_err());
    }
    dec.decode_into(&images[0].1, &stream, &mut buf, None)
        .unwrap();
}

/// nvJPEG's hardware backend through the batched API: a baseline batch decodes in one call to
/// the same pixels as the hybrid path (up to IDCT rounding), a progressive JPEG is refused by
/// `nvjpegDecodeBatchedSupported` (the engines take baseline only), a batch above the
/// capacity and a destination too small are typed errors, and timings of both paths print.
/// GPUs with NVJPG engines (A100, H100, H200) must have the backend; others skip loudly.
#[test]
fn hardware_batch_decodes_like_the_hybrid_path_and_refuses_progressive() {
    use hacserve_ffi::gpu::nvjpeg_batched::{HardwareItem, HardwareJpegDecoder};
    use hacserve_ffi::gpu::resident::DeviceSpan;
    let Some(api) = gpu_or_skip() else { return };
    let ctx = cuda::driver(0).expect("CUDA context on GPU 0");
    let name = ctx.name().unwrap_or_default();
    let stream = ctx.default_stream();
    let mut hw = match HardwareJpegDecoder::new(api, 8) {
        Ok(hw) => hw,
        Err(e)
            if ["A100", "H100", "H200", "A30"]
                .iter()
                .any(|g| name.contains(g)) =>
        {
            panic!("{name} has NVJPG engines but nvJPEG's hardware backend failed: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED nvJPEG hardware test: {name}: {e}");
            return;
        }
    };
    println!(
        "nvJPEG hardware backend on {name}: engines x cores {:?}",
        hw.engines()
    );
    let photo = std::fs::read(repo().join("models/grace_hopper.jpg")).unwrap();
    assert!(
        hw.supported(&photo).unwrap(),
        "baseline 4:2:0 photo refused"
    );
    match opencv_jpeg(640, 480, true) {
        Ok(progressive) => {
            let yes = hw.supported(&progressive).unwrap();
            println!("progressive 640x480: hardware takes it: {yes}");
            assert!(!yes, "the NVJPG engines take baseline JPEGs only");
        }
        Err(why) => eprintln!("SKIPPED progressive part: cannot make one ({why})"),
    }
    let mut images = vec![photo.clone()];
    if let Ok(j) = opencv_jpeg(1920, 1080, false) {
        images.push(j);
    }
    if let Ok(j) = opencv_jpeg(500, 375, false) {
        images.push(j);
    }
    let mut simple = JpegDecoder::new(api).unwrap();
    let sizes: Vec<(usize, usize)> = images
        .iter()
        .map(|j| {
            let (_, w, h) = simple.image_info(j).unwrap();
            (w as usize, h as usize)
        })
        .collect();
    let place = |k: usize| {
        sizes[..k]
            .iter()
            .map(|(w, h)| (3 * w * h).next_multiple_of(256))
            .sum::<usize>()
    };
    let total = place(images.len());
    let hw_buf = stream.alloc_zeros::<u8>(total).unwrap();
    let ref_buf = stream.alloc_zeros::<u8>(total).unwrap();
    let all = DeviceSpan::of(&hw_buf, &stream, total).unwrap();
    let mut got = Vec::new();
    let item = |k: usize| HardwareItem {
        jpeg: &images[k],
        dst: all.sub(place(k), 3 * sizes[k].0 * sizes[k].1).unwrap(),
    };
    hw.decode_batch(images.len(), item, &stream, &mut got)
        .unwrap();
    assert_eq!(got, sizes);
    {
        let refs = DeviceSpan::of(&ref_buf, &stream, total).unwrap();
        for (k, j) in images.iter().enumerate() {
            let dst = refs.sub(place(k), 3 * sizes[k].0 * sizes[k].1).unwrap();
            simple.decode_into_span(j, &stream, dst).unwrap();
        }
    }
    let a = stream.clone_dtoh(&hw_buf).unwrap();
    let b = stream.clone_dtoh(&ref_buf).unwrap();
    for (k, &(w, h)) in sizes.iter().enumerate() {
        let (lo, hi) = (place(k), place(k) + 3 * w * h);
        let diffs: Vec<u8> = a[lo..hi]
            .iter()
            .zip(&b[lo..hi])
            .map(|(x, y)| x.abs_diff(*y))
            .collect();
        let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
        let max = diffs.iter().copied().max().unwrap_or(0);
        println!("image {k} {w}x{h}: |hardware - hybrid| mean {mean:.4} max {max} levels");
        // Another IDCT and upsampler: fractions of a level on average; a wrong channel
        // order, a missing image or a shifted place is tens of levels off.
        assert!(
            mean < 2.0,
            "image {k}: hardware and hybrid decodes differ by {mean} on average"
        );
    }
    // Typed errors: above the capacity, and a place too small for its image.
    let nine = hw.decode_batch(9, item_of(&images[0], all), &stream, &mut got);
    assert!(nine.is_err(), "a batch of 9 on a decoder of 8");
    let small = hw.decode_batch(
        1,
        |_| HardwareItem {
            jpeg: &images[0],
            dst: all.sub(0, 100).unwrap(),
        },
        &stream,
        &mut got,
    );
    assert!(
        matches!(small, Err(nvjpeg::NvJpegError::TooLarge { .. })),
        "{small:?}"
    );
    // Timings: the batch of 8 copies of the photo vs 8 hybrid decodes.
    let n = 8;
    let per = (3 * 512 * 600usize).next_multiple_of(256);
    let big = stream.alloc_zeros::<u8>(n * per).unwrap();
    let span = DeviceSpan::of(&big, &stream, n * per).unwrap();
    let iters = 50;
    let t0 = Instant::now();
    for _ in 0..iters {
        hw.decode_batch(
            n,
            |k| HardwareItem {
                jpeg: &photo,
                dst: span.sub(k * per, per).unwrap(),
            },
            &stream,
            &mut got,
        )
        .unwrap();
    }
    let hw_ms = t0.elapsed().as_secs_f64() * 1e3 / iters as f64;
    let t0 = Instant::now();
    for _ in 0..iters {
        for k in 0..n {
            simple
                .decode_into_span(&photo, &stream, span.sub(k * per, per).unwrap())
                .unwrap();
        }
    }
    let hybrid_ms = t0.elapsed().as_secs_f64() * 1e3 / iters as f64;
    println!(
        "8 x 512x600 on {name}: hardware batch {hw_ms:.3} ms ({:.0} img/s), hybrid one by one {hybrid_ms:.3} ms ({:.0} img/s), one thread",
        n as f64 * 1e3 / hw_ms,
        n as f64 * 1e3 / hybrid_ms
    );
}

fn item_of<'a>(
    jpeg: &'a [u8],
    all: hacserve_ffi::gpu::resident::DeviceSpan<'a>,
) -> impl FnMut(usize) -> hacserve_ffi::gpu::nvjpeg_batched::HardwareItem<'a> {
    move |_| hacserve_ffi::gpu::nvjpeg_batched::HardwareItem { jpeg, dst: all }
}
