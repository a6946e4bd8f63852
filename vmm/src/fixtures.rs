//! The guest programs embedded in this binary (built from `guest-fixtures/` by build.rs), and
//! resolving `--guest NAME|PATH` to an image.

use std::path::{Path, PathBuf};

use crate::config::GuestSource;

include!(concat!(env!("OUT_DIR"), "/fixtures.rs"));

/// The fixture `vmm run` boots when no guest is named.
pub const DEFAULT_FIXTURE: &str = "hello";

/// Errors resolving a guest.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// Neither an embedded fixture nor an existing file.
    #[error("unknown guest {name:?}: not an embedded fixture (run `vmm fixtures`; known: {known}) and no such file")]
    Unknown {
        /// The name given.
        name: String,
        /// The embedded fixtures' names, comma-separated.
        known: String,
    },
    /// The file could not be read.
    #[error("cannot read guest image {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// An embedded fixture's image, by name.
pub fn embedded(name: &str) -> Option<&'static [u8]> {
    EMBEDDED
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, _, elf)| *elf)
}

/// Names and descriptions of the embedded fixtures.
pub fn list() -> impl Iterator<Item = (&'static str, &'static str)> {
    EMBEDDED.iter().map(|(n, d, _)| (*n, *d))
}

/// `--guest` as given: an embedded fixture name wins over a file of the same name.
pub fn resolve(arg: &str) -> Result<GuestSource, FixtureError> {
    if embedded(arg).is_some() {
        return Ok(GuestSource::Fixture(arg.to_string()));
    }
    let path = Path::new(arg);
    if path.exists() {
        return Ok(GuestSource::File(path.to_path_buf()));
    }
    Err(FixtureError::Unknown {
        name: arg.to_string(),
        known: list().map(|(n, _)| n).collect::<Vec<_>>().join(", "),
    })
}

/// The image bytes of a guest.
pub fn load(source: &GuestSource) -> Result<std::borrow::Cow<'static, [u8]>, FixtureError> {
    match source {
        GuestSource::Fixture(name) => {
            embedded(name)
                .map(std::borrow::Cow::Borrowed)
                .ok_or_else(|| FixtureError::Unknown {
                    name: name.clone(),
                    known: list().map(|(n, _)| n).collect::<Vec<_>>().join(", "),
                })
        }
        GuestSource::File(path) => {
            std::fs::read(path)
                .map(std::borrow::Cow::Owned)
                .map_err(|source| FixtureError::Read {
                    path: path.clone(),
                    source,
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_fixture_is_embedded_and_is_elf() {
        let elf = embedded(DEFAULT_FIXTURE).expect("default fixture embedded");
        assert_eq!(&elf[..4], b"\x7fELF");
        assert!(list().any(|(n, d)| n == "smp" && !d.is_empty()));
    }

    #[test]
    fn unknown_names_are_errors() {
        assert!(matches!(
            resolve("no-such-fixture-or-file"),
            Err(FixtureError::Unknown { .. })
        ));
        assert!(matches!(resolve("hello"), Ok(GuestSource::Fixture(_))));
    }
}
