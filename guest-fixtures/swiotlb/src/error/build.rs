//! [`BuildError`]: why a policy could not be built.

use super::map::MapError;
use crate::convert::ConvError;
use core::fmt;

/// Why a policy could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildError {
    /// The platform had no memory for the pool or its metadata.
    NoMemory,
    /// Converting the pool to shared failed or was refused.
    Conversion(ConvError),
    /// The configuration is inconsistent (e.g. an empty pool).
    BadConfig,
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::NoMemory => f.write_str("no memory for the bounce pool"),
            BuildError::Conversion(e) => write!(f, "bounce pool: {e}"),
            BuildError::BadConfig => f.write_str("bad pool configuration"),
        }
    }
}

impl From<ConvError> for BuildError {
    fn from(e: ConvError) -> Self {
        BuildError::Conversion(e)
    }
}

impl BuildError {
    /// A failure to add the boot pool, as a build error.
    pub(crate) fn from_growth(e: MapError) -> Self {
        match e {
            MapError::NoMemory => BuildError::NoMemory,
            MapError::Conversion(c) => BuildError::Conversion(c),
            _ => BuildError::BadConfig,
        }
    }
}
