//! The paper form of a master key: for `homing key export` and `homing key import`.
//!
//! A key becomes 9 groups of 8 characters in Crockford's base32 (no I, L, O, U; when
//! typing, `O` reads as `0` and `I`/`L` as `1`, in any case). Each group holds 40
//! bits: 4 bytes and a CRC-8 over the group's number and those bytes. Groups 1-8 hold
//! the key; group 9 holds the key's public fingerprint. A CRC-8 catches every error
//! confined to 8 consecutive bits, so *every* single mistyped character is caught
//! and the group that holds it is named; swapped groups are caught because the group
//! number is part of each check.

use zeroize::Zeroizing;

use crate::error::PaperError;
use crate::key::{KEY_LEN, MasterKey};

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const GROUPS: usize = 9;
const GROUP_CHARS: usize = 8;
const CHARS: usize = GROUPS * GROUP_CHARS;
const HEADER: &str = "Homing master key";

/// Writes the paper form: a header line with the fingerprint, then three lines of
/// three groups. Zeroized on drop.
pub fn to_paper(key: &MasterKey) -> Zeroizing<String> {
    let fingerprint = key.fingerprint();
    let mut text = Zeroizing::new(format!(
        "{HEADER} (paper form v1), fingerprint {fingerprint}\n"
    ));
    for group in 0..GROUPS {
        let mut data = [0_u8; 4];
        if group < 8 {
            data.copy_from_slice(&key.expose_secret()[group * 4..group * 4 + 4]);
        } else {
            data = fingerprint.value().to_le_bytes();
        }
        let chars = encode_group(group, data);
        text.push_str(std::str::from_utf8(&chars[..4]).expect("the alphabet is ASCII"));
        text.push('-');
        text.push_str(std::str::from_utf8(&chars[4..]).expect("the alphabet is ASCII"));
        text.push(if group % 3 == 2 { '\n' } else { ' ' });
    }
    text
}

/// Reads a typed-in paper form. The header line is optional; spaces, line breaks
/// and dashes are ignored; case does not matter.
///
/// # Errors
/// A [`PaperError`] naming the bad character, the group with a typo, a wrong
/// number of characters, or groups that do not belong together.
pub fn from_paper(text: &str) -> Result<MasterKey, PaperError> {
    let mut values = Zeroizing::new(Vec::with_capacity(CHARS));
    let is_header = |line: &str| {
        let line = line.trim_start().as_bytes();
        line.len() >= HEADER.len() && line[..HEADER.len()].eq_ignore_ascii_case(HEADER.as_bytes())
    };
    for line in text.lines().filter(|l| !is_header(l)) {
        for ch in line.chars().filter(|c| !c.is_whitespace() && *c != '-') {
            let value = decode_char(ch).ok_or(PaperError::InvalidCharacter {
                ch,
                position: values.len() + 1,
            })?;
            values.push(value);
        }
    }
    if values.len() != CHARS {
        return Err(PaperError::WrongLength {
            expected: CHARS,
            found: values.len(),
        });
    }
    let mut key = Zeroizing::new([0_u8; KEY_LEN]);
    let mut fingerprint = [0_u8; 4];
    for (group, chars) in values.chunks_exact(GROUP_CHARS).enumerate() {
        let data =
            decode_group(group, chars).ok_or(PaperError::GroupChecksum { group: group + 1 })?;
        if group < 8 {
            key[group * 4..group * 4 + 4].copy_from_slice(&data);
        } else {
            fingerprint = data;
        }
    }
    let key = MasterKey::from_bytes(&mut key);
    if key.fingerprint().value() != u32::from_le_bytes(fingerprint) {
        return Err(PaperError::KeyChecksum);
    }
    Ok(key)
}

fn encode_group(group: usize, data: [u8; 4]) -> [u8; GROUP_CHARS] {
    let bits = (u64::from(u32::from_be_bytes(data)) << 8) | u64::from(group_crc(group, data));
    core::array::from_fn(|i| ALPHABET[((bits >> (35 - 5 * i)) & 0x1f) as usize])
}

fn decode_group(group: usize, values: &[u8]) -> Option<[u8; 4]> {
    let bits = values
        .iter()
        .fold(0_u64, |acc, v| (acc << 5) | u64::from(*v));
    let data = ((bits >> 8) as u32).to_be_bytes();
    (group_crc(group, data) == (bits & 0xff) as u8).then_some(data)
}

fn decode_char(ch: char) -> Option<u8> {
    let ch = match ch.to_ascii_uppercase() {
        'O' => '0',
        'I' | 'L' => '1',
        other => other,
    };
    ALPHABET
        .iter()
        .position(|a| char::from(*a) == ch)
        .map(|p| p as u8)
}

/// CRC-8 with polynomial x^8 + x^2 + x + 1 (0x07) over the group number and data.
fn group_crc(group: usize, data: [u8; 4]) -> u8 {
    let group = u8::try_from(group + 1).expect("there are only 9 groups");
    [group, data[0], data[1], data[2], data[3]]
        .iter()
        .fold(0_u8, |mut crc, byte| {
            crc ^= byte;
            for _ in 0..8 {
                crc = if crc & 0x80 != 0 {
                    (crc << 1) ^ 0x07
                } else {
                    crc << 1
                };
            }
            crc
        })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sample() -> MasterKey {
        MasterKey::from_bytes(&mut core::array::from_fn(|i| (i as u8).wrapping_mul(37)))
    }

    fn significant(text: &str) -> Vec<char> {
        text.lines()
            .skip(1)
            .flat_map(|l| l.chars())
            .filter(|c| !c.is_whitespace() && *c != '-')
            .collect()
    }

    #[test]
    fn paper_form_round_trips_and_looks_right() {
        let key = sample();
        let text = to_paper(&key);
        assert!(text.starts_with("Homing master key (paper form v1), fingerprint "));
        assert_eq!(text.lines().count(), 4);
        assert_eq!(significant(&text).len(), CHARS);
        let back = from_paper(&text).unwrap();
        assert_eq!(back.expose_secret(), key.expose_secret());
    }

    #[test]
    fn typing_is_forgiving_about_case_spacing_and_lookalikes() {
        let key = sample();
        let chars: String = significant(&to_paper(&key)).into_iter().collect();
        let retyped = chars.to_lowercase().replace('0', "o").replace('1', "l");
        let with_header = to_paper(&key).to_lowercase();
        assert_eq!(
            from_paper(&with_header).unwrap().expose_secret(),
            key.expose_secret()
        );
        let spaced: String = retyped
            .chars()
            .enumerate()
            .flat_map(|(i, c)| if i % 4 == 3 { vec![c, ' '] } else { vec![c] })
            .collect();
        assert_eq!(
            from_paper(&spaced).unwrap().expose_secret(),
            key.expose_secret()
        );
    }

    #[test]
    fn every_single_mistyped_character_is_caught_in_its_group() {
        let key = sample();
        let chars = significant(&to_paper(&key));
        for position in 0..CHARS {
            for replacement in ALPHABET.iter().map(|b| char::from(*b)) {
                if replacement == chars[position] {
                    continue;
                }
                let mut typo = chars.clone();
                typo[position] = replacement;
                let typed: String = typo.into_iter().collect();
                assert_eq!(
                    from_paper(&typed).err(),
                    Some(PaperError::GroupChecksum {
                        group: position / GROUP_CHARS + 1
                    }),
                    "typo {replacement:?} at {position} not caught in its group"
                );
            }
        }
    }

    #[test]
    fn swapped_groups_and_bad_input_are_caught() {
        let chars = significant(&to_paper(&sample()));
        let mut swapped = chars.clone();
        swapped[..8].copy_from_slice(&chars[8..16]);
        swapped[8..16].copy_from_slice(&chars[..8]);
        let typed: String = swapped.into_iter().collect();
        assert!(matches!(
            from_paper(&typed),
            Err(PaperError::GroupChecksum { group: 1 })
        ));

        let short: String = chars[..70].iter().collect();
        assert_eq!(
            from_paper(&short).err(),
            Some(PaperError::WrongLength {
                expected: 72,
                found: 70
            })
        );
        let mut bad: String = chars.iter().collect();
        bad.replace_range(5..6, "U");
        assert_eq!(
            from_paper(&bad).err(),
            Some(PaperError::InvalidCharacter {
                ch: 'U',
                position: 6
            })
        );
    }

    #[test]
    fn groups_from_two_keys_are_caught() {
        let a = significant(&to_paper(&sample()));
        let b = significant(&to_paper(&MasterKey::from_bytes(&mut [1; 32])));
        let mixed: String = a[..8].iter().chain(b[8..].iter()).collect();
        assert_eq!(from_paper(&mixed).err(), Some(PaperError::KeyChecksum));
    }

    proptest! {
        #[test]
        fn any_key_round_trips(bytes: [u8; 32]) {
            let key = MasterKey::from_bytes(&mut bytes.clone());
            let back = from_paper(&to_paper(&key)).unwrap();
            prop_assert_eq!(back.expose_secret(), &bytes);
        }

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,120}") {
            let _ = from_paper(&text);
        }
    }
}
