//! Micro-benchmarks of the hot paths: manifest building, hashing,
//! signatures, diffs (matching and rewritten content), delta application and
//! the receiver's apply-and-commit of small files.
//!
//! `cargo bench -p warmspare-shared` (add `-- --quick` for a short run).

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use serde_bytes::ByteBuf;
use warmspare_shared::apply::{Applier, WatchRoot};
use warmspare_shared::delta;
use warmspare_shared::manifest::{self, ContentHash, Excludes, HashCache, Meta};
use warmspare_shared::proto::Op;

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

const BIG: usize = 16 << 20;

fn hashing(c: &mut Criterion) {
    let data = noise(BIG, 1);
    let mut g = c.benchmark_group("hash");
    g.throughput(Throughput::Bytes(BIG as u64));
    g.bench_function("blake3 16 MiB", |b| b.iter(|| ContentHash::of(black_box(&data))));
    g.finish();
}

fn deltas(c: &mut Criterion) {
    let base = noise(BIG, 2);
    let mut edited = base.clone();
    for i in 0..100 {
        let at = i * (BIG / 100) + 17;
        edited[at..at + 1600].copy_from_slice(&noise(1600, i as u64 + 10));
    }
    let rewritten = noise(BIG, 3);
    let block = delta::block_len(BIG as u64);
    let sig = delta::signature(&base, block);
    let mut patch = Vec::new();
    delta::diff(&sig, &edited, &mut patch).unwrap();

    let mut g = c.benchmark_group("delta");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(BIG as u64));
    g.bench_function("signature 16 MiB", |b| {
        b.iter(|| delta::signature(black_box(&base), block))
    });
    g.bench_function("diff 16 MiB, 1% changed", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(patch.len() + 1024);
            delta::diff(&sig, black_box(&edited), &mut out).unwrap();
            out
        })
    });
    g.bench_function("worth_diffing 16 MiB, rewritten", |b| {
        b.iter(|| delta::worth_diffing(&sig, black_box(&rewritten)).unwrap())
    });
    g.bench_function("apply 16 MiB, 1% changed", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(BIG);
            delta::apply(&base, black_box(&patch), &mut out, BIG).unwrap();
            out
        })
    });
    g.finish();
}

/// A CA-like tree of `n` certificate-sized files.
fn ca_tree(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..n {
        let d = dir.path().join(format!("signed/{:02}", i % 50));
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(format!("{i:06}.pem")), noise(2048, i as u64)).unwrap();
    }
    dir
}

fn manifests(c: &mut Criterion) {
    let tree = ca_tree(5_000);
    let excludes = Excludes::new(&[]).unwrap();
    let mut g = c.benchmark_group("manifest");
    g.sample_size(10);
    g.throughput(Throughput::Elements(5_000));
    g.bench_function("scan 5,000 files, cold cache", |b| {
        b.iter(|| {
            let mut cache = HashCache::default();
            manifest::scan(tree.path(), "", &excludes, &mut cache)
        })
    });
    let mut warm = HashCache::default();
    manifest::scan(tree.path(), "", &excludes, &mut warm);
    g.bench_function("scan 5,000 files, warm cache", |b| {
        b.iter(|| manifest::scan(tree.path(), "", &excludes, &mut warm))
    });
    g.finish();
}

fn applying(c: &mut Criterion) {
    let files: Vec<(String, Vec<u8>)> = (0..1_000)
        .map(|i| (format!("d{:02}/{i:05}.pem", i % 20), noise(2048, i)))
        .collect();
    let mut g = c.benchmark_group("apply");
    g.sample_size(10);
    g.throughput(Throughput::Elements(files.len() as u64));
    g.bench_function("1,000 new 2 KiB files, one commit", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().unwrap();
                let watch = WatchRoot {
                    name: "ca".into(),
                    root: dir.path().join("ca"),
                    excludes: Excludes::new(&[]).unwrap(),
                    cache: HashCache::default(),
                    cache_path: None,
                };
                (dir, Applier::new(vec![watch], None).unwrap())
            },
            |(dir, mut applier)| {
                for (path, data) in &files {
                    let meta = Meta {
                        mode: 0o644,
                        mtime: 1_700_000_000,
                        ..Meta::default()
                    };
                    applier
                        .apply(Op::FileBegin {
                            watch: "ca".into(),
                            path: path.clone(),
                            meta,
                            size: data.len() as u64,
                            hash: ContentHash::of(data),
                            delta_base: None,
                        })
                        .unwrap();
                    applier.apply(Op::FileData(ByteBuf::from(data.clone()))).unwrap();
                    applier.apply(Op::FileEnd).unwrap();
                }
                let report = applier.commit().expect("commit");
                assert!(report.failed.is_empty());
                drop(dir);
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, hashing, deltas, manifests, applying);
criterion_main!(benches);
