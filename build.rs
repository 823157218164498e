//! Compiles every `kernels/*.cu` with nvcc into one fatbin per file and embeds them.
//!
//! - nvcc is found through `NVCC`, then `CUDA_HOME`/`CUDA_PATH`, then `PATH`, then `/usr/local/cuda`.
//! - Targets: machine code for sm_80, sm_86, sm_89 and sm_90 plus compute_80 PTX for newer cards;
//!   `FUSED_INFONCE_CUDA_ARCHS` overrides the list (e.g. `sm_90,compute_90`; `sm_90a` works too).
//! - `-O3 -lineinfo`, all warnings as errors, and the ptxas resource report (registers, spills,
//!   shared memory per kernel) saved to `OUT_DIR/ptxas-report.txt` (`infonce info --verbose`).
//! - Without nvcc the crate builds without kernels (GPU calls then return
//!   `Error::KernelsNotBuilt`) and one `cargo:warning` says how to get nvcc;
//!   `FUSED_INFONCE_REQUIRE_NVCC=1` turns that, and any failed compile, into a build error.
//!   `DOCS_RS` skips compilation.
//!
//! The generated `OUT_DIR/kernels.rs` holds the embedded modules and what they were built with.
//!
//! Compiled fatbins are cached under `<target dir>/kernel-cache/`, keyed by a hash of the nvcc
//! version, the flags and every file in `kernels/`: `cargo clippy`, `cargo build` and
//! `cargo test` (different profiles, different `OUT_DIR`s) then compile each kernel once.
//! `FUSED_INFONCE_NO_KERNEL_CACHE=1` turns the cache off.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_ARCHS: &str = "sm_80,sm_86,sm_89,sm_90,compute_80";

const ENV_VARS: &[&str] = &[
    "NVCC",
    "CUDA_HOME",
    "CUDA_PATH",
    "PATH",
    "FUSED_INFONCE_CUDA_ARCHS",
    "FUSED_INFONCE_REQUIRE_NVCC",
    "DOCS_RS",
    "FUSED_INFONCE_NO_KERNEL_CACHE",
];

struct Built {
    name: String,
    fatbin: PathBuf,
}

fn main() {
    for v in ENV_VARS {
        println!("cargo:rerun-if-env-changed={v}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");

    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let require = env::var("FUSED_INFONCE_REQUIRE_NVCC").is_ok_and(|v| v == "1" || v == "true");
    let kernels_dir =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it")).join("kernels");

    let mut sources: Vec<PathBuf> = fs::read_dir(&kernels_dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    sources.sort();
    for p in &sources {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let cu: Vec<PathBuf> = sources
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .cloned()
        .collect();

    let archs = env::var("FUSED_INFONCE_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.to_string());
    let archs: Vec<String> = archs
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();

    if env::var("DOCS_RS").is_ok() {
        write_generated(&out, &[], &archs, "not built (DOCS_RS)", "");
        return;
    }

    let Some(nvcc) = find_nvcc() else {
        let msg = "nvcc not found (looked at NVCC, CUDA_HOME/CUDA_PATH, PATH, /usr/local/cuda): \
                   building without CUDA kernels. Run `scripts/install-nvcc` (pinned nvcc 13.0 from \
                   PyPI) and put the directory it prints on PATH, or set NVCC=/path/to/nvcc";
        if require {
            fail(&format!("FUSED_INFONCE_REQUIRE_NVCC=1 but {msg}"));
        }
        println!("cargo:warning={msg}");
        write_generated(&out, &[], &archs, "not built (no nvcc)", "");
        return;
    };

    let version = Command::new(&nvcc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| {
            s.lines()
                .rev()
                .find(|l| l.contains("release"))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "unknown".to_string());

    let gencode = match gencode_flags(&archs) {
        Ok(g) => g,
        Err(e) => fail(&format!("FUSED_INFONCE_CUDA_ARCHS: {e}")),
    };

    let cache = kernel_cache(&out, &sources, &version, &gencode);

    // Compile every file in parallel, each on its own thread (nvcc itself is single-threaded per
    // target here; `--threads` parallelises the targets within one file).
    let results: Vec<Result<(Built, String), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = cu
            .iter()
            .map(|src| {
                let (nvcc, out, gencode, inc) = (&nvcc, &out, &gencode, &kernels_dir);
                let cache = cache.as_deref();
                s.spawn(move || compile_cached(nvcc, src, out, gencode, inc, cache))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("compile thread panicked".into()))
            })
            .collect()
    });

    let mut built = Vec::new();
    let mut report = String::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok((b, log)) => {
                let _ = writeln!(report, "==== {} ====\n{log}", b.name);
                built.push(b);
            }
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        let all = errors.join("\n");
        if require {
            fail(&format!("kernel compilation failed:\n{all}"));
        }
        for line in all.lines().take(40) {
            println!("cargo:warning={line}");
        }
        println!("cargo:warning=kernel compilation failed: building without CUDA kernels");
        write_generated(&out, &[], &archs, &format!("failed ({version})"), &report);
        return;
    }
    built.sort_by(|a, b| a.name.cmp(&b.name));
    write_generated(&out, &built, &archs, &version, &report);
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}

/// `-gencode` flags for `sm_XY` (machine code) and `compute_XY` (PTX) entries.
fn gencode_flags(archs: &[String]) -> Result<Vec<String>, String> {
    if archs.is_empty() {
        return Err("empty architecture list".into());
    }
    let mut flags = Vec::new();
    for a in archs {
        if let Some(n) = a.strip_prefix("sm_") {
            let virt = n.trim_end_matches(['a', 'f']);
            if virt.is_empty() || !virt.chars().all(|c| c.is_ascii_digit()) {
                return Err(format!("`{a}` is not sm_NN"));
            }
            flags.push(format!("-gencode=arch=compute_{n},code=sm_{n}"));
        } else if let Some(n) = a.strip_prefix("compute_") {
            if n.is_empty()
                || !n
                    .trim_end_matches(['a', 'f'])
                    .chars()
                    .all(|c| c.is_ascii_digit())
            {
                return Err(format!("`{a}` is not compute_NN"));
            }
            flags.push(format!("-gencode=arch=compute_{n},code=compute_{n}"));
        } else {
            return Err(format!("`{a}`: expected sm_NN or compute_NN"));
        }
    }
    Ok(flags)
}

/// `<target dir>/kernel-cache/<key>`: the key hashes (FNV-1a) the nvcc version, the flags and the
/// name and contents of every file in kernels/ (headers included). `None` when turned off.
fn kernel_cache(
    out: &Path,
    sources: &[PathBuf],
    version: &str,
    gencode: &[String],
) -> Option<PathBuf> {
    if env::var("FUSED_INFONCE_NO_KERNEL_CACHE").is_ok_and(|v| v == "1" || v == "true") {
        return None;
    }
    // OUT_DIR is <target>/[<triple>/]<profile>/build/<pkg>-<hash>/out.
    let target = out.ancestors().nth(4)?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes.iter().chain(&[0xffu8]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(version.as_bytes());
    eat(format!("{:?}", COMMON_FLAGS).as_bytes());
    for g in gencode {
        eat(g.as_bytes());
    }
    for p in sources {
        eat(p.file_name()?.to_string_lossy().as_bytes());
        eat(&fs::read(p).ok()?);
    }
    Some(target.join("kernel-cache").join(format!("{h:016x}")))
}

/// [`compile`] through the cache: a hit copies the cached fatbin and ptxas log; a miss compiles
/// and stores them (written under a temporary name, then renamed, so concurrent builds are safe).
fn compile_cached(
    nvcc: &Path,
    src: &Path,
    out: &Path,
    gencode: &[String],
    include: &Path,
    cache: Option<&Path>,
) -> Result<(Built, String), String> {
    let Some(dir) = cache else {
        return compile(nvcc, src, out, gencode, include);
    };
    let name = src
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| format!("bad kernel file name {}", src.display()))?
        .to_string();
    let (cached_bin, cached_log) = (
        dir.join(format!("{name}.fatbin")),
        dir.join(format!("{name}.log")),
    );
    let fatbin = out.join(format!("{name}.fatbin"));
    if let (Ok(log), true) = (fs::read_to_string(&cached_log), cached_bin.is_file()) {
        if fs::copy(&cached_bin, &fatbin).is_ok() {
            return Ok((Built { name, fatbin }, log));
        }
    }
    let (built, log) = compile(nvcc, src, out, gencode, include)?;
    if fs::create_dir_all(dir).is_ok() {
        let tag = std::process::id();
        let (tb, tl) = (
            dir.join(format!("{name}.fatbin.{tag}")),
            dir.join(format!("{name}.log.{tag}")),
        );
        // The log goes in last: a cache entry counts only when both files are there.
        if fs::copy(&built.fatbin, &tb).is_ok()
            && fs::rename(&tb, &cached_bin).is_ok()
            && fs::write(&tl, &log).is_ok()
        {
            let _ = fs::rename(&tl, &cached_log);
        }
    }
    Ok((built, log))
}

/// The nvcc flags every kernel is compiled with (besides `-gencode`, `-I` and `-o`).
const COMMON_FLAGS: &[&str] = &[
    "-fatbin",
    "-O3",
    "-lineinfo",
    "-std=c++17",
    "-Werror",
    "all-warnings",
    "-Xptxas",
    "-v,-warn-spills,-warn-lmem-usage",
    "--threads",
    "0",
];

fn compile(
    nvcc: &Path,
    src: &Path,
    out: &Path,
    gencode: &[String],
    include: &Path,
) -> Result<(Built, String), String> {
    let name = src
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| format!("bad kernel file name {}", src.display()))?
        .to_string();
    let fatbin = out.join(format!("{name}.fatbin"));
    let output = Command::new(nvcc)
        .args(COMMON_FLAGS)
        .arg("-I")
        .arg(include)
        .args(gencode)
        .arg("-o")
        .arg(&fatbin)
        .arg(src)
        .output()
        .map_err(|e| format!("{}: could not run {}: {e}", src.display(), nvcc.display()))?;
    let log = String::from_utf8_lossy(&output.stderr).to_string()
        + &String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!("{}: nvcc failed:\n{log}", src.display()));
    }
    // Spills are errors too: every kernel must fit in registers.
    if let Some(line) = log.lines().find(|l| {
        (l.contains("bytes spill stores") && !l.contains(" 0 bytes spill stores"))
            || (l.contains("spill loads") && !l.contains(" 0 bytes spill loads"))
    }) {
        return Err(format!("{}: register spills: {line}\n{log}", src.display()));
    }
    Ok((Built { name, fatbin }, log))
}

fn find_nvcc() -> Option<PathBuf> {
    let exe = if cfg!(windows) { "nvcc.exe" } else { "nvcc" };
    let usable = |p: PathBuf| -> Option<PathBuf> {
        if p.is_file() {
            Some(p)
        } else {
            None
        }
    };
    if let Some(p) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        if let Some(p) = usable(p.clone()) {
            return Some(p);
        }
        println!(
            "cargo:warning=NVCC={} is not a file; looking elsewhere",
            p.display()
        );
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var).filter(|v| !v.is_empty()) {
            if let Some(p) = usable(PathBuf::from(home).join("bin").join(exe)) {
                return Some(p);
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            if let Some(p) = usable(dir.join(exe)) {
                return Some(p);
            }
        }
    }
    usable(PathBuf::from("/usr/local/cuda/bin").join(exe))
}

fn write_generated(out: &Path, built: &[Built], archs: &[String], nvcc: &str, report: &str) {
    fs::write(out.join("ptxas-report.txt"), report).expect("write ptxas report");
    let mut s = String::new();
    s.push_str("// Generated by build.rs.\n");
    let _ = writeln!(s, "/// nvcc's version line, or why no kernels were built.");
    let _ = writeln!(s, "pub const NVCC_VERSION: &str = {nvcc:?};");
    let _ = writeln!(s, "/// The architectures the kernels were compiled for.");
    let _ = writeln!(s, "pub const TARGET_ARCHS: &[&str] = &{archs:?};");
    let _ = writeln!(s, "/// The ptxas resource report of the kernel build.");
    let _ = writeln!(
        s,
        "pub const PTXAS_REPORT: &str = include_str!(concat!(env!(\"OUT_DIR\"), \"/ptxas-report.txt\"));"
    );
    let _ = writeln!(s, "/// The embedded modules: (file stem, fatbin).");
    s.push_str("pub static MODULES: &[(&str, &[u8])] = &[\n");
    for b in built {
        let _ = writeln!(
            s,
            "    ({:?}, include_bytes!({:?})),",
            b.name,
            b.fatbin.display().to_string()
        );
    }
    s.push_str("];\n");
    fs::write(out.join("kernels.rs"), s).expect("write kernels.rs");
}
