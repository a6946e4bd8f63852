//! Parse time of the shared traces (the 35 MB blk trace has a 1 s target), beside the time to
//! just gunzip and split the same text into lines (the floor), measured in the same run.

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};

/// The shared traces: `../shared` beside the checkout, as on the developers' and CI machines.
const TRACES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/traces/linux-6.12-virtio"
);

fn parse(c: &mut Criterion) {
    let path = Path::new(TRACES).join("blk.trace.gz");
    let Ok(text) = replay::trace::read_bytes(&path) else {
        eprintln!("{} not readable: no replay bench", path.display());
        return;
    };
    let mut g = c.benchmark_group("blk_trace");
    g.sample_size(10);
    g.bench_function("split_lines_floor", |b| {
        b.iter(|| {
            text.split(|&c| c == b'\n')
                .filter(|l| !l.is_empty())
                .count()
        })
    });
    g.bench_function("parse_and_pair_35MB", |b| {
        b.iter(|| replay::trace::parse_text("blk", &text, &[]).map(|r| r.2))
    });
    g.bench_function("gunzip_parse_pair_encode", |b| {
        b.iter(|| {
            let t = replay::load(&path, &replay::LoadOptions::default());
            t.map(|t| replay::encode(&t.pairing, &[]).bytes.len())
        })
    });
    g.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
