//! Checks `hacserve_runtime::preprocess` against the Pillow/numpy reference written by
//! scripts/make_preprocess_fixture.py (torchvision's ImageNet eval transform on PIL images).
//!
//! - Resizer only: on identical RGB input our resize must match PIL's `Image.resize(...,
//!   BILINEAR)` to within 1 level (it is a port of Pillow's fixed-point algorithm, so in
//!   practice it is exact).
//! - Full path on models/grace_hopper.jpg: zune-jpeg and libjpeg-turbo differ slightly in
//!   IDCT and chroma upsampling, so the normalised tensor is compared with tolerances that
//!   such decoder noise meets with margin but that a wrong resize filter, crop offset,
//!   layout or normalisation exceeds by far.
//! - Robustness: truncated, corrupted and random inputs give errors, never panics.

use std::path::{Path, PathBuf};

use hacserve_runtime::preprocess::{
    center_crop_offset, resized_size, PreprocessError, Preprocessor, Resampler, Window, INPUT_SIZE,
    RESIZE_SHORTER, TENSOR_LEN,
};

const PLANE: usize = INPUT_SIZE * INPUT_SIZE;

// Full-path tolerances (normalised units; one 8-bit level is 1/(255*std) ~ 0.0174).
// zune-jpeg 0.4.21 vs Pillow 13.0 / libjpeg-turbo 3.2 measured max 0.035 (2 levels), mean
// 0.0029, channel means within 0.0035; crop max 2 levels, mean 0.17. The bounds leave ~2x
// for decoder updates; a nearest or non-antialiased resize, a 1-px crop shift, HWC or BGR
// layout, wrong mean/std, or truncating instead of rounding in the resampler all fail.
const FULL_MAX_ABS: f32 = 0.09;
const FULL_MEAN_ABS: f64 = 0.006;
const FULL_CHANNEL_MEAN: f64 = 0.008;
// The same in 8-bit levels for the RGB crop before normalisation.
const CROP_MAX_LEVELS: i32 = 5;
const CROP_MEAN_LEVELS: f64 = 0.35;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn reference() -> Json {
    let text = String::from_utf8(read(&fixture("preprocess_reference.json"))).unwrap();
    Json::parse(&text)
}

/// Bit-identical mirror of `synth` in scripts/make_preprocess_fixture.py.
fn synth(w: usize, h: usize, seed: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let mut v = (x as u32)
                    .wrapping_mul(0x9E37_79B1)
                    .wrapping_add((y as u32).wrapping_mul(0x85EB_CA77))
                    .wrapping_add((c as u32).wrapping_mul(0xC2B2_AE3D))
                    .wrapping_add(seed.wrapping_mul(0x27D4_EB2F));
                v ^= v >> 15;
                v = v.wrapping_mul(0x2C1B_3C6D);
                v ^= v >> 12;
                v = v.wrapping_mul(0x297A_2D39);
                v ^= v >> 15;
                let noise = v % 49;
                let grad = (x * (97 + 40 * c)) / w + (y * (131 - 30 * c)) / h;
                let cell = x / (5 + 2 * c) + y / (7 - c);
                let edge = if cell % 2 == 0 { 64 } else { 0 };
                out.push((grad + edge + noise as usize).min(255) as u8);
            }
        }
    }
    out
}

fn fnv1a64(data: &[u8]) -> String {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01B3);
    }
    format!("{h:016x}")
}

/// (max, mean) absolute difference in 8-bit levels.
fn level_diff(a: &[u8], b: &[u8]) -> (i32, f64) {
    assert_eq!(a.len(), b.len());
    let mut max = 0;
    let mut sum = 0u64;
    for (&x, &y) in a.iter().zip(b) {
        let d = (i32::from(x) - i32::from(y)).abs();
        max = max.max(d);
        sum += d as u64;
    }
    (max, sum as f64 / a.len() as f64)
}

#[test]
fn resizer_matches_pillow() {
    let reference = reference();
    let mut resampler = Resampler::new();
    for case in reference.get("resize_cases").arr() {
        let name = case.get("name").str();
        let (sw, sh) = case.get("src_size").pair();
        let (dw, dh) = case.get("dst_size").pair();
        let src = synth(sw, sh, case.get("seed").num() as u32);
        assert_eq!(
            fnv1a64(&src),
            case.get("src_fnv1a64").str(),
            "{name}: Rust synth() no longer mirrors the Python generator"
        );
        let expected = read(&fixture(case.get("file").str()));

        let mut ours = vec![0u8; dw * dh * 3];
        let full = Window {
            x: 0,
            y: 0,
            width: dw,
            height: dh,
        };
        resampler
            .resize_window(&src, (sw, sh), (dw, dh), full, &mut ours)
            .unwrap();
        let (max, mean) = level_diff(&ours, &expected);
        println!("resize {name} {sw}x{sh} -> {dw}x{dh}: max {max} mean {mean:.5} levels");
        assert!(max <= 1, "{name}: max abs diff {max} levels");
        assert!(mean < 0.05, "{name}: mean abs diff {mean}");

        // A window must equal the same pixels of the full resize (the crop path relies on it).
        let windows = [
            (0, 0, 1, 1),
            (dw / 3, dh / 4, dw / 2, dh / 2),
            (dw - 7, dh - 5, 7, 5),
            (1, 0, dw - 1, 3),
        ];
        for (x, y, w, h) in windows {
            let mut part = vec![0u8; w * h * 3];
            let window = Window {
                x,
                y,
                width: w,
                height: h,
            };
            resampler
                .resize_window(&src, (sw, sh), (dw, dh), window, &mut part)
                .unwrap();
            for row in 0..h {
                let off = ((y + row) * dw + x) * 3;
                assert_eq!(
                    &part[row * w * 3..(row + 1) * w * 3],
                    &ours[off..off + w * 3],
                    "{name}: window {window:?} row {row}"
                );
            }
        }
    }
}

#[test]
fn geometry_matches_torchvision() {
    for g in reference().get("geometry").arr() {
        let (w, h) = g.get("src_size").pair();
        let (rw, rh) = resized_size(w, h, RESIZE_SHORTER);
        assert_eq!((rw, rh), g.get("resized_size").pair(), "resize of {w}x{h}");
        let offset = (
            center_crop_offset(rw, INPUT_SIZE),
            center_crop_offset(rh, INPUT_SIZE),
        );
        assert_eq!(offset, g.get("crop_offset").pair(), "crop of {rw}x{rh}");
    }
}

/// PIL's crop of the test photo, normalised here the way torchvision does it in f32
/// (`ToTensor` = v / 255, `Normalize` = (x - mean) / std, CHW) with the fixture's mean/std,
/// independently of the code under test; checked against numpy's exact values.
fn reference_tensor(reference: &Json) -> (Vec<u8>, Vec<f32>) {
    let grace = reference.get("grace_hopper");
    let crop = read(&fixture(grace.get("crop_file").str()));
    assert_eq!(fnv1a64(&crop), grace.get("crop_fnv1a64").str());
    let mean: Vec<f32> = reference
        .get("mean")
        .arr()
        .iter()
        .map(|v| v.num() as f32)
        .collect();
    let std: Vec<f32> = reference
        .get("std")
        .arr()
        .iter()
        .map(|v| v.num() as f32)
        .collect();
    let mut tensor = vec![0f32; TENSOR_LEN];
    for (i, px) in crop.chunks_exact(3).enumerate() {
        for c in 0..3 {
            tensor[c * PLANE + i] = (f32::from(px[c]) / 255.0 - mean[c]) / std[c];
        }
    }
    for s in grace.get("samples").arr() {
        let s = s.arr();
        let (c, y, x) = (s[0].usize(), s[1].usize(), s[2].usize());
        let want = s[3].num() as f32;
        let got = tensor[c * PLANE + y * INPUT_SIZE + x];
        assert_eq!(got, want, "reference [{c},{y},{x}] vs numpy");
    }
    for c in 0..3 {
        let (m, sd) = mean_std(&tensor[c * PLANE..(c + 1) * PLANE]);
        let want_mean = grace.get("channel_mean").arr()[c].num();
        let want_std = grace.get("channel_std").arr()[c].num();
        assert!((m - want_mean).abs() < 1e-6, "channel {c} mean {m}");
        assert!((sd - want_std).abs() < 1e-6, "channel {c} std {sd}");
    }
    (crop, tensor)
}

#[test]
fn normalisation_matches_numpy_exactly() {
    let reference = reference();
    let (crop, want) = reference_tensor(&reference);
    let mut ours = vec![0f32; TENSOR_LEN];
    Preprocessor::new(1).normalize(&crop, &mut ours).unwrap();
    let bad = ours.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(bad, None, "first mismatch (CHW index)");
}

fn mean_std(v: &[f32]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let var = v
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean, var.sqrt())
}

#[test]
fn full_path_matches_torchvision_on_photo() {
    let reference = reference();
    let grace = reference.get("grace_hopper");
    let mut pre = Preprocessor::new(4096 * 4096);
    let (ref_crop, ref_tensor) = reference_tensor(&reference);

    let jpeg = read(&repo_root().join(grace.get("image").str()));
    let (w, h) = pre.decode(&jpeg).unwrap();
    assert_eq!((w, h), grace.get("decoded_size").pair());
    assert_eq!(
        resized_size(w, h, RESIZE_SHORTER),
        grace.get("resized_size").pair()
    );

    // Decoder alone: whole-image channel means vs libjpeg-turbo.
    let (rgb, _, _) = pre.decoded_rgb().unwrap();
    let rgb = rgb.to_vec();
    for c in 0..3 {
        let mean = rgb[c..]
            .iter()
            .step_by(3)
            .map(|&v| f64::from(v))
            .sum::<f64>()
            / (w * h) as f64;
        let want = grace.get("decoded_channel_mean").arr()[c].num();
        println!("decoded channel {c} mean: zune {mean:.4} PIL {want:.4}");
        assert!(
            (mean - want).abs() < 0.5,
            "decoded channel {c} mean {mean} vs {want}"
        );
    }

    // Crop in 8-bit levels (decode + resize + crop).
    let crop = pre.resize_crop_rgb(&rgb, w, h).unwrap().to_vec();
    let (max_l, mean_l) = level_diff(&crop, &ref_crop);
    println!("crop vs PIL: max {max_l} mean {mean_l:.4} levels");

    // The served path: decode() + preprocess() into a tensor.
    let mut ours = vec![f32::NAN; TENSOR_LEN];
    pre.decode(&jpeg).unwrap();
    pre.preprocess(&mut ours).unwrap();
    let mut max = 0f32;
    let mut sum = 0f64;
    for (&a, &b) in ours.iter().zip(&ref_tensor) {
        let d = (a - b).abs();
        max = max.max(d);
        sum += f64::from(d);
    }
    let mean_abs = sum / TENSOR_LEN as f64;
    println!("tensor vs torchvision reference: max abs {max:.5} mean abs {mean_abs:.6}");
    let mut worst_channel = 0f64;
    for c in 0..3 {
        let (m, _) = mean_std(&ours[c * PLANE..(c + 1) * PLANE]);
        let want = grace.get("channel_mean").arr()[c].num();
        println!("channel {c} mean: ours {m:.6} reference {want:.6}");
        worst_channel = worst_channel.max((m - want).abs());
    }

    assert!(max_l <= CROP_MAX_LEVELS, "crop max diff {max_l} levels");
    assert!(mean_l <= CROP_MEAN_LEVELS, "crop mean diff {mean_l} levels");
    assert!(max <= FULL_MAX_ABS, "tensor max abs diff {max}");
    assert!(mean_abs <= FULL_MEAN_ABS, "tensor mean abs diff {mean_abs}");
    assert!(
        worst_channel <= FULL_CHANNEL_MEAN,
        "channel mean off by {worst_channel}"
    );

    // preprocess_rgb on the decoded pixels is the same computation.
    let mut via_rgb = vec![0f32; TENSOR_LEN];
    pre.preprocess_rgb(&rgb, w, h, &mut via_rgb).unwrap();
    assert_eq!(via_rgb, ours);
}

#[test]
fn decoder_variants_match_pillow() {
    let mut pre = Preprocessor::new(1 << 20);
    for case in reference().get("decoder_cases").arr() {
        let name = case.get("name").str();
        let jpeg = read(&fixture(case.get("file").str()));
        let dims = pre.decode(&jpeg).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(dims, case.get("size").pair(), "{name}");
        let (rgb, w, h) = pre.decoded_rgb().unwrap();
        if case.get("mode").str() == "L" {
            assert!(
                rgb.chunks_exact(3).all(|p| p[0] == p[1] && p[1] == p[2]),
                "{name}: grey must expand to R=G=B"
            );
        }
        let grid = case.get("grid").usize();
        let mut worst = 0f64;
        for (i, want) in case.get("block_means").arr().iter().enumerate() {
            let (gy, gx) = (i / grid, i % grid);
            let (y0, y1) = (gy * h / grid, (gy + 1) * h / grid);
            let (x0, x1) = (gx * w / grid, (gx + 1) * w / grid);
            for c in 0..3 {
                let mut sum = 0f64;
                for y in y0..y1 {
                    for x in x0..x1 {
                        sum += f64::from(rgb[(y * w + x) * 3 + c]);
                    }
                }
                let mean = sum / ((y1 - y0) * (x1 - x0)) as f64;
                worst = worst.max((mean - want.arr()[c].num()).abs());
            }
        }
        println!("decoder {name}: worst block-mean diff {worst:.3} levels");
        assert!(
            worst < 2.0,
            "{name}: block means differ from PIL by {worst} levels"
        );
        let mut out = vec![0f32; TENSOR_LEN];
        pre.preprocess(&mut out).unwrap();
        assert!(out.iter().all(|v| v.is_finite()));
    }
}

/// xorshift64*: deterministic noise for the robustness tests.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Decodes `data`; any error must be typed and leave no decoded image behind.
fn decode_must_not_panic(pre: &mut Preprocessor, data: &[u8], out: &mut [f32]) -> bool {
    match pre.decode(data) {
        Ok(_) => {
            pre.preprocess(out).unwrap();
            true
        }
        Err(e) => {
            assert!(
                matches!(
                    e,
                    PreprocessError::Decode(_)
                        | PreprocessError::TooLarge { .. }
                        | PreprocessError::ZeroSize { .. }
                ),
                "unexpected error {e:?}"
            );
            if let PreprocessError::Decode(msg) = &e {
                assert!(!msg.contains("panicked"), "zune-jpeg panicked: {msg}");
            }
            assert!(matches!(
                pre.preprocess(out),
                Err(PreprocessError::NotDecoded)
            ));
            false
        }
    }
}

#[test]
fn truncated_and_garbage_input_never_panics() {
    let jpeg = read(&repo_root().join("models/grace_hopper.jpg"));
    let mut pre = Preprocessor::new(4096 * 4096);
    let mut out = vec![0f32; TENSOR_LEN];

    // Every prefix through the headers, then a stride through the entropy-coded data,
    // then the last bytes one by one.
    let n = jpeg.len();
    let lens = (0..1024)
        .chain((1024..n - 64).step_by(211))
        .chain(n - 64..n);
    for len in lens {
        if decode_must_not_panic(&mut pre, &jpeg[..len], &mut out) {
            panic!("prefix of {len}/{n} bytes decoded");
        }
    }
    assert!(matches!(
        pre.decode(&jpeg[..n / 2]),
        Err(PreprocessError::Decode(_))
    ));

    // Bytes after EOI (camera trailers, padding) are fine.
    let mut trailer = jpeg.clone();
    trailer.extend_from_slice(b"\0\0trailer\xFF\xD8");
    assert!(pre.decode(&trailer).is_ok());
    // An embedded thumbnail's EOI (inside an APP1 segment) must not hide a truncated scan.
    let thumb: &[u8] = &[0xFF, 0xD8, 0xFF, 0xDA, 0x00, 0x02, 0x12, 0x34, 0xFF, 0xD9];
    let mut with_thumb = vec![0xFF, 0xD8, 0xFF, 0xE1, 0x00, 2 + thumb.len() as u8];
    with_thumb.extend_from_slice(thumb);
    with_thumb.extend_from_slice(&jpeg[2..]);
    assert!(pre.decode(&with_thumb).is_ok());
    let cut = with_thumb.len() - 100;
    assert!(matches!(
        pre.decode(&with_thumb[..cut]),
        Err(PreprocessError::Decode(_))
    ));
    let progressive = read(&fixture("decoder_progressive.jpg"));
    for len in (0..progressive.len()).step_by(37) {
        assert!(!decode_must_not_panic(
            &mut pre,
            &progressive[..len],
            &mut out
        ));
    }

    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    // Random bytes, bare and behind a JPEG start-of-image marker.
    for i in 0..3000 {
        let len = rng.below(2048);
        let mut data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if i % 2 == 0 && len >= 2 {
            data[0] = 0xFF;
            data[1] = 0xD8;
        }
        decode_must_not_panic(&mut pre, &data, &mut out);
    }
    // The real headers followed by garbage, and the real file with a few bytes changed.
    for i in 0..300 {
        let mut data = jpeg.clone();
        if i % 3 == 0 {
            let cut = 600 + rng.below(n - 600);
            for b in &mut data[cut..] {
                *b = rng.next() as u8;
            }
        } else {
            for _ in 0..1 + rng.below(8) {
                let at = rng.below(n);
                data[at] = rng.next() as u8;
            }
        }
        decode_must_not_panic(&mut pre, &data, &mut out);
    }

    // Buffers survive all of that: the real image still decodes identically.
    let mut a = vec![0f32; TENSOR_LEN];
    let mut fresh = Preprocessor::new(4096 * 4096);
    fresh.decode(&jpeg).unwrap();
    fresh.preprocess(&mut a).unwrap();
    pre.decode(&jpeg).unwrap();
    pre.preprocess(&mut out).unwrap();
    assert_eq!(a, out);
}

#[test]
fn size_limits_are_enforced() {
    let jpeg = read(&repo_root().join("models/grace_hopper.jpg"));
    let mut small = Preprocessor::new(512 * 600 - 1);
    assert!(matches!(
        small.decode(&jpeg),
        Err(PreprocessError::TooLarge {
            width: 512,
            height: 600,
            ..
        })
    ));
    let mut exact = Preprocessor::new(512 * 600);
    assert_eq!(exact.decode(&jpeg).unwrap(), (512, 600));

    // A header declaring 65535x65535 is refused before any pixel buffer is allocated.
    let mut huge = jpeg.clone();
    let sof = huge
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("baseline SOF0 marker");
    huge[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
    assert!(matches!(
        exact.decode(&huge),
        Err(PreprocessError::TooLarge { .. })
    ));
}

/// Minimal JSON reader for the fixture (the crate has no serde); panics on bad input,
/// which is fine for a test.
#[derive(Debug, Clone)]
enum Json {
    Null,
    Bool,
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn parse(text: &str) -> Json {
        let mut p = JsonParser {
            s: text.as_bytes(),
            i: 0,
        };
        let v = p.value();
        p.ws();
        assert_eq!(p.i, p.s.len(), "trailing data in JSON");
        v
    }
    fn get(&self, key: &str) -> &Json {
        match self {
            Json::Obj(fields) => fields
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v)
                .unwrap_or_else(|| panic!("missing key {key}")),
            other => panic!("{other:?} is not an object"),
        }
    }
    fn arr(&self) -> &[Json] {
        match self {
            Json::Arr(v) => v,
            other => panic!("{other:?} is not an array"),
        }
    }
    fn num(&self) -> f64 {
        match self {
            Json::Num(n) => *n,
            other => panic!("{other:?} is not a number"),
        }
    }
    fn usize(&self) -> usize {
        let n = self.num();
        assert!(n >= 0.0 && n.fract() == 0.0, "{n} is not an index");
        n as usize
    }
    fn str(&self) -> &str {
        match self {
            Json::Str(s) => s,
            other => panic!("{other:?} is not a string"),
        }
    }
    fn pair(&self) -> (usize, usize) {
        let a = self.arr();
        assert_eq!(a.len(), 2);
        (a[0].usize(), a[1].usize())
    }
}

struct JsonParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn eat(&mut self, b: u8) {
        self.ws();
        assert_eq!(
            self.s[self.i], b,
            "expected '{}' at byte {}",
            b as char, self.i
        );
        self.i += 1;
    }
    fn peek(&mut self) -> u8 {
        self.ws();
        self.s[self.i]
    }
    fn literal(&mut self, word: &str, v: Json) -> Json {
        assert!(self.s[self.i..].starts_with(word.as_bytes()));
        self.i += word.len();
        v
    }
    fn value(&mut self) -> Json {
        match self.peek() {
            b'{' => {
                self.i += 1;
                let mut fields = Vec::new();
                if self.peek() == b'}' {
                    self.i += 1;
                    return Json::Obj(fields);
                }
                loop {
                    let key = self.string();
                    self.eat(b':');
                    fields.push((key, self.value()));
                    if self.peek() == b',' {
                        self.i += 1;
                    } else {
                        self.eat(b'}');
                        return Json::Obj(fields);
                    }
                }
            }
            b'[' => {
                self.i += 1;
                let mut items = Vec::new();
                if self.peek() == b']' {
                    self.i += 1;
                    return Json::Arr(items);
                }
                loop {
                    items.push(self.value());
                    if self.peek() == b',' {
                        self.i += 1;
                    } else {
                        self.eat(b']');
                        return Json::Arr(items);
                    }
                }
            }
            b'"' => Json::Str(self.string()),
            b't' => self.literal("true", Json::Bool),
            b'f' => self.literal("false", Json::Bool),
            b'n' => self.literal("null", Json::Null),
            _ => {
                let start = self.i;
                while self.i < self.s.len() && b"+-0123456789.eE".contains(&self.s[self.i]) {
                    self.i += 1;
                }
                let text = std::str::from_utf8(&self.s[start..self.i]).unwrap();
                // Rust's parse rounds correctly, so Python's repr round-trips exactly.
                Json::Num(text.parse().unwrap_or_else(|_| panic!("bad number {text}")))
            }
        }
    }
    fn string(&mut self) -> String {
        self.eat(b'"');
        let mut out = String::new();
        loop {
            let b = self.s[self.i];
            self.i += 1;
            match b {
                b'"' => return out,
                b'\\' => {
                    let e = self.s[self.i];
                    self.i += 1;
                    match e {
                        b'n' => out.push('\n'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let hex = std::str::from_utf8(&self.s[self.i..self.i + 4]).unwrap();
                            let code = u32::from_str_radix(hex, 16).unwrap();
                            out.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                            self.i += 4;
                        }
                        other => out.push(other as char),
                    }
                }
                _ => {
                    // Copy a whole UTF-8 sequence at once.
                    let start = self.i - 1;
                    let mut end = self.i;
                    while end < self.s.len() && (self.s[end] & 0xC0) == 0x80 {
                        end += 1;
                    }
                    out.push_str(std::str::from_utf8(&self.s[start..end]).unwrap());
                    self.i = end;
                }
            }
        }
    }
}
