//! Object ids and object kinds: the values the store server sees and compares.
//!
//! Nothing here is secret. These types are available without the `keys` feature, so
//! that the store server can use them without linking any key material code.

use std::fmt;

/// The id of an object: the BLAKE3 keyed hash of its plaintext under the owner's id
/// subkey (see [`KeyRing::object_id`](crate::KeyRing::object_id)).
///
/// The store cannot compute ids, so it cannot confirm that a user holds a known file;
/// it can only compare the ids it is given.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectId([u8; ObjectId::LEN]);

impl ObjectId {
    /// Length of an id in bytes.
    pub const LEN: usize = 32;

    /// Wraps 32 bytes received from a peer or read from disk.
    pub const fn from_bytes(bytes: [u8; Self::LEN]) -> Self {
        Self(bytes)
    }

    /// The id's bytes.
    pub const fn as_bytes(&self) -> &[u8; Self::LEN] {
        &self.0
    }

    /// Parses 64 hexadecimal digits, as [`Display`](fmt::Display) prints them.
    pub fn from_hex(text: &str) -> Option<Self> {
        let text = text.as_bytes();
        if text.len() != 2 * Self::LEN {
            return None;
        }
        let mut bytes = [0_u8; Self::LEN];
        for (byte, pair) in bytes.iter_mut().zip(text.chunks_exact(2)) {
            *byte = (hex_value(pair[0])? << 4) | hex_value(pair[1])?;
        }
        Some(Self(bytes))
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in &self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({self})")
    }
}

/// What an object holds. The kind is written into every sealed object and bound
/// into its authentication, so the store cannot relabel a chunk as a tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    /// A piece of file content cut by the chunker.
    Chunk,
    /// A directory listing: names, metadata and the ids of contents and subtrees.
    Tree,
    /// A snapshot manifest: set, time, host, root tree, sequence, previous snapshot.
    Snapshot,
    /// Any other structure a client stores, such as a page of a large file's chunk list.
    Other,
}

impl ObjectKind {
    /// Every kind, in byte order.
    pub const ALL: [Self; 4] = [Self::Chunk, Self::Tree, Self::Snapshot, Self::Other];

    /// The byte that stands for this kind in the object format.
    pub const fn to_byte(self) -> u8 {
        match self {
            Self::Chunk => 1,
            Self::Tree => 2,
            Self::Snapshot => 3,
            Self::Other => 4,
        }
    }

    /// The kind a format byte stands for, if any.
    pub const fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::Chunk),
            2 => Some(Self::Tree),
            3 => Some(Self::Snapshot),
            4 => Some(Self::Other),
            _ => None,
        }
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Chunk => "chunk",
            Self::Tree => "tree",
            Self::Snapshot => "snapshot",
            Self::Other => "other",
        })
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = ObjectId::from_bytes(core::array::from_fn(|i| (i * 7) as u8));
        assert_eq!(ObjectId::from_hex(&id.to_string()), Some(id));
        assert_eq!(ObjectId::from_hex(&id.to_string().to_uppercase()), Some(id));
        assert_eq!(ObjectId::from_hex("00"), None);
        assert_eq!(ObjectId::from_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn kind_bytes_round_trip_and_unknown_bytes_are_none() {
        for kind in ObjectKind::ALL {
            assert_eq!(ObjectKind::from_byte(kind.to_byte()), Some(kind));
        }
        assert_eq!(ObjectKind::from_byte(0), None);
        assert_eq!(ObjectKind::from_byte(5), None);
    }
}
