//! Primitive encodings of the wire protocol: LEB128 varints, object ids, byte
//! strings; a reader that never trusts a length it reads.

use homing_crypto::ObjectId;

use super::ProtocolError;

/// Appends `value` as an unsigned LEB128 varint (1 to 10 bytes).
pub(crate) fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// How many bytes [`put_varint`] writes for `value`.
pub(crate) fn varint_len(value: u64) -> usize {
    let bits = 64 - value.max(1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Parses a varint from the start of `bytes`: `Ok(None)` if more bytes are needed.
///
/// # Errors
/// A varint longer than 10 bytes, one that overflows 64 bits, or one that is not in
/// its shortest form (two encodings of one value would let a peer smuggle bytes).
pub(crate) fn get_varint(bytes: &[u8]) -> Result<Option<(u64, usize)>, ProtocolError> {
    let mut value = 0_u64;
    for (i, &byte) in bytes.iter().enumerate().take(10) {
        let bits = u64::from(byte & 0x7f);
        if i == 9 && byte > 1 {
            return Err(ProtocolError::Malformed("varint overflows 64 bits"));
        }
        value |= bits << (7 * i);
        if byte & 0x80 == 0 {
            if i > 0 && byte == 0 {
                return Err(ProtocolError::Malformed("varint not in its shortest form"));
            }
            return Ok(Some((value, i + 1)));
        }
    }
    // Ten bytes always end above (a tenth byte with its high bit set is > 1).
    Ok(None)
}

/// Reads fields in order from one frame's payload; every length is checked against
/// the bytes actually present before anything is allocated.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    pub(crate) fn varint(&mut self) -> Result<u64, ProtocolError> {
        match get_varint(self.bytes)? {
            Some((value, len)) => {
                self.bytes = &self.bytes[len..];
                Ok(value)
            }
            None => Err(ProtocolError::Malformed("payload ends inside a varint")),
        }
    }

    pub(crate) fn u32(&mut self) -> Result<u32, ProtocolError> {
        u32::try_from(self.varint()?).map_err(|_| ProtocolError::Malformed("value exceeds 32 bits"))
    }

    pub(crate) fn u16(&mut self) -> Result<u16, ProtocolError> {
        u16::try_from(self.varint()?).map_err(|_| ProtocolError::Malformed("value exceeds 16 bits"))
    }

    pub(crate) fn byte(&mut self) -> Result<u8, ProtocolError> {
        let (&first, rest) = self
            .bytes
            .split_first()
            .ok_or(ProtocolError::Malformed("payload ends early"))?;
        self.bytes = rest;
        Ok(first)
    }

    pub(crate) fn take(&mut self, len: usize) -> Result<&'a [u8], ProtocolError> {
        if len > self.bytes.len() {
            return Err(ProtocolError::Malformed("payload ends early"));
        }
        let (head, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(head)
    }

    pub(crate) fn id(&mut self) -> Result<ObjectId, ProtocolError> {
        let bytes = self.take(ObjectId::LEN)?;
        Ok(ObjectId::from_bytes(
            bytes.try_into().expect("take returned ObjectId::LEN bytes"),
        ))
    }

    /// A count of items of at least `item_len` bytes each, checked against what is
    /// left, so that a claimed count can never size an allocation by itself.
    pub(crate) fn count(&mut self, item_len: usize) -> Result<usize, ProtocolError> {
        let count = self.varint()?;
        if count > (self.bytes.len() / item_len.max(1)) as u64 {
            return Err(ProtocolError::Malformed(
                "count exceeds the bytes that follow",
            ));
        }
        Ok(count as usize)
    }

    /// A varint length, then that many bytes.
    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], ProtocolError> {
        let len = self.count(1)?;
        self.take(len)
    }

    /// The rest of the payload.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    /// Fails unless the whole payload was read: trailing bytes are a malformed frame.
    pub(crate) fn finish(self) -> Result<(), ProtocolError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::Malformed("trailing bytes after the message"))
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn known_varints() {
        for (value, bytes) in [
            (0_u64, &[0x00][..]),
            (1, &[0x01]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (300, &[0xac, 0x02]),
            (
                u64::MAX,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(out, bytes, "{value}");
            assert_eq!(varint_len(value), bytes.len());
            assert_eq!(get_varint(bytes).unwrap(), Some((value, bytes.len())));
        }
    }

    #[test]
    fn bad_varints_are_refused() {
        assert!(get_varint(&[0x80, 0x00]).is_err(), "overlong zero");
        assert!(get_varint(&[0xff; 10]).is_err(), "more than 10 bytes");
        assert!(get_varint(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]).is_err());
        assert_eq!(get_varint(&[0x80, 0x80]).unwrap(), None, "incomplete");
        assert_eq!(get_varint(&[]).unwrap(), None);
    }

    #[test]
    fn a_claimed_count_never_exceeds_the_bytes_present() {
        let mut payload = Vec::new();
        put_varint(&mut payload, u64::MAX / 2);
        payload.extend_from_slice(&[0; 64]);
        assert!(Reader::new(&payload).count(32).is_err());
        let mut payload = Vec::new();
        put_varint(&mut payload, 2);
        payload.extend_from_slice(&[0; 64]);
        assert_eq!(Reader::new(&payload).count(32).unwrap(), 2);
    }

    proptest! {
        #[test]
        fn varints_round_trip(value: u64) {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            prop_assert_eq!(out.len(), varint_len(value));
            prop_assert_eq!(get_varint(&out).unwrap(), Some((value, out.len())));
            // Every strict prefix asks for more.
            for cut in 0..out.len() {
                prop_assert_eq!(get_varint(&out[..cut]).unwrap(), None);
            }
        }
    }
}
