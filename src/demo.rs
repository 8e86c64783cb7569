//! `sluice demo`: the example pipeline and the shipped fixtures, copied into a fresh folder and
//! run there, so a newcomer sees the whole job with one command.

use std::path::{Path, PathBuf};

use include_dir::{Dir, include_dir};

use crate::error::{Error, Result};

static FIXTURES: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/fixtures/raw");
static QUERIES: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/queries");
static SCHEMAS: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/schemas");
static CONFIG: &str = include_str!("../sluice.toml");

/// Writes the example project into `dir` (which must be empty or absent); returns its config
/// path. The lake is `dir/lake` with the fixtures in `raw/`.
pub fn scaffold(dir: &Path) -> Result<PathBuf> {
    if dir.exists()
        && std::fs::read_dir(dir)
            .map_err(|e| Error::io(format!("cannot read {}", dir.display()), e))?
            .next()
            .is_some()
    {
        return Err(Error::config(
            dir,
            "the demo folder is not empty; name a new one with --dir",
        ));
    }
    let write = |d: &Dir, to: &Path| -> Result<()> {
        std::fs::create_dir_all(to)
            .map_err(|e| Error::io(format!("cannot create {}", to.display()), e))?;
        d.extract(to)
            .map_err(|e| Error::io(format!("cannot write into {}", to.display()), e))
    };
    write(&FIXTURES, &dir.join("lake/raw"))?;
    write(&QUERIES, &dir.join("queries"))?;
    write(&SCHEMAS, &dir.join("schemas"))?;
    let config = dir.join("sluice.toml");
    std::fs::write(&config, CONFIG)
        .map_err(|e| Error::io(format!("cannot write {}", config.display()), e))?;
    Ok(config)
}

/// A fresh folder for a demo.
pub fn default_dir(run_id: &str) -> PathBuf {
    std::env::temp_dir().join(format!("sluice-demo-{run_id}"))
}
