//! `report` on the results of a real run: a loopback zmq_server and multi_client's in-process
//! load generator (two concurrency levels, -s) write their folders, `report` draws them, and
//! every figure must decode at the documented size (PNG) and parse as XML holding the run's
//! label and the expected titles and series (SVG). Broken folders must fail with the typed
//! error's text and a non-zero exit. Needs a TrueType font (report --font, or one of the
//! system locations): without one the drawing test says so and skips, unless
//! HACSERVE_REPORT_FONT_REQUIRED=1.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{model, run, temp_dir, zmq_server};

const REPORT: &str = env!("CARGO_BIN_EXE_report");

/// The documented figure size.
const SIZE: (u32, u32) = (1200, 800);

/// The folders one real run wrote, made once for every test here.
struct Folders {
    /// multi_client's (run.json, load_summary.csv, requests.csv, resources.csv)
    load: PathBuf,
    /// zmq_server's (run.json, server_requests.csv, resources.csv)
    server: PathBuf,
    port: u16,
}

fn folders() -> &'static Folders {
    static ONCE: OnceLock<Folders> = OnceLock::new();
    ONCE.get_or_init(|| {
        let load = temp_dir("report-load");
        let server_dir = temp_dir("report-server");
        let server = zmq_server(
            &model("resnet_tiny"),
            &["-s", "-f", server_dir.to_str().unwrap()],
        );
        let port = server.port.to_string();
        let pid = server.child.id().to_string();
        let (ok, out) = run(
            env!("CARGO_BIN_EXE_multi_client"),
            &[
                "--host",
                "127.0.0.1",
                "-p",
                &port,
                "--no-pin",
                "-t",
                "echo",
                "--payload-size",
                "64",
                "-c",
                "2",
                "--depth",
                "2",
                "--concurrency-range",
                "1:3:2",
                "--measurement-request-count",
                "200",
                "--max-trials",
                "5",
                "--stability-percentage",
                "1000000",
                "--server-pid",
                &pid,
                "-s",
                "-f",
                load.to_str().unwrap(),
            ],
        );
        assert!(ok, "multi_client failed: {out}");
        let port = server.port;
        server.stop();
        Folders {
            load,
            server: server_dir,
            port,
        }
    })
}

/// True when a font can be found; otherwise says why on the real stderr (SKIPPED ...) and
/// returns false, or fails with HACSERVE_REPORT_FONT_REQUIRED=1.
fn font_ready(what: &str) -> bool {
    let Err(e) = hacserve_runtime::report::find_font(None) else {
        return true;
    };
    if std::env::var("HACSERVE_REPORT_FONT_REQUIRED").as_deref() == Ok("1") {
        panic!("{what}: a font is required (HACSERVE_REPORT_FONT_REQUIRED=1) but {e}");
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {what}: {e} (install fonts-dejavu-core)"
    );
    false
}

/// A PNG's size, decoding every row (the whole image must be valid, not only its header).
fn png_size(path: &Path) -> (u32, u32) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader
        .next_frame(&mut buf)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // Not blank: a drawn figure has more than its white background.
    let px = info.buffer_size();
    assert!(
        buf[..px].iter().any(|&b| b < 128),
        "{} has no dark pixel",
        path.display()
    );
    (info.width, info.height)
}

/// An SVG checked for well-formed XML (every element closed in order); returns the root's
/// attributes and every text node (trimmed, entities decoded).
fn svg(path: &Path) -> (String, Vec<String>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut stack: Vec<String> = Vec::new();
    let mut texts = Vec::new();
    let mut root = None;
    let mut rest = text.as_str();
    while let Some(open) = rest.find('<') {
        let between = rest[..open].trim();
        if !between.is_empty() {
            assert!(!stack.is_empty(), "text outside the root: {between:?}");
            let decoded = between
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&apos;", "'")
                .replace("&amp;", "&");
            texts.push(decoded);
        }
        let close = rest[open..]
            .find('>')
            .map(|c| open + c)
            .unwrap_or_else(|| panic!("{}: unclosed tag", path.display()));
        let tag = &rest[open + 1..close];
        rest = &rest[close + 1..];
        if tag.starts_with('?') || tag.starts_with('!') {
            continue;
        }
        if let Some(name) = tag.strip_prefix('/') {
            let top = stack.pop();
            assert_eq!(top.as_deref(), Some(name.trim()), "{}", path.display());
            continue;
        }
        let name = tag
            .split(|c: char| c.is_whitespace() || c == '/')
            .next()
            .unwrap()
            .to_string();
        assert!(!name.is_empty(), "{}: empty tag", path.display());
        if stack.is_empty() {
            assert!(root.is_none(), "{}: two roots", path.display());
            root = Some(tag.to_string());
        }
        if !tag.ends_with('/') {
            stack.push(name);
        }
    }
    assert!(
        rest.trim().is_empty(),
        "{}: text after the root",
        path.display()
    );
    assert!(stack.is_empty(), "{}: unclosed {stack:?}", path.display());
    (root.expect("no root element"), texts)
}

fn has(texts: &[String], want: &str, file: &Path) {
    assert!(
        texts.iter().any(|t| t == want),
        "{}: no text {want:?} in {texts:?}",
        file.display()
    );
}

#[test]
fn report_draws_every_figure_of_a_real_run() {
    if !font_ready("report_draws_every_figure_of_a_real_run") {
        return;
    }
    let f = folders();
    let out = temp_dir("report-out");
    let (ok, text) = run(
        REPORT,
        &[
            "--out",
            out.to_str().unwrap(),
            f.load.to_str().unwrap(),
            f.server.to_str().unwrap(),
        ],
    );
    println!("{text}");
    assert!(ok, "report failed: {text}");
    let label = format!("zmq echo -> 127.0.0.1:{}", f.port);
    let figures: [(&str, &str, &[&str]); 4] = [
        (
            "latency_cdf",
            "End-to-end latency CDF",
            &["end-to-end latency (us, log scale)", "fraction of requests"],
        ),
        (
            "stage_breakdown",
            "Per-stage latency breakdown (mean)",
            &[
                "mean time per request (us)",
                "client->server",
                "queue",
                "decode",
                "preprocess",
                "infer",
                "reply",
            ],
        ),
        (
            "throughput_p99",
            "Throughput vs p99 latency",
            &["throughput (requests/s)", "p99 latency (us)", "c=1", "c=3"],
        ),
        (
            "cpu_per_request",
            "CPU-seconds per request (per 1000 requests)",
            &[
                "CPU-seconds per 1000 requests",
                "client (load generator)",
                "server",
            ],
        ),
    ];
    for (stem, title, words) in figures {
        let png = out.join(format!("{stem}.png"));
        assert_eq!(png_size(&png), SIZE, "{}", png.display());
        let file = out.join(format!("{stem}.svg"));
        let (root, texts) = svg(&file);
        assert!(
            root.starts_with("svg ") && root.contains("width=\"1200\" height=\"800\""),
            "{root}"
        );
        has(&texts, title, &file);
        for w in words {
            has(&texts, w, &file);
        }
        assert!(text.contains(&format!("{stem}.png")), "{text}");
    }
    // The run's label, a series per level where a run has several.
    let cdf = out.join("latency_cdf.svg");
    let (_, texts) = svg(&cdf);
    has(&texts, &format!("{label} c=1"), &cdf);
    has(&texts, &format!("{label} c=3"), &cdf);
    let tput = out.join("throughput_p99.svg");
    has(&svg(&tput).1, &label, &tput);
    // Bar charts: the levels as ticks, the run's label under them, the server's run by its
    // own label.
    for stem in ["stage_breakdown", "cpu_per_request"] {
        let file = out.join(format!("{stem}.svg"));
        let (_, texts) = svg(&file);
        for t in ["c=1", "c=3", label.as_str()] {
            has(&texts, t, &file);
        }
    }
    let cpu = out.join("cpu_per_request.svg");
    let (_, texts) = svg(&cpu);
    assert!(
        texts.iter().any(|t| t.starts_with("zmq zmq_server ")),
        "{texts:?}"
    );

    // report.csv: a row per level of the load run, one for the server's whole run, with the
    // load summary's own figures.
    let csv = std::fs::read_to_string(out.join("report.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 3, "{csv}");
    let summary = std::fs::read_to_string(f.load.join("load_summary.csv")).unwrap();
    for (row, level) in rows.iter().zip(["concurrency 1", "concurrency 3"]) {
        assert!(row.starts_with(&format!("{label},")), "{row}");
        let fields: Vec<&str> = row.split(',').collect();
        assert_eq!(fields[2], level, "{row}");
        assert!(fields[3].parse::<u64>().unwrap() >= 600, "{row}");
        assert_eq!(
            fields[16], "latency_cdf;stage_breakdown;throughput_p99;cpu_per_request",
            "{row}"
        );
        // Its p99 is load_summary.csv's for that level.
        let level_value = level.rsplit(' ').next().unwrap();
        let line = summary
            .lines()
            .find(|l| l.split(',').nth(2) == Some(level_value))
            .unwrap();
        let p99: f64 = line.split(',').nth(14).unwrap().parse().unwrap();
        assert_eq!(fields[7].parse::<f64>().unwrap(), p99, "{row} vs {line}");
    }
    assert!(rows[2].contains("zmq_server") && rows[2].ends_with(",cpu_per_request"));

    // A folder without per-request data: those figures are skipped with the reason, the CPU
    // figure is still drawn.
    let only = temp_dir("report-out-server");
    let (ok, text) = run(
        REPORT,
        &[
            "--out",
            only.to_str().unwrap(),
            "--format",
            "svg",
            f.server.to_str().unwrap(),
        ],
    );
    assert!(ok, "{text}");
    for skipped in [
        "End-to-end latency CDF",
        "Per-stage latency breakdown (mean)",
        "Throughput vs p99 latency",
    ] {
        assert!(
            text.contains(&format!("report: skipped {skipped}: no folder has")),
            "{text}"
        );
    }
    assert!(only.join("cpu_per_request.svg").is_file());
    assert!(!only.join("cpu_per_request.png").exists(), "--format svg");
    assert!(!only.join("latency_cdf.svg").exists());
}

/// A copy of the load run's folder, for breaking.
fn copy_of(name: &str) -> PathBuf {
    let to = temp_dir(name);
    for e in std::fs::read_dir(&folders().load).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to
}

fn fails_with(args: &[&str], want: &str) {
    let (ok, text) = run(REPORT, args);
    assert!(!ok, "report succeeded on {args:?}: {text}");
    assert!(text.contains(want), "wanted {want:?} in: {text}");
    assert!(!text.contains("panicked"), "{text}");
}

#[test]
fn broken_folders_and_fonts_fail_with_the_typed_error() {
    let out = temp_dir("report-out-broken");
    let out = out.to_str().unwrap();

    // A garbled value in load_summary.csv: named by file, line and column.
    let garbled = copy_of("report-garbled");
    let path = garbled.join("load_summary.csv");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let mut fields: Vec<&str> = lines[2].split(',').collect();
    fields[14] = "garbled";
    lines[2] = fields.join(",");
    std::fs::write(&path, lines.join("\n")).unwrap();
    fails_with(
        &["--out", out, garbled.to_str().unwrap()],
        "load_summary.csv line 3: column p99_us: \"garbled\" is not a number",
    );

    // A row cut short in requests.csv.
    let cut = copy_of("report-cut");
    let path = cut.join("requests.csv");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("0,1,6,0\n");
    let last = text.lines().count();
    std::fs::write(&path, text).unwrap();
    fails_with(
        &["--out", out, cut.to_str().unwrap()],
        &format!("requests.csv line {last}: 4 fields where the header has 16"),
    );

    // A file run.json lists, missing.
    let missing = copy_of("report-missing");
    std::fs::remove_file(missing.join("requests.csv")).unwrap();
    fails_with(
        &["--out", out, missing.to_str().unwrap()],
        "run.json lists requests.csv but it is missing",
    );

    // run.json that is not JSON.
    let bad_json = copy_of("report-json");
    std::fs::write(bad_json.join("run.json"), "{\"schema\": 1,").unwrap();
    fails_with(
        &["--out", out, bad_json.to_str().unwrap()],
        "run.json: not JSON at byte 13: unexpected end",
    );

    // Not a results folder at all.
    let empty = temp_dir("report-empty");
    fails_with(
        &["--out", out, empty.to_str().unwrap()],
        "not a results folder",
    );

    // A font that is not there, or not a font: the typed error names --font.
    let good = folders().load.to_str().unwrap();
    fails_with(
        &["--out", out, "--font", "/nonexistent/x.ttf", good],
        "font /nonexistent/x.ttf: no such file; name another with --font FILE",
    );
    let junk = Path::new(out).join("junk.ttf");
    std::fs::write(&junk, b"not a font").unwrap();
    fails_with(
        &["--out", out, "--font", junk.to_str().unwrap(), good],
        "not a TrueType/OpenType font; name another with --font FILE",
    );
    fails_with(
        &["--out", out, "--format", "gif", good],
        "--format takes png, svg",
    );
}
