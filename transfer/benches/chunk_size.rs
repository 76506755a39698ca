//! Chunk-size measurement: what each candidate set of FastCDC parameters costs in
//! bytes re-sent after a small edit, in index size, and in chunking speed.
//!
//! ```text
//! cargo bench -p homing-transfer --bench chunk_size [-- --mib 64 --text-dir DIR ...]
//! ```
//!
//! The data is a "mixed content" file: blocks of real text (see the pipeline bench
//! for where it comes from) alternating with blocks of random bytes, like a VM image
//! or a mailbox with attachments. For 20 positions drawn with a fixed seed, 100
//! bytes in place are overwritten; the file is chunked again and every chunk whose
//! content is new is counted, raw and as sealed (zstd level 3 when it helps, plus
//! the 46-byte seal overhead). The median over the 20 edits is what a one-spot
//! change costs on the link, before trees and manifest. "initial" is the sealed
//! size of the whole file against its raw size: what the first backup sends. `docs/decisions/0002-chunk-size.md`
//! records a run and the choice it led to.

#![allow(clippy::disallowed_types)] // measuring wall time is the point here
#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use fastcdc::v2020::{FastCDC, Normalization};

mod corpus;

const MIB: usize = 1024 * 1024;
const KIB: u32 = 1024;
const SEAL_OVERHEAD: usize = 46;

struct Candidate {
    min: u32,
    avg: u32,
    max: u32,
    level: Normalization,
}

fn main() {
    let mut mib = 64;
    let mut text_dirs: Vec<PathBuf> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--mib" => mib = args.next().and_then(|v| v.parse().ok()).expect("--mib N"),
            "--text-dir" => text_dirs.push(args.next().expect("--text-dir DIR").into()),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    if text_dirs.is_empty() {
        text_dirs = corpus::default_text_dirs();
    }
    let data = mixed(mib * MIB, &text_dirs);
    let edits = edit_positions(data.len(), 20);

    let candidates = [
        Candidate {
            min: 4 * KIB,
            avg: 16 * KIB,
            max: 64 * KIB,
            level: Normalization::Level2,
        },
        Candidate {
            min: 8 * KIB,
            avg: 32 * KIB,
            max: 128 * KIB,
            level: Normalization::Level1,
        },
        Candidate {
            min: 8 * KIB,
            avg: 32 * KIB,
            max: 128 * KIB,
            level: Normalization::Level2,
        },
        Candidate {
            min: 16 * KIB,
            avg: 32 * KIB,
            max: 128 * KIB,
            level: Normalization::Level2,
        },
        Candidate {
            min: 16 * KIB,
            avg: 64 * KIB,
            max: 256 * KIB,
            level: Normalization::Level1,
        },
        Candidate {
            min: 16 * KIB,
            avg: 64 * KIB,
            max: 256 * KIB,
            level: Normalization::Level2,
        },
        Candidate {
            min: 32 * KIB,
            avg: 64 * KIB,
            max: 256 * KIB,
            level: Normalization::Level2,
        },
        Candidate {
            min: 64 * KIB,
            avg: 128 * KIB,
            max: 512 * KIB,
            level: Normalization::Level2,
        },
    ];
    println!(
        "{} MiB mixed file (text and random blocks), 100-byte edits at {} positions\n",
        mib,
        edits.len()
    );
    println!(
        "{:>5} {:>5} {:>5} {:>3} | {:>9} {:>8} {:>8} | {:>10} {:>10} {:>10} | {:>8} {:>10}",
        "min",
        "avg",
        "max",
        "lvl",
        "mean size",
        "chunks/GiB",
        "initial",
        "edit raw",
        "edit sealed",
        "p90 sealed",
        "index/GiB",
        "FastCDC MB/s"
    );
    let mut compressor = zstd::bulk::Compressor::new(3).unwrap();
    for c in &candidates {
        let cut = |bytes: &[u8]| -> Vec<(usize, usize)> {
            FastCDC::with_level_and_seed(
                bytes,
                c.min as usize,
                c.avg as usize,
                c.max as usize,
                c.level,
                0x5eed,
            )
            .map(|ch| (ch.offset, ch.length))
            .collect()
        };
        let start = Instant::now();
        let spans = cut(&data);
        let speed = data.len() as f64 / 1e6 / start.elapsed().as_secs_f64();
        let initial: usize = spans
            .iter()
            .map(|&(o, l)| {
                compressor.compress(&data[o..o + l]).unwrap().len().min(l) + 1 + SEAL_OVERHEAD
            })
            .sum();
        let known: HashSet<[u8; 32]> = spans
            .iter()
            .map(|&(o, l)| *blake3::hash(&data[o..o + l]).as_bytes())
            .collect();

        let mut raw = Vec::new();
        let mut sealed = Vec::new();
        let mut edited = data.clone();
        for &at in &edits {
            edited[at..at + 100]
                .iter_mut()
                .for_each(|b| *b = b.wrapping_add(1));
            let (mut r, mut s) = (0, 0);
            for (o, l) in cut(&edited) {
                let chunk = &edited[o..o + l];
                if !known.contains(blake3::hash(chunk).as_bytes()) {
                    r += l;
                    let z = compressor.compress(chunk).unwrap().len();
                    s += z.min(l) + 1 + SEAL_OVERHEAD;
                }
            }
            raw.push(r);
            sealed.push(s);
            edited[at..at + 100].copy_from_slice(&data[at..at + 100]);
        }
        raw.sort_unstable();
        sealed.sort_unstable();
        let chunks_per_gib = spans.len() as f64 * (1 << 30) as f64 / data.len() as f64;
        // Index entry per chunk: 32-byte id plus offset and length (8 + 4) and the
        // sealed size (4): 48 bytes, before the embedded store's own overhead.
        let index = chunks_per_gib * 48.0 / MIB as f64;
        println!(
            "{:>4}K {:>4}K {:>4}K {:>3} | {:>8.1}K {:>10.0} {:>7.1}% | {:>9.1}K {:>10.1}K {:>9.1}K | {:>6.2}MiB {:>10.0}",
            c.min / KIB,
            c.avg / KIB,
            c.max / KIB,
            c.level.bits(),
            data.len() as f64 / spans.len() as f64 / 1024.0,
            chunks_per_gib,
            100.0 * initial as f64 / data.len() as f64,
            median(&raw) / 1024.0,
            median(&sealed) / 1024.0,
            sealed[sealed.len() * 9 / 10] as f64 / 1024.0,
            index,
            speed
        );
    }
}

fn median(sorted: &[usize]) -> f64 {
    let n = sorted.len();
    (sorted[(n - 1) / 2] + sorted[n / 2]) as f64 / 2.0
}

fn edit_positions(len: usize, count: usize) -> Vec<usize> {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    (0..count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            len / 10 + (state as usize) % (len * 8 / 10)
        })
        .collect()
}

/// Alternating blocks of 192 KiB of text and 64 KiB of random bytes.
fn mixed(len: usize, dirs: &[PathBuf]) -> Vec<u8> {
    let text = corpus::text(len, dirs);
    let random = corpus::random(len);
    let mut out = Vec::with_capacity(len);
    let (mut t, mut r) = (0, 0);
    while out.len() < len {
        let take = (192 * 1024).min(text.len() - t);
        out.extend_from_slice(&text[t..t + take]);
        t = (t + take) % text.len().max(1);
        out.extend_from_slice(&random[r..r + 64 * 1024]);
        r += 64 * 1024;
    }
    out.truncate(len);
    out
}
