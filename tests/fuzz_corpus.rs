//! The fuzz targets (fuzz/src/targets.rs) without afl: every committed seed of
//! fuzz/corpus/<target>/ and every input that once crashed a target
//! (fuzz/regressions/<target>/) is run through its target, so the harness code and each
//! fixed bug stay tested in the ordinary suite. docs/fuzzing.md runs the targets under afl.

#[path = "../fuzz/src/seeds.rs"]
mod seeds;
#[path = "../fuzz/src/targets.rs"]
mod targets;

use std::fs;
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `dir`, sorted; none if it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("reading a corpus folder").path())
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != "README.md"))
        .collect();
    files.sort();
    files
}

/// Runs every file of fuzz/<folder>/<target>/ through its target, each with fresh state
/// and then all in a row on one shared state (as the afl loop and a server worker do).
/// Returns (inputs run, JPEGs that decoded).
fn run_all(folder: &str) -> (usize, usize) {
    let (mut total, mut decoded) = (0, 0);
    for target in targets::TARGETS {
        let files = inputs(&fuzz_dir().join(folder).join(target));
        let mut wire = targets::Wire::new();
        let mut jpeg = targets::Jpeg::new();
        for file in &files {
            let data = fs::read(file).expect("reading a corpus file");
            eprintln!("{target}: {}", file.display());
            assert!(targets::run(target, &data));
            match target {
                "wire" => targets::wire(&mut wire, &data),
                "jpeg" => decoded += usize::from(targets::jpeg(&mut jpeg, &data)),
                _ => targets::rdma_handshake(&data),
            }
        }
        total += files.len();
    }
    (total, decoded)
}

#[test]
fn every_committed_seed_runs_through_its_target() {
    for target in targets::TARGETS {
        let n = inputs(&fuzz_dir().join("corpus").join(target)).len();
        assert!(n >= 5, "fuzz/corpus/{target} has {n} seeds");
    }
    let (n, decoded) = run_all("corpus");
    eprintln!("{n} seeds ran, {decoded} JPEGs decoded");
    // Every JPEG seed but the arithmetic-coded one (zune-jpeg has no arithmetic decoder)
    // reaches the preprocessing.
    let jpegs = inputs(&fuzz_dir().join("corpus/jpeg")).len();
    assert_eq!(decoded, jpegs - 1, "JPEG seeds that decoded");
}

#[test]
fn every_committed_crash_input_runs_clean() {
    let (n, _) = run_all("regressions");
    eprintln!("{n} regression inputs ran");
}

#[test]
fn unknown_target_is_refused() {
    assert!(!targets::run("no_such_target", b""));
}

#[test]
fn generated_seeds_are_committed() {
    let mut stale = Vec::new();
    for (target, name, bytes) in seeds::generated() {
        let path = fuzz_dir().join("corpus").join(target).join(&name);
        if fs::read(&path).ok().as_deref() != Some(&bytes[..]) {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "generated seeds differ from the committed files (rerun `cargo test --test fuzz_corpus -- --ignored write_generated_seeds`): {stale:?}"
    );
}

/// Writes the generated seeds into fuzz/corpus/ (run on purpose only).
#[test]
#[ignore = "writes fuzz/corpus/: run with --ignored to regenerate the seeds"]
fn write_generated_seeds() {
    for (target, name, bytes) in seeds::generated() {
        let dir = fuzz_dir().join("corpus").join(target);
        fs::create_dir_all(&dir).expect("creating a corpus folder");
        fs::write(dir.join(name), bytes).expect("writing a seed");
    }
}
