//! Writes the deterministic test models (random-weight ResNet-50 and a tiny ResNet) as ONNX, so
//! benchmarks and tests run without downloading anything.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use argh::FromArgs;
use hacserve_runtime::model_gen;

/// Generate deterministic ONNX models (random weights, torchvision ResNet layout).
#[derive(FromArgs)]
struct Args {
    /// output directory (default: models)
    #[argh(option, default = "PathBuf::from(\"models\")")]
    out_dir: PathBuf,
    /// seed of the weight generator (default: 50)
    #[argh(option, default = "50")]
    seed: u64,
    /// write only one model: resnet50 or tiny
    #[argh(option)]
    only: Option<String>,
}

fn write(path: &Path, model: &model_gen::ModelProto) -> Result<()> {
    let bytes = model_gen::encode(model);
    // Same seed, same bytes: leave an identical file alone (keeps its mtime, saves 100 MB of IO).
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        println!("{:>12} bytes  {}  (unchanged)", bytes.len(), path.display());
        return Ok(());
    }
    model_gen::write_model(model, path).with_context(|| format!("writing {}", path.display()))?;
    println!("{:>12} bytes  {}", bytes.len(), path.display());
    Ok(())
}

fn main() -> Result<()> {
    let args: Args = hacserve::cli::version::from_env();
    let (big, tiny) = match args.only.as_deref() {
        None => (true, true),
        Some("resnet50") => (true, false),
        Some("tiny") => (false, true),
        Some(other) => bail!("--only takes resnet50 or tiny, not {other:?}"),
    };
    if tiny {
        let path = args.out_dir.join("resnet_tiny.onnx");
        write(&path, &model_gen::tiny_resnet(args.seed))?;
    }
    if big {
        let path = args.out_dir.join("resnet50.onnx");
        write(&path, &model_gen::resnet50(args.seed))?;
    }
    Ok(())
}
