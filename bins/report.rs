//! report: draws the figures of one or more results folders (docs/results.md, "Figures"):
//! latency CDF, per-stage breakdown, throughput vs p99, CPU-seconds per request, each as
//! PNG and SVG, plus report.csv and a table of what was drawn.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use argh::FromArgs;
use hacserve_runtime::report::{
    draw_all, find_font, read_folder, register_font, summary, FontSource, Format, Outcome,
    FIGURE_SIZE,
};

/// Draw figures (PNG and SVG, 1200x800) from results folders written with -s.
#[derive(FromArgs)]
struct Args {
    /// where the figures and report.csv go (default: report)
    #[argh(option, default = "PathBuf::from(\"report\")")]
    out: PathBuf,
    /// a TrueType font file for the text (default: DejaVu Sans, Liberation Sans, ... under
    /// /usr/share/fonts)
    #[argh(option)]
    font: Option<PathBuf>,
    /// png, svg or png,svg (default: png,svg)
    #[argh(option, default = "String::from(\"png,svg\")")]
    format: String,
    /// a run's label instead of the one made from its run.json; repeat it, one per folder
    /// in order
    #[argh(option)]
    label: Vec<String>,
    /// results folders
    #[argh(positional)]
    folders: Vec<PathBuf>,
}

fn main() -> Result<()> {
    let args: Args = hacserve::cli::version::from_env();
    if args.folders.is_empty() {
        bail!("name at least one results folder (report FOLDER...)");
    }
    if args.label.len() > args.folders.len() {
        bail!(
            "{} --label for {} folders",
            args.label.len(),
            args.folders.len()
        );
    }
    let formats = Format::parse_list(&args.format)?;
    let mut runs = Vec::with_capacity(args.folders.len());
    for (i, folder) in args.folders.iter().enumerate() {
        let run = read_folder(folder, args.label.get(i).map(String::as_str))
            .with_context(|| format!("reading results folder {}", folder.display()))?;
        runs.push(run);
    }
    // Two runs of one description: tell them apart by folder name.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &runs {
        *seen.entry(r.label.clone()).or_default() += 1;
    }
    for r in &mut runs {
        if seen[&r.label] > 1 {
            let name = r
                .folder
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            r.label = format!("{} [{name}]", r.label);
        }
    }
    let font = find_font(args.font.as_deref())?;
    register_font(&font)?;
    let how = match &font {
        FontSource::Given(_) => "--font",
        FontSource::Found(_) => "found",
    };
    println!("report: font {} ({how})", font.path().display());
    let outcomes = draw_all(&runs, &args.out, &formats)?;
    for o in &outcomes {
        match o {
            Outcome::Drawn {
                figure,
                files,
                series,
            } => println!(
                "report: {} ({series} series, {}x{}): {}",
                figure.title(),
                FIGURE_SIZE.0,
                FIGURE_SIZE.1,
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            Outcome::Skipped { figure, reason } => {
                println!("report: skipped {}: {reason}", figure.title())
            }
        }
    }
    let csv = args.out.join("report.csv");
    summary::write_csv(&csv, &runs)?;
    print!("{}", summary::table(&runs));
    println!("report: {}", csv.display());
    if !outcomes.iter().any(|o| matches!(o, Outcome::Drawn { .. })) {
        bail!("nothing to draw: no folder has data for any figure");
    }
    Ok(())
}
