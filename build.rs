//! Stamps the binaries with the commit they were built from, so a results folder can name it,
//! and with the one-line version stamp `--version` prints (bins/cli/version.rs).
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

fn git(args: &[&str]) -> Option<String> {
    Command::new("git")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// `YYYY-MM-DD` (UTC) of a Unix time: the civil-from-days algorithm (H. Hinnant), so the stamp
/// needs no `date` binary and no dependency.
fn utc_date(unix_secs: u64) -> String {
    let z = (unix_secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

fn main() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=HACSERVE_COMMIT={commit}");
    // No tags yet: `--always` falls back to the abbreviated commit; `-dirty` marks a build
    // from a modified tree.
    let describe =
        git(&["describe", "--tags", "--always", "--dirty"]).unwrap_or_else(|| commit.clone());
    println!("cargo:rustc-env=HACSERVE_GIT_DESCRIBE={describe}");
    // SOURCE_DATE_EPOCH (reproducible builds) wins over the clock.
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
    println!("cargo:rustc-env=HACSERVE_BUILD_DATE={}", utc_date(secs));
    println!(
        "cargo:rustc-env=HACSERVE_BUILD_TARGET={}",
        std::env::var("TARGET").unwrap_or_else(|_| "unknown".into())
    );
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    // In a worktree `.git` is a file; ask git where HEAD and the branch really live, so a new
    // commit refreshes the stamp. The index is not watched (git touches it on every status,
    // which would relink every binary), so `-dirty` is as of the last commit or clean build;
    // scripts/release.sh builds from a clean tree.
    if let Some(path) = git(&["rev-parse", "--git-path", "HEAD"]) {
        println!("cargo:rerun-if-changed={path}");
    }
    if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(path) = git(&["rev-parse", "--git-path", &head_ref]) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
