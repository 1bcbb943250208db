//! Files the binary uses from the repository (the embedded tiny model, the VRAM presets). A
//! binary copied to another machine (a GPU box without a Rust toolchain) is run from a checkout
//! of the repository there, so the working directory is searched before the source tree the
//! binary was built from.

use std::path::{Path, PathBuf};

/// `rel` (a path relative to the repository root) under the working directory if it exists
/// there, else under the source tree of this build.
pub fn repo_file(rel: &str) -> PathBuf {
    let local = PathBuf::from(rel);
    if local.exists() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_working_directory_wins_over_the_source_tree() {
        // Tests run with the repository root as working directory: the relative path is kept.
        assert_eq!(repo_file("config/vram_presets.yaml"), PathBuf::from("config/vram_presets.yaml"));
        let missing = "no/such/file.yaml";
        assert_eq!(repo_file(missing), Path::new(env!("CARGO_MANIFEST_DIR")).join(missing));
    }
}
