//! Fuzzes opening a sealed object as it arrives from the store: authentication,
//! decompression and the id check must reject any bytes without panicking.
//! The first byte picks the kind; the rest is the object. Every input is also
//! sealed for real and opened back, then opened again with one bit flipped.
#![no_main]

use homing_crypto::{MasterKey, ObjectKind};
use homing_transfer::{Sealer, open_object};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let keys = MasterKey::from_bytes(&mut [0x5a; 32]).key_ring();
    let Some((&selector, bytes)) = data.split_first() else { return };
    let kind = ObjectKind::ALL[usize::from(selector % 4)];
    let id = keys.object_id(bytes);
    // Arbitrary bytes as a sealed object.
    assert!(open_object(&keys, kind, &id, bytes).is_err());
    // A real object, sealed from the input, with one bit flipped where the selector says.
    let mut sealed = Sealer::new(&keys, 1).unwrap().seal(kind, bytes).unwrap().bytes;
    assert_eq!(open_object(&keys, kind, &id, &sealed).unwrap(), bytes);
    let bit = usize::from(selector) * 31 % (sealed.len() * 8);
    sealed[bit / 8] ^= 1 << (bit % 8);
    assert!(open_object(&keys, kind, &id, &sealed).is_err());
});
