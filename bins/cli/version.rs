//! `--version` for every role: one line naming the role, the package version, the commit
//! (`git describe`), the build date and the target, stamped by build.rs.

use argh::TopLevelCommand;

/// The stamp, e.g. `zmq_server hacserve 0.1.0 (8279a6f1c0de, built 2026-12-02,
/// x86_64-unknown-linux-gnu)`.
pub fn stamp(role: &str) -> String {
    format!(
        "{role} hacserve {} ({}, built {}, {})",
        env!("CARGO_PKG_VERSION"),
        env!("HACSERVE_GIT_DESCRIBE"),
        env!("HACSERVE_BUILD_DATE"),
        env!("HACSERVE_BUILD_TARGET"),
    )
}

/// `argh::from_env` with `--version` answered first (argh has no version flag): a lone
/// `--version` prints [`stamp`] and exits 0; anything else is parsed by argh as before, and
/// `--help` gets one more line naming `--version`.
pub fn from_env<T: TopLevelCommand>() -> T {
    let strings: Vec<String> = std::env::args_os()
        .map(|s| s.into_string())
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|arg| {
            eprintln!("Invalid utf8: {}", arg.to_string_lossy());
            std::process::exit(1)
        });
    let Some((program, rest)) = strings.split_first() else {
        eprintln!("No program name, argv is empty");
        std::process::exit(1)
    };
    // argh names the command by the last path component (as its own `from_env` does).
    let role = program.rsplit('/').next().unwrap_or(program);
    if rest.len() == 1 && rest[0] == "--version" {
        println!("{}", stamp(role));
        std::process::exit(0);
    }
    let strs: Vec<&str> = rest.iter().map(String::as_str).collect();
    T::from_args(&[role], &strs).unwrap_or_else(|early_exit| {
        std::process::exit(match early_exit.status {
            Ok(()) => {
                // The help text ends in a newline already; the extra line joins its options.
                println!("{}", early_exit.output.trim_end());
                println!("  --version         print the version and build stamp, then exit");
                0
            }
            Err(()) => {
                eprintln!(
                    "{}\nRun {role} --help for more information.",
                    early_exit.output
                );
                1
            }
        })
    })
}
