//! Figures from results folders (the `report` binary): [`folder`] reads a folder's run.json
//! and CSVs (docs/results.md) into a typed [`folder::Run`], [`font`] finds and registers the
//! TrueType font the text is drawn with, [`figures`] draws the four figures as PNG and SVG,
//! [`summary`] writes what was drawn as `report.csv` and a table. [`table`] and [`json`] are
//! the readers underneath, each bad file or column a typed [`ReportError`].

pub mod figures;
pub mod folder;
pub mod font;
pub mod json;
pub mod summary;
pub mod table;

use std::path::PathBuf;

use thiserror::Error;

pub use figures::{draw_all, Figure, Format, Outcome, FIGURE_SIZE};
pub use folder::{read_folder, Group, Meta, Run};
pub use font::{find_font, register_font, FontSource};

#[derive(Debug, Error)]
pub enum ReportError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a folder")]
    NotAFolder { path: PathBuf },
    #[error("{path}: not a results folder (none of run.json, load_summary.csv, requests.csv, client_*.csv, clients_<N>/, multi_client_summary.csv is there)")]
    NotAResultsFolder { path: PathBuf },
    #[error("{path}: run.json lists {file} but it is missing")]
    MissingFile { path: PathBuf, file: String },
    #[error("{path}: not JSON at byte {at}: {what}")]
    Json {
        path: PathBuf,
        at: usize,
        what: &'static str,
    },
    #[error("{path}: field {field} must be {expected}")]
    Field {
        path: PathBuf,
        field: &'static str,
        expected: &'static str,
    },
    #[error("{path}: schema {found}, this report reads schema {supported}")]
    Schema {
        path: PathBuf,
        found: String,
        supported: u32,
    },
    #[error("{path}: empty file (no header line)")]
    Empty { path: PathBuf },
    #[error("{path}: no column {column} in the header")]
    MissingColumn { path: PathBuf, column: String },
    #[error("{path} line {line}: {found} fields where the header has {expected}")]
    FieldCount {
        path: PathBuf,
        line: usize,
        found: usize,
        expected: usize,
    },
    #[error("{path} line {line}: column {column}: {value:?} is not {expected}")]
    BadValue {
        path: PathBuf,
        line: usize,
        column: String,
        value: String,
        expected: &'static str,
    },
    #[error("no TrueType font found (looked for {tried}); name one with --font FILE")]
    NoFont { tried: String },
    #[error("font {path}: {why}; name another with --font FILE")]
    BadFont { path: PathBuf, why: String },
    #[error("drawing {file}: {what}")]
    Draw { file: PathBuf, what: String },
    #[error("{path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
}
