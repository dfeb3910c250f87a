//! CPU preprocessing equivalent to torchvision's ImageNet eval transform on PIL images:
//! `Resize(256)` (bilinear, antialiased) -> `CenterCrop(224)` -> `ToTensor()` ->
//! `Normalize(mean, std)`, producing a 1x3x224x224 NCHW `f32` tensor.
//!
//! The resizer is a port of Pillow's `ImagingResample` for 8-bit images (triangle filter
//! whose support grows with the downscale factor, per-output-pixel coefficients normalised
//! to fixed point with `PRECISION_BITS`, horizontal pass then vertical pass, rounding to
//! `u8` after each pass), so on the same RGB input it reproduces PIL bit for bit. Only the
//! 224x224 window that survives the centre crop is computed: PIL computes every output
//! pixel independently, so skipping the cropped-away ones changes no value.
//!
//! Hot path: every buffer is owned by [`Preprocessor`] / [`Resampler`] and reused; they grow
//! only when an image needs more than any before it, bounded by `max_pixels`. (zune-jpeg
//! still allocates its own small per-decode state internally; its API offers no way to
//! reuse that.)

use std::panic::{catch_unwind, AssertUnwindSafe};

use thiserror::Error;
use zune_jpeg::zune_core::colorspace::ColorSpace;
use zune_jpeg::zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

/// Side of the square model input.
pub const INPUT_SIZE: usize = 224;
/// The most `--max-image-pixels` may be set to (w*h): the decoders' hard cap, on the CPU or
/// the GPU (an 8192x8192 image: 201 MB of RGB alone).
pub const MAX_IMAGE_PIXELS: usize = 8192 * 8192;
/// `--max-image-pixels` by default: a 24-megapixel photo (6000x4000, the usual APS-C and
/// full-frame camera size) is the largest that passes. ImageNet-class photos (about 500x375)
/// and phone photos at their default 12 MP (4032x3024) are far below it. At the limit a worker
/// holds at most 9 bytes a pixel while it decodes (216 MB, see docs/design.md), and only for
/// that request.
pub const DEFAULT_MAX_IMAGE_PIXELS: usize = 6000 * 4000;
/// Images up to this size (w*h) are the steady state: decode buffers sized for them are kept
/// between requests; growth beyond it is released once the request is done
/// ([`Preprocessor::release_growth`]). A 12-megapixel photo (4000x3000): 36 MB of RGB.
pub const STEADY_IMAGE_PIXELS: usize = 4000 * 3000;
/// `Resize(256)`: the shorter image side after resizing.
pub const RESIZE_SHORTER: usize = 256;
/// Elements of one NCHW input tensor (batch 1).
pub const TENSOR_LEN: usize = 3 * INPUT_SIZE * INPUT_SIZE;
/// ImageNet per-channel mean (RGB), as in torchvision's reference scripts.
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet per-channel standard deviation (RGB).
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Pillow's fixed-point precision: 8 bits for the result, 2 spare for overflow, sign.
const PRECISION_BITS: u32 = 32 - 8 - 2;
/// Largest side a JPEG header can declare, less 7; zune's own default cap (16384) is lifted
/// so `max_pixels` alone decides, with our typed error. The 7: zune-jpeg 0.4 rounds a side
/// up to whole 8-pixel blocks in u16 arithmetic, which overflows above 65528 (found by the
/// jpeg fuzz target: a panic with overflow checks, a wrapped block count without), so such
/// images get the decoder's size error instead.
const JPEG_MAX_SIDE: usize = u16::MAX as usize - 7;

#[derive(Debug, Error)]
pub enum PreprocessError {
    /// Corrupt, truncated or unsupported JPEG; carries the decoder's message.
    #[error("JPEG decode failed: {0}")]
    Decode(String),
    #[error("image is {width}x{height}, above the limit of {max_pixels} pixels")]
    TooLarge {
        width: usize,
        height: usize,
        max_pixels: usize,
    },
    #[error("image has zero size ({width}x{height})")]
    ZeroSize { width: usize, height: usize },
    #[error("preprocess called with no successfully decoded image")]
    NotDecoded,
    #[error("{what} has {actual} elements, expected {expected}")]
    BadLength {
        what: &'static str,
        actual: usize,
        expected: usize,
    },
    #[error("window {x},{y} {width}x{height} does not fit in the {dst_width}x{dst_height} output")]
    BadWindow {
        x: usize,
        y: usize,
        width: usize,
        height: usize,
        dst_width: usize,
        dst_height: usize,
    },
}

/// Output size of torchvision's `Resize(shorter)` for a `width`x`height` image: the shorter
/// side becomes `shorter`, the longer one `int(shorter * long / short)` (truncated).
pub fn resized_size(width: usize, height: usize, shorter: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    // Exact integer floor; equals Python's int() of the float quotient at image sizes.
    let new_long = shorter.saturating_mul(long).checked_div(short).unwrap_or(0);
    if width <= height {
        (shorter, new_long)
    } else {
        (new_long, shorter)
    }
}

/// torchvision's centre-crop offset `int(round((len - crop) / 2.0))`; Python rounds
/// halves to even, so 117/2 = 58.5 gives 58 but 119/2 = 59.5 gives 60.
pub fn center_crop_offset(len: usize, crop: usize) -> usize {
    let d = len.saturating_sub(crop);
    let half = d / 2;
    if d % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

/// A rectangle of a resize's output, in output pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub x: usize,
    pub y: usize,
    pub width: usize,
    pub height: usize,
}

/// Fixed-point filter taps for a window of output positions along one axis.
#[derive(Debug, Default)]
struct Coeffs {
    /// Per output position: first source index and number of taps.
    bounds: Vec<(usize, usize)>,
    /// `ksize` taps per output position (unused tail is zero).
    weights: Vec<i32>,
    ksize: usize,
    /// f64 taps of one position before fixed-point conversion.
    scratch: Vec<f64>,
}

impl Coeffs {
    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` (BILINEAR filter, support 1)
    /// for output positions `first..first + count` of an `in_size` -> `out_size` resize.
    /// The floating-point expressions keep Pillow's operation order so taps match exactly.
    fn compute(&mut self, in_size: usize, out_size: usize, first: usize, count: usize) {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filterscale; // BILINEAR support (1.0) * filterscale
        let ksize = support.ceil() as usize * 2 + 1;
        let ss = 1.0 / filterscale;

        self.ksize = ksize;
        self.bounds.clear();
        self.weights.clear();
        self.weights.resize(count * ksize, 0);
        self.scratch.clear();
        self.scratch.resize(ksize, 0.0);

        for (i, taps) in self.weights.chunks_exact_mut(ksize).enumerate() {
            let center = (first + i) as f64 + 0.5;
            let center = center * scale;
            // C's (int) cast truncates toward zero, like `as`.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).clamp(0, in_size as i64) as usize;
            // Can only exceed ksize by float fuzz; never index past the tap row.
            let len = xmax.saturating_sub(xmin).min(ksize);

            let mut ww = 0.0;
            for (x, k) in self.scratch[..len].iter_mut().enumerate() {
                let w = bilinear_filter(((x + xmin) as f64 - center + 0.5) * ss);
                *k = w;
                ww += w;
            }
            for (k, t) in self.scratch[..len].iter().zip(taps.iter_mut()) {
                let k = if ww != 0.0 { k / ww } else { *k };
                let scaled = k * f64::from(1u32 << PRECISION_BITS);
                *t = if k < 0.0 {
                    (-0.5 + scaled) as i32
                } else {
                    (0.5 + scaled) as i32
                };
            }
            self.bounds.push((xmin, len));
        }
    }
}

fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Pillow's `clip8`: drop the fixed-point fraction and saturate to a byte.
#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow-exact separable bilinear resampler for interleaved RGB8 images, with reusable
/// scratch buffers.
#[derive(Debug, Default)]
pub struct Resampler {
    horiz: Coeffs,
    vert: Coeffs,
    /// Horizontal-pass output: the source rows the window needs, window columns only.
    tmp: Vec<u8>,
    /// Vertical-pass accumulators for one output row.
    acc: Vec<i32>,
}

/// Scratch bytes of the horizontal pass an image of [`STEADY_IMAGE_PIXELS`] needs at most
/// (its window's source rows, 224 output columns): kept; more is released after the image.
/// A 4000x3000 image's window spans about 2630 source rows of 672 bytes.
const STEADY_TMP_BYTES: usize = 4 << 20;

impl Resampler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Gives back scratch beyond the steady size (see [`Preprocessor::release_growth`]).
    pub fn release_growth(&mut self) {
        if self.tmp.capacity() > STEADY_TMP_BYTES {
            self.tmp = Vec::new();
        }
    }

    /// Bytes of scratch held now.
    pub fn buffer_bytes(&self) -> usize {
        self.tmp.capacity()
            + 4 * (self.acc.capacity()
                + self.horiz.weights.capacity()
                + self.vert.weights.capacity())
    }

    /// Writes `window` of the `dst_size` (width, height) resize of `src` (RGB8, HWC,
    /// `src_size`) into `dst` (RGB8, HWC, `window.width * window.height * 3` bytes),
    /// matching PIL's `Image.resize(dst_size, Image.BILINEAR)`.
    pub fn resize_window(
        &mut self,
        src: &[u8],
        src_size: (usize, usize),
        dst_size: (usize, usize),
        window: Window,
        dst: &mut [u8],
    ) -> Result<(), PreprocessError> {
        let (sw, sh) = src_size;
        let (dw, dh) = dst_size;
        for (width, height) in [src_size, dst_size, (window.width, window.height)] {
            if width == 0 || height == 0 {
                return Err(PreprocessError::ZeroSize { width, height });
            }
        }
        let expected_src = sw.checked_mul(sh).and_then(|p| p.checked_mul(3));
        if expected_src != Some(src.len()) {
            return Err(PreprocessError::BadLength {
                what: "RGB source buffer",
                actual: src.len(),
                expected: expected_src.unwrap_or(usize::MAX),
            });
        }
        let fits = |start: usize, len: usize, total: usize| {
            start.checked_add(len).is_some_and(|end| end <= total)
        };
        if !fits(window.x, window.width, dw) || !fits(window.y, window.height, dh) {
            return Err(PreprocessError::BadWindow {
                x: window.x,
                y: window.y,
                width: window.width,
                height: window.height,
                dst_width: dw,
                dst_height: dh,
            });
        }
        let row_len = window.width * 3;
        let expected_dst = row_len * window.height;
        if dst.len() != expected_dst {
            return Err(PreprocessError::BadLength {
                what: "RGB destination buffer",
                actual: dst.len(),
                expected: expected_dst,
            });
        }

        self.horiz.compute(sw, dw, window.x, window.width);
        self.vert.compute(sh, dh, window.y, window.height);

        // Source rows touched by the window's vertical taps.
        let row_first = self.vert.bounds.iter().map(|b| b.0).min().unwrap_or(0);
        let row_end = self
            .vert
            .bounds
            .iter()
            .map(|b| b.0 + b.1)
            .max()
            .unwrap_or(0);
        let rows = row_end.saturating_sub(row_first);

        // Horizontal pass (PIL's ImagingResampleHorizontal_8bpc), window columns only.
        self.tmp.clear();
        self.tmp.resize(rows * row_len, 0);
        let kh = self.horiz.ksize;
        for (y, tmp_row) in self.tmp.chunks_exact_mut(row_len).enumerate() {
            let src_row = &src[(row_first + y) * sw * 3..(row_first + y + 1) * sw * 3];
            for ((px, &(xmin, len)), taps) in tmp_row
                .chunks_exact_mut(3)
                .zip(&self.horiz.bounds)
                .zip(self.horiz.weights.chunks_exact(kh))
            {
                let half = 1i32 << (PRECISION_BITS - 1);
                let (mut s0, mut s1, mut s2) = (half, half, half);
                // Bilinear taps are <= 2^22 and sum to ~2^22, so 255 * sum fits in i32.
                for (p, &k) in src_row[xmin * 3..(xmin + len) * 3]
                    .chunks_exact(3)
                    .zip(&taps[..len])
                {
                    s0 += i32::from(p[0]) * k;
                    s1 += i32::from(p[1]) * k;
                    s2 += i32::from(p[2]) * k;
                }
                px[0] = clip8(s0);
                px[1] = clip8(s1);
                px[2] = clip8(s2);
            }
        }

        // Vertical pass (ImagingResampleVertical_8bpc), accumulated row by row so the
        // inner loop runs over contiguous bytes; integer sums are order-independent.
        self.acc.clear();
        self.acc.resize(row_len, 0);
        let kv = self.vert.ksize;
        for ((out_row, &(ymin, len)), taps) in dst
            .chunks_exact_mut(row_len)
            .zip(&self.vert.bounds)
            .zip(self.vert.weights.chunks_exact(kv))
        {
            self.acc.fill(1i32 << (PRECISION_BITS - 1));
            let start = ymin - row_first;
            for (tmp_row, &k) in self.tmp[start * row_len..(start + len) * row_len]
                .chunks_exact(row_len)
                .zip(&taps[..len])
            {
                for (a, &p) in self.acc.iter_mut().zip(tmp_row) {
                    *a += i32::from(p) * k;
                }
            }
            for (o, &a) in out_row.iter_mut().zip(&self.acc) {
                *o = clip8(a);
            }
        }
        Ok(())
    }
}

/// Decodes, resizes, crops and normalises images into model input tensors, reusing
/// its buffers across requests. Not shared between threads: one per worker.
#[derive(Debug)]
pub struct Preprocessor {
    max_pixels: usize,
    /// Last decoded image, RGB8 HWC; may be longer than the image (kept from a larger one).
    rgb: Vec<u8>,
    /// The longest `rgb` an image of at most [`STEADY_IMAGE_PIXELS`] needed: what
    /// [`Self::release_growth`] shrinks `rgb` back to after an outsized image.
    steady_rgb: usize,
    decoded: Option<(usize, usize)>,
    resampler: Resampler,
    /// The 224x224 RGB8 crop before normalisation.
    crop: Vec<u8>,
    /// Normalised value of every byte level per channel: exactly torchvision's f32
    /// `(v / 255 - mean) / std`, looked up instead of recomputed per pixel.
    lut: [[f32; 256]; 3],
}

impl Preprocessor {
    /// Images with more than `max_pixels` (width * height) pixels are rejected.
    pub fn new(max_pixels: usize) -> Self {
        let mut lut = [[0.0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, slot) in table.iter_mut().enumerate() {
                *slot = (f32::from(v as u8) / 255.0 - MEAN[c]) / STD[c];
            }
        }
        Self {
            max_pixels,
            rgb: Vec::new(),
            steady_rgb: 0,
            decoded: None,
            resampler: Resampler::new(),
            crop: vec![0; TENSOR_LEN],
            lut,
        }
    }

    pub fn max_pixels(&self) -> usize {
        self.max_pixels
    }

    /// Decodes JPEG bytes into the internal RGB buffer; returns (width, height).
    /// Grayscale JPEGs are expanded to RGB (as PIL's `convert("RGB")` does), CMYK/YCCK
    /// are converted by zune-jpeg. Truncated or corrupt data gives [`PreprocessError::Decode`].
    pub fn decode(&mut self, jpeg: &[u8]) -> Result<(usize, usize), PreprocessError> {
        self.decoded = None;
        // The pixel limit first, from the frame header, whatever the decoder's own side
        // limit (JPEG_MAX_SIDE) would say about a huge one.
        if let Some((width, height)) = jpeg_dimensions(jpeg) {
            self.check_size(width, height)?;
        }
        let options = DecoderOptions::default()
            .jpeg_set_out_colorspace(ColorSpace::RGB)
            // Strict: a truncated stream is an error rather than a half-grey image.
            .set_strict_mode(true)
            .set_max_width(JPEG_MAX_SIDE)
            .set_max_height(JPEG_MAX_SIDE);
        let mut decoder = JpegDecoder::new_with_options(jpeg, options);
        // zune-jpeg is fuzzed, but a decoder bug on hostile input must cost one request,
        // not the worker thread.
        let headers = catch_unwind(AssertUnwindSafe(|| decoder.decode_headers()))
            .map_err(|_| PreprocessError::Decode("decoder panicked on headers".into()))?;
        headers.map_err(|e| PreprocessError::Decode(e.to_string()))?;
        let (width, height) = decoder
            .dimensions()
            .ok_or_else(|| PreprocessError::Decode("no image dimensions".into()))?;
        let pixels = self.check_size(width, height)?;
        if !reaches_eoi(jpeg) {
            return Err(PreprocessError::Decode(
                "truncated JPEG: data ends before the end-of-image marker".into(),
            ));
        }
        let channels = match decoder.get_output_colorspace() {
            Some(ColorSpace::RGB) => 3,
            // zune forces single-component JPEGs to Luma output; expanded below.
            Some(ColorSpace::Luma) => 1,
            other => {
                return Err(PreprocessError::Decode(format!(
                    "unsupported output colour space {other:?}"
                )))
            }
        };
        let needed = pixels * 3;
        if self.rgb.len() < needed {
            // Exactly what this image needs: growth is given back after it (release_growth),
            // and an amortised doubling would only make that happen more often.
            self.rgb.reserve_exact(needed - self.rgb.len());
            self.rgb.resize(needed, 0);
        }
        if pixels <= STEADY_IMAGE_PIXELS {
            self.steady_rgb = self.steady_rgb.max(needed);
        }
        let buf = &mut self.rgb[..needed];
        let raw = &mut buf[..pixels * channels];
        catch_unwind(AssertUnwindSafe(|| decoder.decode_into(raw)))
            .map_err(|_| PreprocessError::Decode("decoder panicked".into()))?
            .map_err(|e| PreprocessError::Decode(e.to_string()))?;
        if channels == 1 {
            // Back to front so no grey byte is overwritten before it is read.
            for i in (0..pixels).rev() {
                let v = buf[i];
                buf[3 * i..3 * i + 3].fill(v);
            }
        }
        self.decoded = Some((width, height));
        Ok((width, height))
    }

    /// Gives back what an image above [`STEADY_IMAGE_PIXELS`] made the buffers grow by: the
    /// RGB buffer returns to the largest steady-state image's size, the resampler's to its
    /// own steady size. Nothing happens (no allocation, no syscall) when nothing grew, so the
    /// worker calls it after every request. The decoded image is forgotten when its buffer
    /// goes.
    pub fn release_growth(&mut self) {
        if self.rgb.capacity() > self.steady_rgb {
            self.decoded = None;
            self.rgb.truncate(self.steady_rgb);
            self.rgb.shrink_to_fit();
            // What zune-jpeg freed (a progressive image's coefficients) below glibc's 32 MiB
            // mmap cut-off may otherwise stay resident in this thread's arena.
            hacserve_ffi::heap::release_free_memory();
        }
        self.resampler.release_growth();
    }

    /// Bytes the buffers hold now (RGB image and resampler scratch): what one large image
    /// costs until [`Self::release_growth`].
    pub fn buffer_bytes(&self) -> usize {
        self.rgb.capacity() + self.resampler.buffer_bytes()
    }

    /// The last successfully decoded image as (RGB8 HWC bytes, width, height).
    pub fn decoded_rgb(&self) -> Option<(&[u8], usize, usize)> {
        self.decoded.map(|(w, h)| (&self.rgb[..w * h * 3], w, h))
    }

    /// Resize/crop/normalise the last decoded image into `out` (len TENSOR_LEN, NCHW f32).
    pub fn preprocess(&mut self, out: &mut [f32]) -> Result<(), PreprocessError> {
        let (w, h) = self.decoded.ok_or(PreprocessError::NotDecoded)?;
        check_out_len(out)?;
        resize_crop(
            &mut self.resampler,
            &self.rgb[..w * h * 3],
            (w, h),
            &mut self.crop,
        )?;
        normalize_into(&self.lut, &self.crop, out);
        Ok(())
    }

    /// Same as [`Self::preprocess`] for an RGB8 HWC image given directly (no decoder).
    pub fn preprocess_rgb(
        &mut self,
        rgb: &[u8],
        width: usize,
        height: usize,
        out: &mut [f32],
    ) -> Result<(), PreprocessError> {
        check_out_len(out)?;
        self.resize_crop_rgb(rgb, width, height)?;
        normalize_into(&self.lut, &self.crop, out);
        Ok(())
    }

    /// Same as [`Self::preprocess_rgb`] for BGR8 HWC pixels (the raw task's, as OpenCV
    /// decodes): the resampling treats each channel alike, so only the normalisation swaps
    /// them, and the tensor equals the RGB path's for the same pixels bit for bit.
    pub fn preprocess_bgr(
        &mut self,
        bgr: &[u8],
        width: usize,
        height: usize,
        out: &mut [f32],
    ) -> Result<(), PreprocessError> {
        check_out_len(out)?;
        self.resize_crop_rgb(bgr, width, height)?;
        normalize_swapped_into(&self.lut, &self.crop, out);
        Ok(())
    }

    /// `Resize(256)` + `CenterCrop(224)` of an RGB8 HWC image; returns the 224x224 RGB8
    /// HWC crop (before `ToTensor`/`Normalize`), valid until the next call.
    pub fn resize_crop_rgb(
        &mut self,
        rgb: &[u8],
        width: usize,
        height: usize,
    ) -> Result<&[u8], PreprocessError> {
        self.check_size(width, height)?;
        resize_crop(&mut self.resampler, rgb, (width, height), &mut self.crop)?;
        Ok(&self.crop)
    }

    /// `ToTensor` + `Normalize` of a 224x224 RGB8 HWC crop into `out` (NCHW f32).
    pub fn normalize(&self, crop: &[u8], out: &mut [f32]) -> Result<(), PreprocessError> {
        check_out_len(out)?;
        if crop.len() != TENSOR_LEN {
            return Err(PreprocessError::BadLength {
                what: "RGB crop",
                actual: crop.len(),
                expected: TENSOR_LEN,
            });
        }
        normalize_into(&self.lut, crop, out);
        Ok(())
    }

    /// Returns the pixel count after checking it against zero and `max_pixels`.
    fn check_size(&self, width: usize, height: usize) -> Result<usize, PreprocessError> {
        if width == 0 || height == 0 {
            return Err(PreprocessError::ZeroSize { width, height });
        }
        match width.checked_mul(height) {
            Some(p) if p <= self.max_pixels => Ok(p),
            _ => Err(PreprocessError::TooLarge {
                width,
                height,
                max_pixels: self.max_pixels,
            }),
        }
    }
}

/// (width, height) from a JPEG's frame header (SOFn), read before any pixel is decoded and
/// before any decoder is involved, so every backend applies `--max-image-pixels` to the same
/// number. Segments are skipped by their length (an EXIF thumbnail's own SOF does not count).
/// None when the bytes are not a JPEG, end before a frame header, or declare the height
/// later (a DNL marker): the decoder then gives its own verdict.
pub fn jpeg_dimensions(data: &[u8]) -> Option<(usize, usize)> {
    if data.get(..2) != Some(&[0xFF, 0xD8]) {
        return None;
    }
    let mut i = 2;
    loop {
        // Stray bytes before a marker are skipped, as decoders do; a marker may be preceded
        // by 0xFF fill bytes.
        i += data.get(i..)?.iter().position(|&b| b == 0xFF)?;
        while data.get(i) == Some(&0xFF) {
            i += 1;
        }
        let marker = *data.get(i)?;
        i += 1;
        match marker {
            // Stand-alone markers without a length.
            0x01 | 0xD0..=0xD7 => continue,
            // EOI or a scan before any frame header: no dimensions to be had here.
            0xD9 | 0xDA => return None,
            _ => {}
        }
        let len = usize::from(u16::from_be_bytes([*data.get(i)?, *data.get(i + 1)?]));
        // SOF0-3, 5-7, 9-11, 13-15 (C4 is DHT, C8 reserved, CC is DAC).
        if matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
            let frame = data.get(i + 2..i + 7)?;
            let height = usize::from(u16::from_be_bytes([frame[1], frame[2]]));
            let width = usize::from(u16::from_be_bytes([frame[3], frame[4]]));
            return (height != 0).then_some((width, height));
        }
        if len < 2 {
            return None;
        }
        i += len;
    }
}

/// Walks the JPEG marker structure and reports whether it reaches EOI. zune-jpeg 0.4
/// zero-fills a scan that runs out of bytes, even in strict mode, so without this a
/// truncated upload would be classified as a grey-bottomed picture (PIL raises "image
/// file is truncated"). Segments are skipped by their length, so an EXIF thumbnail's own
/// EOI does not count; entropy-coded data is scanned for the next real marker.
fn reaches_eoi(data: &[u8]) -> bool {
    let next_ff = |from: usize| {
        data.get(from..)
            .and_then(|rest| rest.iter().position(|&b| b == 0xFF))
            .map(|p| from + p)
    };
    let mut i = 2; // after SOI (checked by the decoder)
    loop {
        // Next marker, skipping stray bytes and 0xFF fill bytes.
        let Some(mut at) = next_ff(i) else {
            return false;
        };
        while data.get(at) == Some(&0xFF) {
            at += 1;
        }
        let Some(&marker) = data.get(at) else {
            return false;
        };
        i = at + 1;
        match marker {
            0xD9 => return true,
            // Stand-alone markers without a length (TEM, RSTn) and stuffed zeros.
            0x00 | 0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let Some(len) = data.get(i..i + 2) else {
            return false;
        };
        i += usize::from(u16::from_be_bytes([len[0], len[1]]));
        if marker == 0xDA {
            // Entropy-coded data: 0xFF is followed by a stuffed 0x00 or an RSTn marker,
            // anything else is the next segment.
            loop {
                let Some(ff) = next_ff(i) else {
                    return false;
                };
                match data.get(ff + 1) {
                    None => return false,
                    Some(0x00 | 0xD0..=0xD7) => i = ff + 2,
                    Some(_) => {
                        i = ff;
                        break;
                    }
                }
            }
        }
    }
}

fn check_out_len(out: &[f32]) -> Result<(), PreprocessError> {
    if out.len() != TENSOR_LEN {
        return Err(PreprocessError::BadLength {
            what: "output tensor",
            actual: out.len(),
            expected: TENSOR_LEN,
        });
    }
    Ok(())
}

/// Resize so the shorter side is 256, then keep the centred 224x224 window.
fn resize_crop(
    resampler: &mut Resampler,
    rgb: &[u8],
    (width, height): (usize, usize),
    crop: &mut [u8],
) -> Result<(), PreprocessError> {
    let (rw, rh) = resized_size(width, height, RESIZE_SHORTER);
    let window = Window {
        x: center_crop_offset(rw, INPUT_SIZE),
        y: center_crop_offset(rh, INPUT_SIZE),
        width: INPUT_SIZE,
        height: INPUT_SIZE,
    };
    resampler.resize_window(rgb, (width, height), (rw, rh), window, crop)
}

/// HWC u8 -> CHW normalised f32 through the per-channel lookup table.
fn normalize_into(lut: &[[f32; 256]; 3], crop: &[u8], out: &mut [f32]) {
    const PLANE: usize = INPUT_SIZE * INPUT_SIZE;
    let (r, rest) = out.split_at_mut(PLANE);
    let (g, b) = rest.split_at_mut(PLANE);
    for (i, px) in crop.chunks_exact(3).enumerate() {
        r[i] = lut[0][usize::from(px[0])];
        g[i] = lut[1][usize::from(px[1])];
        b[i] = lut[2][usize::from(px[2])];
    }
}

/// [`normalize_into`] of a BGR crop: byte 0 of each pixel is blue.
fn normalize_swapped_into(lut: &[[f32; 256]; 3], crop: &[u8], out: &mut [f32]) {
    const PLANE: usize = INPUT_SIZE * INPUT_SIZE;
    let (r, rest) = out.split_at_mut(PLANE);
    let (g, b) = rest.split_at_mut(PLANE);
    for (i, px) in crop.chunks_exact(3).enumerate() {
        r[i] = lut[0][usize::from(px[2])];
        g[i] = lut[1][usize::from(px[1])];
        b[i] = lut[2][usize::from(px[0])];
    }
}

/// RGB8 pixels as BGR8 (the raw task's channel order), or back: the same swap.
pub fn swap_red_blue(pixels: &[u8]) -> Vec<u8> {
    let mut out = pixels.to_vec();
    for px in out.chunks_exact_mut(3) {
        px.swap(0, 2);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bgr_pixels_give_the_rgb_tensor() {
        let (w, h) = (37, 29);
        let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
        let mut pre = Preprocessor::new(1 << 20);
        let mut from_rgb = vec![0f32; TENSOR_LEN];
        pre.preprocess_rgb(&rgb, w, h, &mut from_rgb).unwrap();
        let mut from_bgr = vec![f32::NAN; TENSOR_LEN];
        pre.preprocess_bgr(&swap_red_blue(&rgb), w, h, &mut from_bgr)
            .unwrap();
        assert_eq!(from_rgb, from_bgr);
    }

    #[test]
    fn resized_size_follows_torchvision() {
        assert_eq!(resized_size(512, 600, 256), (256, 300));
        assert_eq!(resized_size(640, 427, 256), (383, 256));
        assert_eq!(resized_size(256, 256, 256), (256, 256));
        assert_eq!(resized_size(1, 300, 256), (256, 76800));
    }

    #[test]
    fn crop_offset_rounds_half_to_even() {
        assert_eq!(center_crop_offset(256, 224), 16);
        assert_eq!(center_crop_offset(341, 224), 58); // 58.5 -> 58
        assert_eq!(center_crop_offset(343, 224), 60); // 59.5 -> 60
        assert_eq!(center_crop_offset(224, 224), 0);
    }

    #[test]
    fn same_size_resize_is_identity() {
        let src: Vec<u8> = (0..7 * 5 * 3).map(|i| (i * 37 % 256) as u8).collect();
        let mut dst = vec![0; src.len()];
        let window = Window {
            x: 0,
            y: 0,
            width: 7,
            height: 5,
        };
        Resampler::new()
            .resize_window(&src, (7, 5), (7, 5), window, &mut dst)
            .unwrap();
        assert_eq!(src, dst);
    }

    #[test]
    fn errors_are_typed() {
        let mut p = Preprocessor::new(1000);
        let mut out = vec![0.0; TENSOR_LEN];
        assert!(matches!(
            p.preprocess(&mut out),
            Err(PreprocessError::NotDecoded)
        ));
        assert!(matches!(
            p.preprocess_rgb(&[0; 3 * 40 * 30], 40, 30, &mut out),
            Err(PreprocessError::TooLarge { .. })
        ));
        assert!(matches!(
            p.preprocess_rgb(&[], 0, 30, &mut out),
            Err(PreprocessError::ZeroSize { .. })
        ));
        assert!(matches!(
            p.preprocess_rgb(&[0; 5], 10, 10, &mut out),
            Err(PreprocessError::BadLength { .. })
        ));
        assert!(matches!(
            p.preprocess_rgb(&[0; 300], 10, 10, &mut out[1..]),
            Err(PreprocessError::BadLength { .. })
        ));
        assert!(matches!(
            p.decode(b"not a jpeg"),
            Err(PreprocessError::Decode(_))
        ));
    }

    /// A JPEG (odd sampling factors) on which zune-jpeg 0.4.21 fails an assertion in its
    /// upsampler, found by the jpeg fuzz target: the request gets a decode error and the
    /// same preprocessor goes on decoding the next image.
    #[test]
    fn decoder_panic_costs_one_image() {
        let hostile = include_bytes!("../../fuzz/regressions/jpeg/zune_upsample_assert.jpg");
        let good = include_bytes!("../../fuzz/corpus/jpeg/baseline_420.jpg");
        let mut p = Preprocessor::new(MAX_IMAGE_PIXELS);
        let mut out = vec![0.0; TENSOR_LEN];
        match p.decode(hostile) {
            Err(PreprocessError::Decode(why)) => assert_eq!(why, "decoder panicked"),
            other => panic!("want the decoder's panic as a decode error, got {other:?}"),
        }
        assert!(matches!(
            p.preprocess(&mut out),
            Err(PreprocessError::NotDecoded)
        ));
        assert_eq!(p.decode(good).unwrap(), (64, 75));
        p.preprocess(&mut out).unwrap();
    }

    /// A 65535x128 JPEG (fuzz/regressions/jpeg/): zune-jpeg's block count overflows at
    /// that width; it is refused by the side limit before the decoder computes it.
    #[test]
    fn side_beyond_the_decoders_arithmetic_is_refused() {
        let wide = include_bytes!("../../fuzz/regressions/jpeg/zune_width_overflow.jpg");
        match Preprocessor::new(MAX_IMAGE_PIXELS).decode(wide) {
            Err(PreprocessError::Decode(why)) => {
                assert!(why.contains("width 65535 greater than"), "{why}")
            }
            other => panic!("want the decoder's size error, got {other:?}"),
        }
    }

    #[test]
    fn jpeg_dimensions_come_from_the_frame_header() {
        let jpeg = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/grace_hopper.jpg"
        ))
        .unwrap();
        let mut p = Preprocessor::new(1 << 26);
        let decoded = p.decode(&jpeg).unwrap();
        assert_eq!(jpeg_dimensions(&jpeg), Some(decoded));
        // A segment that holds a fake frame header (as an EXIF thumbnail would) is skipped.
        let mut fake = vec![0xFF, 0xD8, 0xFF, 0xE1, 0x00, 0x0B];
        fake.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x11, 0x08, 0x7F, 0xFF, 0x7F, 0xFF]);
        fake.extend_from_slice(&jpeg[2..]);
        assert_eq!(jpeg_dimensions(&fake), Some(decoded));
        // Everything cut short or not a JPEG: no answer rather than a wrong one.
        for cut in [0, 1, 2, 3, 10, 20] {
            assert_eq!(jpeg_dimensions(&jpeg[..cut]), None, "cut at {cut}");
        }
        assert_eq!(jpeg_dimensions(b"not a jpeg"), None);
        // Stray bytes between segments are skipped, as the decoders do.
        let mut stray = jpeg[..2].to_vec();
        stray.extend_from_slice(&[0x00, 0x12]);
        stray.extend_from_slice(&jpeg[2..]);
        assert_eq!(jpeg_dimensions(&stray), Some(decoded));
    }

    #[test]
    fn growth_beyond_the_steady_size_is_released() {
        let jpeg = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/grace_hopper.jpg"
        ))
        .unwrap();
        let mut p = Preprocessor::new(1 << 26);
        let mut out = vec![0.0; TENSOR_LEN];
        let (sw, sh) = p.decode(&jpeg).unwrap();
        p.preprocess(&mut out).unwrap();
        p.release_growth();
        assert_eq!(p.rgb.capacity(), sw * sh * 3);
        let steady = p.buffer_bytes();
        // An image above the steady size through the same buffers (as a decode leaves them).
        let (w, h) = (4800, 3000);
        p.rgb.resize(w * h * 3, 0);
        p.decoded = Some((w, h));
        p.preprocess(&mut out).unwrap();
        assert!(
            p.buffer_bytes() > steady + w * h * 2,
            "{}",
            p.buffer_bytes()
        );
        p.release_growth();
        assert_eq!(p.rgb.capacity(), sw * sh * 3);
        assert!(p.buffer_bytes() <= steady + STEADY_TMP_BYTES);
        assert!(p.decoded_rgb().is_none());
        // The small image still works from the released buffers, and costs nothing more.
        p.decode(&jpeg).unwrap();
        p.preprocess(&mut out).unwrap();
        p.release_growth();
        assert_eq!(p.rgb.capacity(), sw * sh * 3);
    }

    #[test]
    fn constant_image_normalises_to_constant() {
        let mut p = Preprocessor::new(1 << 20);
        let rgb: Vec<u8> = [10u8, 128, 250].repeat(300 * 200);
        let mut out = vec![0.0; TENSOR_LEN];
        p.preprocess_rgb(&rgb, 300, 200, &mut out).unwrap();
        for (c, v) in [10u8, 128, 250].into_iter().enumerate() {
            let want = (f32::from(v) / 255.0 - MEAN[c]) / STD[c];
            let plane = &out[c * INPUT_SIZE * INPUT_SIZE..(c + 1) * INPUT_SIZE * INPUT_SIZE];
            assert!(plane.iter().all(|&x| x == want), "channel {c}");
        }
    }
}
