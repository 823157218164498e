//! The kernels embedded at build time: one fatbin per `kernels/*.cu` file, what they were built
//! with, and a reader for the fatbin container that lists the machine code and PTX inside.

mod generated {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

pub use generated::{MODULES, NVCC_VERSION, PTXAS_REPORT, TARGET_ARCHS};

/// Whether this build embeds any kernels (false when nvcc was missing at build time).
pub fn kernels_built() -> bool {
    !MODULES.is_empty()
}

/// The fatbin of the module built from `kernels/<name>.cu`.
pub fn fatbin(name: &str) -> Option<&'static [u8]> {
    MODULES.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}

/// What one entry of a fatbin holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// PTX for `compute_XY` (JIT-compiled by the driver for newer cards).
    Ptx,
    /// Machine code (cubin) for `sm_XY`.
    Sass,
}

/// One image inside a fatbin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FatbinImage {
    /// PTX or machine code.
    pub kind: ImageKind,
    /// The architecture number, e.g. 90 for sm_90 / compute_90.
    pub arch: u32,
}

impl std::fmt::Display for FatbinImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            ImageKind::Ptx => write!(f, "compute_{} (PTX)", self.arch),
            ImageKind::Sass => write!(f, "sm_{}", self.arch),
        }
    }
}

const FATBIN_MAGIC: u32 = 0xBA55_ED50;

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Lists the images of a fatbin (as written by `nvcc -fatbin`): their kind and architecture.
///
/// The container is a header (magic `0xBA55ED50`, version, header size, payload size) followed by
/// entries, each with its own header: kind (1 = PTX, 2 = ELF) at offset 0, header size at 4,
/// payload size at 8 and the architecture at 28. Returns `None` if the bytes are not a fatbin.
pub fn fatbin_images(bytes: &[u8]) -> Option<Vec<FatbinImage>> {
    let mut images = Vec::new();
    let mut base = 0usize;
    while base < bytes.len() {
        if u32_at(bytes, base)? != FATBIN_MAGIC {
            // Trailing padding after the last container is allowed.
            if bytes[base..].iter().all(|&b| b == 0) {
                break;
            }
            return None;
        }
        let header = u16_at(bytes, base + 6)? as usize;
        let size = u64_at(bytes, base + 8)? as usize;
        let mut off = base + header;
        let end = off.checked_add(size)?;
        while off < end {
            let kind = u16_at(bytes, off)?;
            let eh = u32_at(bytes, off + 4)? as usize;
            let payload = u64_at(bytes, off + 8)? as usize;
            let arch = u32_at(bytes, off + 28)?;
            let kind = match kind {
                1 => ImageKind::Ptx,
                2 => ImageKind::Sass,
                _ => return None,
            };
            images.push(FatbinImage { kind, arch });
            off = off.checked_add(eh)?.checked_add(payload)?;
        }
        base = end;
    }
    Some(images)
}

/// The images that every embedded module holds (the intersection over modules), sorted.
pub fn embedded_images() -> Vec<FatbinImage> {
    let mut common: Option<Vec<FatbinImage>> = None;
    for (_, bytes) in MODULES {
        let imgs = fatbin_images(bytes).unwrap_or_default();
        common = Some(match common {
            None => imgs,
            Some(c) => c.into_iter().filter(|i| imgs.contains(i)).collect(),
        });
    }
    let mut v = common.unwrap_or_default();
    v.sort_by_key(|i| (i.kind == ImageKind::Ptx, i.arch));
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_fatbin() {
        assert_eq!(fatbin_images(b"not a fatbin at all"), None);
        assert_eq!(fatbin_images(&[0x50, 0xed, 0x55]), None);
    }

    #[test]
    fn parses_a_synthetic_fatbin() {
        // Header (16 bytes) + two entries of 64-byte headers and 8-byte payloads.
        let mut b = Vec::new();
        b.extend(FATBIN_MAGIC.to_le_bytes());
        b.extend(1u16.to_le_bytes());
        b.extend(16u16.to_le_bytes());
        b.extend((2u64 * 72).to_le_bytes());
        for (kind, arch) in [(2u16, 90u32), (1u16, 80u32)] {
            let mut e = vec![0u8; 64];
            e[0..2].copy_from_slice(&kind.to_le_bytes());
            e[4..8].copy_from_slice(&64u32.to_le_bytes());
            e[8..16].copy_from_slice(&8u64.to_le_bytes());
            e[28..32].copy_from_slice(&arch.to_le_bytes());
            b.extend(e);
            b.extend([0u8; 8]);
        }
        let imgs = fatbin_images(&b).expect("parses");
        assert_eq!(
            imgs,
            vec![
                FatbinImage {
                    kind: ImageKind::Sass,
                    arch: 90
                },
                FatbinImage {
                    kind: ImageKind::Ptx,
                    arch: 80
                }
            ]
        );
    }

    #[test]
    fn embedded_modules_are_fatbins_with_the_target_archs() {
        if !kernels_built() {
            // A build without nvcc checks nothing here: fail, unless the machine may skip.
            assert!(
                std::env::var("FUSED_INFONCE_ALLOW_SKIP").is_ok_and(|v| v == "1"),
                "this build embeds no kernels (no nvcc at build time); install nvcc \
                 (scripts/install-nvcc) or set FUSED_INFONCE_ALLOW_SKIP=1"
            );
            eprintln!("skipped: this build embeds no kernels (no nvcc at build time)");
            return;
        }
        for (name, bytes) in MODULES {
            let imgs = fatbin_images(bytes).unwrap_or_else(|| panic!("{name} is not a fatbin"));
            for arch in TARGET_ARCHS {
                let want = if let Some(n) = arch.strip_prefix("sm_") {
                    FatbinImage {
                        kind: ImageKind::Sass,
                        arch: n.trim_end_matches(['a', 'f']).parse().unwrap(),
                    }
                } else {
                    let n = arch.trim_start_matches("compute_");
                    FatbinImage {
                        kind: ImageKind::Ptx,
                        arch: n.trim_end_matches(['a', 'f']).parse().unwrap(),
                    }
                };
                assert!(imgs.contains(&want), "{name}: {want} missing from {imgs:?}");
            }
        }
    }
}
