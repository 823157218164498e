//! Criterion benchmarks of the CPU presets of spec/performance.md (`moco`, `simclr-cpu`,
//! `clip-cpu`): the fused backend (`cpu::evaluate`) and the unfused baseline
//! (`cpu::unfused::evaluate`) on the global rayon pool.
//!
//! Under `cargo bench --bench cpu_presets` it first runs `cpu::bench::run_preset` for each
//! preset (checks against the reference, medians of 10 calls, the sgemm rate of the same run) and
//! prints the rows as JSON on stdout (`CPU_PRESETS_REPEAT` sets the calls, default 10;
//! `CPU_PRESETS_ONLY=moco` runs one preset). `cargo test --all-targets` runs each benchmark once
//! (criterion's test mode) without the table.

use criterion::{criterion_group, BenchmarkId, Criterion};
use fused_infonce::bench::{Preset, CPU_PRESETS};
use fused_infonce::cpu::bench::{run_preset, PresetData};
use fused_infonce::cpu::{self, unfused};
use fused_infonce::Upstream;

fn full_bench_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn selected() -> Vec<Preset> {
    let only = std::env::var("CPU_PRESETS_ONLY").ok();
    CPU_PRESETS
        .iter()
        .filter(|p| only.as_deref().is_none_or(|o| o == p.name))
        .copied()
        .collect()
}

fn table() {
    let repeat = std::env::var("CPU_PRESETS_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let mut rows = Vec::new();
    for p in selected() {
        match run_preset(&p, repeat) {
            Ok(r) => {
                eprintln!(
                    "{}: fused {:.1} ms, unfused {:.1} ms ({:.2}x), {:.0} GFLOP/s = {:.0}% of \
                     sgemm {:.0}",
                    r.preset,
                    r.fused_ms,
                    r.unfused_ms,
                    r.speedup,
                    r.fused_gflops,
                    r.pct_of_sgemm,
                    r.sgemm_gflops
                );
                rows.push(r);
            }
            Err(e) => eprintln!("{}: {e}", p.name),
        }
    }
    match serde_json::to_string_pretty(&rows) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("cannot print the table: {e}"),
    }
}

fn cpu_presets(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu");
    group.sample_size(10);
    for p in selected() {
        let Ok(spec) = p.spec() else { continue };
        let data = PresetData::random(&p, 0);
        let Ok(inputs) = data.inputs() else { continue };
        group.bench_with_input(BenchmarkId::new("fused", p.name), &inputs, |b, i| {
            b.iter(|| cpu::evaluate(&spec, i, &Upstream::One).expect("fused evaluates"))
        });
        group.bench_with_input(BenchmarkId::new("unfused", p.name), &inputs, |b, i| {
            b.iter(|| unfused::evaluate(&spec, i, &Upstream::One).expect("unfused evaluates"))
        });
    }
    group.finish();
}

criterion_group!(benches, cpu_presets);

fn main() {
    if full_bench_run() {
        table();
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
