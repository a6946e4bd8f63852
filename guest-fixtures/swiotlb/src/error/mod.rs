//! The crate's error types, in a module every other one may use (so that no policy has to
//! borrow them from another), one per submodule: [`MapError`] (a pool call failed, `map`) and
//! [`BuildError`] (a policy could not be built, `build`).

mod build;
mod map;

pub use build::BuildError;
pub use map::MapError;
