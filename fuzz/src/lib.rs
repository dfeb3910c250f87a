//! hacserve's fuzz targets (docs/fuzzing.md): the functions in [`targets`], which the afl
//! binaries in src/bin/ run, and the generated seeds in [`seeds`].
pub mod seeds;
pub mod targets;
