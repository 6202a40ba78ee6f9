//! Saved state of the machine's parts, as the migration stream carries it.
//!
//! Each part (a vCPU, the VM, a device) saves a plain `State` struct, kept apart from the live object
//! and checked when restored. On the wire a state is a small frame:
//!
//! ```text
//! "EMUS" | kind: u8 | version: u16 LE | payload (postcard)
//! ```
//!
//! The migration stream adds length and checksum around it. A reader refuses another kind, a
//! version it does not know, a payload that does not decode, and trailing bytes.

use serde::de::DeserializeOwned;
use serde::Serialize;

const MAGIC: &[u8; 4] = b"EMUS";
const HEADER_LEN: usize = 7;

/// Which part a saved state belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum StateKind {
    Vcpu = 1,
    Vm = 2,
    Serial = 3,
    ExitDevice = 4,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("saved state is too short or lacks the EMUS magic")]
    BadMagic,
    #[error("saved state is for {found} where {expected:?} was expected")]
    WrongKind { expected: StateKind, found: u8 },
    #[error("saved {kind:?} state has version {found}; this emu reads version {supported}")]
    Version { kind: StateKind, found: u16, supported: u16 },
    // `error`, not `source`: a field named `source` would also be the cause, printed twice by `{:#}`.
    #[error("saved {kind:?} state does not decode: {error}")]
    Decode { kind: StateKind, error: postcard::Error },
    #[error("cannot encode {kind:?} state: {error}")]
    Encode { kind: StateKind, error: postcard::Error },
    #[error("{0}")]
    Invalid(String),
}

/// A state struct with its kind and the version of its layout.
pub trait Versioned: Serialize + DeserializeOwned {
    const KIND: StateKind;
    /// Bumped whenever the struct's layout changes.
    const VERSION: u16;
}

pub fn encode<T: Versioned>(state: &T) -> Result<Vec<u8>, StateError> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(MAGIC);
    out.push(T::KIND as u8);
    out.extend_from_slice(&T::VERSION.to_le_bytes());
    postcard::to_io(state, &mut out).map_err(|error| StateError::Encode { kind: T::KIND, error })?;
    Ok(out)
}

pub fn decode<T: Versioned>(blob: &[u8]) -> Result<T, StateError> {
    if blob.len() < HEADER_LEN || &blob[..4] != MAGIC {
        return Err(StateError::BadMagic);
    }
    if blob[4] != T::KIND as u8 {
        return Err(StateError::WrongKind { expected: T::KIND, found: blob[4] });
    }
    let version = u16::from_le_bytes([blob[5], blob[6]]);
    if version != T::VERSION {
        return Err(StateError::Version { kind: T::KIND, found: version, supported: T::VERSION });
    }
    let (value, rest) =
        postcard::take_from_bytes(&blob[HEADER_LEN..]).map_err(|error| StateError::Decode { kind: T::KIND, error })?;
    if !rest.is_empty() {
        return Err(StateError::Invalid(format!("{} trailing bytes after {:?} state", rest.len(), T::KIND)));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Demo {
        a: u32,
        b: Vec<u8>,
    }
    impl Versioned for Demo {
        const KIND: StateKind = StateKind::Serial;
        const VERSION: u16 = 3;
    }

    #[test]
    fn round_trip_and_refusals() {
        let d = Demo { a: 7, b: vec![1, 2, 3] };
        let blob = encode(&d).unwrap();
        assert_eq!(decode::<Demo>(&blob).unwrap(), d);

        assert!(matches!(decode::<Demo>(b"EMU"), Err(StateError::BadMagic)));
        let mut wrong_kind = blob.clone();
        wrong_kind[4] = StateKind::Vcpu as u8;
        assert!(matches!(decode::<Demo>(&wrong_kind), Err(StateError::WrongKind { .. })));
        let mut wrong_version = blob.clone();
        wrong_version[5] = 9;
        assert!(matches!(decode::<Demo>(&wrong_version), Err(StateError::Version { found: 9, .. })));
        let truncated = &blob[..blob.len() - 2];
        assert!(matches!(decode::<Demo>(truncated), Err(StateError::Decode { .. })));
        let mut trailing = blob.clone();
        trailing.push(0);
        assert!(matches!(decode::<Demo>(&trailing), Err(StateError::Invalid(_))));
    }
}
