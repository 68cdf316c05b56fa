//! Property test by a seeded random loop: mutated valid kernels and random bytes go through parse, fit, plan, load and build_info; every refusal is an error (never a panic) and every acceptance keeps the invariants.

mod common;

use common::{elf, two_segment_elf, u32_at, usual_aout, Rng};
use mboot::{build_info, parse, plan, Kernel, Module, BOOTLOADER_MAGIC, INFO_GPA};

const MIB: u64 = 1 << 20;
/// Cases per kind of input.
const CASES: u64 = 6_000;

/// A valid image of each kind, to mutate.
fn seeds() -> Vec<Vec<u8>> {
    vec![
        elf(&two_segment_elf(false)),
        elf(&two_segment_elf(true)),
        usual_aout().0,
    ]
}

/// Changes a few bytes, words or the length of `image`.
fn mutate(r: &mut Rng, image: &mut Vec<u8>) {
    for _ in 0..1 + r.below(4) {
        if image.is_empty() {
            image.push(r.next() as u8);
        }
        let at = r.below(image.len() as u64) as usize;
        match r.below(6) {
            0 => image[at] = r.next() as u8,
            1 => image[at] ^= 1 << r.below(8),
            2 => {
                // A 32-bit edge value, where a header field may be.
                let v: u32 = match r.below(4) {
                    0 => 0,
                    1 => u32::MAX,
                    2 => 1 << r.below(32),
                    _ => r.next() as u32,
                };
                let at = at & !3;
                let end = (at + 4).min(image.len());
                image[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            }
            3 => image.truncate(at),
            4 => image.extend((0..r.below(64)).map(|_| r.next() as u8)),
            _ => image[at] = 0,
        }
    }
}

/// Checks what an accepted kernel promises, then fits, plans and loads it.
fn exercise(r: &mut Rng, image: &[u8], k: &Kernel, accepted: &mut u64, booted: &mut u64) {
    *accepted += 1;
    assert!(!k.segments().is_empty());
    for s in k.segments() {
        assert!(s.file_len as u64 <= s.mem_len);
        assert!(s.file_offset + s.file_len <= image.len());
    }
    assert!(k.entry.0 <= u64::from(u32::MAX));
    assert!(k
        .segments()
        .iter()
        .any(|s| s.gpa <= k.entry && k.entry.0 < s.end()));
    let mem_bytes = [MIB + r.below(4 * MIB), 2 * MIB, 128 * MIB, r.next()][r.below(4) as usize];
    let _ = k.check_fits(mem_bytes).map_err(|e| e.to_string());
    let environ = [b'x'; 100];
    let modules = [Module {
        bytes: &environ[..r.below(101) as usize],
        string: "environ",
    }];
    let cmdline = ["", "a b c", "bad\0"][r.below(3) as usize];
    if let Err(e) = plan(k, mem_bytes, cmdline, &modules) {
        let _ = e.to_string();
    }
    // Boot into a small memory only: every accepted kernel here is small.
    let small = 2 * MIB + r.below(2 * MIB);
    if k.check_fits(small).is_ok() {
        let mut mem = vec![0u8; small as usize];
        k.load(image, mem.as_mut_slice())
            .expect("a fitting kernel loads");
        match build_info(mem.as_mut_slice(), k, cmdline, &modules) {
            Ok(entry) => {
                *booted += 1;
                assert_eq!(entry.eax, BOOTLOADER_MAGIC);
                assert_eq!(entry.ebx, INFO_GPA);
                assert_eq!(u32_at(&mem, INFO_GPA.0), 0x4d);
            }
            Err(e) => assert!(cmdline.contains('\0'), "{e}"),
        }
    }
}

#[test]
fn mutated_kernels_and_random_bytes_never_panic() {
    let mut r = Rng(0x6d62_6f6f_745f_6675);
    let (mut accepted, mut refused, mut booted) = (0, 0, 0);
    let mut reasons = std::collections::BTreeSet::new();
    for seed in seeds() {
        for _ in 0..CASES {
            let mut image = seed.clone();
            mutate(&mut r, &mut image);
            match parse(&image) {
                Ok(k) => exercise(&mut r, &image, &k, &mut accepted, &mut booted),
                Err(e) => {
                    refused += 1;
                    let text = e.to_string();
                    assert!(!text.is_empty());
                    reasons.insert(text.split([' ', ':']).next().unwrap_or("").to_string());
                }
            }
        }
    }
    for _ in 0..CASES {
        let len = r.below(9000) as usize;
        let mut image: Vec<u8> = (0..len).map(|_| r.next() as u8).collect();
        if len >= 12 && r.below(2) == 0 {
            // A valid header somewhere, so the search and the ELF path run.
            let at = (r.below(len as u64 - 11) as usize) & !3;
            let flags = [0, 1 << 16, r.next() as u32][r.below(3) as usize];
            image[at..at + 12].copy_from_slice(&common::multiboot_header(flags));
        }
        match parse(&image) {
            Ok(k) => exercise(&mut r, &image, &k, &mut accepted, &mut booted),
            Err(e) => {
                refused += 1;
                assert!(!e.to_string().is_empty());
            }
        }
    }
    println!("accepted {accepted}, booted {booted}, refused {refused}, reasons {reasons:?}");
    assert_eq!(accepted + refused, 4 * CASES);
    // The mutations reach both sides and many distinct refusals.
    assert!(accepted > CASES / 2, "accepted {accepted}");
    assert!(booted > CASES / 4, "booted {booted}");
    assert!(refused > CASES, "refused {refused}");
    assert!(reasons.len() >= 8, "{reasons:?}");
}
