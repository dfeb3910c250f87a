//! The TrueType font the figures' text is drawn with: `--font FILE`, else the first of the
//! usual system locations that exists (DejaVu Sans, Liberation Sans, Noto Sans, FreeSans
//! under /usr/share/fonts and /usr/local/share/fonts), else any `*Sans*.ttf` found there.
//! Loaded once and registered with plotters' ab_glyph registry as `sans-serif`; nothing is
//! linked (no fontconfig, no FreeType).

use std::path::{Path, PathBuf};

use super::ReportError;

/// The family name the figures ask plotters for.
pub const FAMILY: &str = "sans-serif";

/// Known files, most preferred first (Debian/Ubuntu, Fedora/RHEL, Arch, openSUSE layouts).
pub const CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans-fonts/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/google-noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/usr/share/fonts/gnu-free/FreeSans.ttf",
];

/// Folders searched (a few levels deep) when no candidate exists.
const ROOTS: &[&str] = &["/usr/share/fonts", "/usr/local/share/fonts"];

/// Where the font came from.
#[derive(Debug, Clone, PartialEq)]
pub enum FontSource {
    /// `--font FILE`
    Given(PathBuf),
    /// Found on the system.
    Found(PathBuf),
}

impl FontSource {
    pub fn path(&self) -> &Path {
        match self {
            FontSource::Given(p) | FontSource::Found(p) => p,
        }
    }
}

/// A regular (not bold, italic, mono or condensed) sans `.ttf` under `dir`, `depth` levels.
fn search(dir: &Path, depth: usize) -> Option<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    let plain = |p: &Path| {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        name.ends_with(".ttf")
            && name.contains("sans")
            && !["bold", "italic", "oblique", "mono", "condensed", "light"]
                .iter()
                .any(|w| name.contains(w))
    };
    if let Some(f) = entries.iter().find(|p| p.is_file() && plain(p)) {
        return Some(f.clone());
    }
    if depth == 0 {
        return None;
    }
    entries
        .iter()
        .filter(|p| p.is_dir())
        .find_map(|d| search(d, depth - 1))
}

/// The font to use: `given` if any (it must exist), else the system's.
pub fn find_font(given: Option<&Path>) -> Result<FontSource, ReportError> {
    if let Some(p) = given {
        if !p.is_file() {
            return Err(ReportError::BadFont {
                path: p.to_path_buf(),
                why: "no such file".into(),
            });
        }
        return Ok(FontSource::Given(p.to_path_buf()));
    }
    if let Some(p) = CANDIDATES.iter().map(Path::new).find(|p| p.is_file()) {
        return Ok(FontSource::Found(p.to_path_buf()));
    }
    if let Some(p) = ROOTS.iter().find_map(|r| search(Path::new(r), 4)) {
        return Ok(FontSource::Found(p));
    }
    Err(ReportError::NoFont {
        tried: format!(
            "DejaVu Sans, Liberation Sans, Noto Sans, FreeSans and any *Sans*.ttf under {}",
            ROOTS.join(", ")
        ),
    })
}

/// Reads the font once and registers it for every style plotters may ask for. The bytes
/// live as long as the process (plotters' registry holds `&'static` data).
pub fn register_font(source: &FontSource) -> Result<(), ReportError> {
    let path = source.path();
    let bytes = std::fs::read(path).map_err(|e| ReportError::BadFont {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font(FAMILY, plotters::style::FontStyle::Normal, bytes).map_err(
        |_| ReportError::BadFont {
            path: path.to_path_buf(),
            why: "not a TrueType/OpenType font".into(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_font_must_exist_and_parse() {
        let e = find_font(Some(Path::new("/nonexistent/font.ttf")))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "font /nonexistent/font.ttf: no such file; name another with --font FILE"
        );
        let junk = std::env::temp_dir().join(format!("hacserve-junk-{}.ttf", std::process::id()));
        std::fs::write(&junk, b"not a font").unwrap();
        let e = register_font(&FontSource::Given(junk.clone()))
            .unwrap_err()
            .to_string();
        assert!(e.contains(": not a TrueType/OpenType font; "), "{e}");
        let _ = std::fs::remove_file(junk);
    }
}
