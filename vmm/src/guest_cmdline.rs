//! Checking a guest command line before boot against the keys the embedded fixtures declare
//! (`workload::keys`): an unknown key or a value the key does not accept is a usage error
//! naming the key and what is accepted, instead of a token the guest silently ignores. A guest
//! ELF from a file declares nothing, so its command line is passed through unchecked.

use workload::keys::{self, Accepts, KeyError, KeyGroups};

use crate::config::GuestSource;

/// A command line the guest would not accept.
#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    /// A key the guest does not read.
    #[error("--cmdline: unknown key {key:?} for guest {guest}; it accepts: {accepted}")]
    UnknownKey {
        /// The guest.
        guest: String,
        /// The key as written.
        key: String,
        /// Every key the guest reads, comma-separated.
        accepted: String,
    },
    /// A known key with a value it does not accept.
    #[error(
        "--cmdline: bad value {value:?} for key {key} of guest {guest}; {key}= accepts {values}"
    )]
    BadValue {
        /// The guest.
        guest: String,
        /// The key.
        key: String,
        /// The value as written.
        value: String,
        /// What the key accepts.
        values: String,
    },
    /// The keys are fine one by one but not together.
    #[error("--cmdline {line:?} for guest {guest}: {reason}")]
    Combination {
        /// The guest.
        guest: String,
        /// The whole line.
        line: String,
        /// Why.
        reason: String,
    },
}

/// Every key of `groups`, comma-separated (`none` when the guest reads no key).
fn accepted(groups: KeyGroups) -> String {
    let names: Vec<&str> = groups
        .iter()
        .flat_map(|g| g.iter().map(|k| k.name))
        .collect();
    if names.is_empty() {
        "no keys".into()
    } else {
        names.join(", ")
    }
}

/// Checks `line` for `guest` running with `cpus` vCPUs.
pub fn check(guest: &GuestSource, line: &str, cpus: u32) -> Result<(), CmdlineError> {
    let GuestSource::Fixture(name) = guest else {
        return Ok(());
    };
    let Some(groups) = keys::fixture_keys(name) else {
        return Ok(());
    };
    keys::check(groups, line, cpus).map_err(|e| match e {
        KeyError::UnknownKey { key } => CmdlineError::UnknownKey {
            guest: name.clone(),
            key: key.to_string(),
            accepted: accepted(groups),
        },
        KeyError::BadValue { key, value } => CmdlineError::BadValue {
            guest: name.clone(),
            key: key.name.to_string(),
            value: value.to_string(),
            values: match key.accepts {
                Accepts::OneOf(words) => format!("one of {}", words.join(", ")),
                _ => key.values.to_string(),
            },
        },
        KeyError::Combination { reason } => CmdlineError::Combination {
            guest: name.clone(),
            line: line.to_string(),
            reason: reason.to_string(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io() -> GuestSource {
        GuestSource::Fixture("io".into())
    }

    #[test]
    fn messages_name_the_key_and_what_is_accepted() {
        let e = check(&io(), "polcy=throttle", 2).unwrap_err().to_string();
        assert!(
            e.contains("\"polcy\"") && e.contains("policy, sizes"),
            "{e}"
        );
        let e = check(&io(), "policy=bogus", 2).unwrap_err().to_string();
        assert!(e.contains("key policy") && e.contains("throttle"), "{e}");
        assert!(check(&io(), "policy=throttle qd=16", 2).is_ok());
    }

    #[test]
    fn files_are_not_checked() {
        let elf = GuestSource::File("/some/guest.elf".into());
        assert!(check(&elf, "anything=goes", 1).is_ok());
    }
}
