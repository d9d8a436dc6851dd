//! Grain identities: a registered type name and a key.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The key part of a grain's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum GrainKey {
    /// A string, such as a user name.
    Str(String),
    /// An integer.
    U64(u64),
    /// A UUID.
    Uuid(Uuid),
    /// An integer with a string extension (Orleans' compound key).
    Compound(u64, String),
}

impl fmt::Display for GrainKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GrainKey::Str(key) => write!(f, "{key:?}"),
            GrainKey::U64(key) => write!(f, "{key}"),
            GrainKey::Uuid(key) => write!(f, "{key}"),
            GrainKey::Compound(key, extension) => write!(f, "{key}+{extension:?}"),
        }
    }
}

impl From<&str> for GrainKey {
    fn from(key: &str) -> GrainKey {
        GrainKey::Str(key.to_string())
    }
}

impl From<String> for GrainKey {
    fn from(key: String) -> GrainKey {
        GrainKey::Str(key)
    }
}

impl From<u64> for GrainKey {
    fn from(key: u64) -> GrainKey {
        GrainKey::U64(key)
    }
}

impl From<Uuid> for GrainKey {
    fn from(key: Uuid) -> GrainKey {
        GrainKey::Uuid(key)
    }
}

impl From<(u64, &str)> for GrainKey {
    fn from((key, extension): (u64, &str)) -> GrainKey {
        GrainKey::Compound(key, extension.to_string())
    }
}

/// A grain's full identity: its type's registered name and its key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GrainId {
    /// The name the grain type is registered under.
    pub type_name: String,
    /// The key.
    pub key: GrainKey,
}

impl fmt::Display for GrainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        IdentityDisplay(&self.type_name, &self.key).fmt(f)
    }
}

/// A type name and key shown as their [`GrainId`] would be.
pub(crate) struct IdentityDisplay<'a>(pub(crate) &'a str, pub(crate) &'a GrainKey);

impl fmt::Display for IdentityDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.0, self.1)
    }
}
