//! `act()` latency at the reference sizes, batch 1, 5 / 10 / 20 DDIM steps (benchmark, not a
//! test: run explicitly, results go to docs/benchmarks.md):
//!
//! `cargo test --test policy_bench -- --ignored --nocapture`
//!
//! `VLA_BENCH_DEVICE` picks the device (`auto`, `cpu`, `cuda`); `VLA_BENCH_THREADS` the libtorch
//! intra-op threads (default: libtorch's choice).

use std::time::{Duration, Instant};

use crate::support::serial;
use tch::{Kind, Tensor};
use vla_finetune::policy::{CondInput, NormStats, PolicyConfig, PolicyHeads, VlInput};

fn stats(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mean = v.iter().map(|d| ms(*d)).sum::<f64>() / v.len() as f64;
    (ms(v[v.len() / 2]), mean, ms(v[v.len() * 9 / 10]))
}

#[test]
#[ignore = "benchmark"]
fn act_latency_reference_sizes() {
    let _serial = serial();
    let device =
        vla_finetune::device::parse(&std::env::var("VLA_BENCH_DEVICE").unwrap_or_else(|_| "auto".into())).unwrap();
    if let Some(n) = std::env::var("VLA_BENCH_THREADS").ok().and_then(|s| s.parse().ok()) {
        tch::set_num_threads(n);
    }
    let cfg = PolicyConfig::default();
    let heads = PolicyHeads::new(cfg, NormStats::identity(1026, 0, 7), device).unwrap();
    let vl = VlInput::pooled(Tensor::randn([1, 2048], (Kind::Float, device)));
    let sensor = Tensor::randn([1, 650, 1026], (Kind::Float, device));
    let c = CondInput { vl: &vl, sensor: &sensor, state: None };
    let sync = || {
        if let tch::Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let time = |f: &dyn Fn()| {
        for _ in 0..2 {
            f();
        }
        sync();
        let v: Vec<Duration> = (0..10)
            .map(|_| {
                let t = Instant::now();
                f();
                sync();
                t.elapsed()
            })
            .collect();
        stats(v)
    };
    println!("{}; intra-op threads {}", vla_finetune::device::describe(device), tch::get_num_threads());
    println!("| part | median ms | mean ms | p90 ms |\n|---|---|---|---|");
    let (m, a, p) = time(&|| {
        let _g = tch::no_grad_guard();
        let _ = heads.condition(&c, false).unwrap().sum(Kind::Float).double_value(&[]);
    });
    println!("| sensor encoder + fusion | {m:.1} | {a:.1} | {p:.1} |");
    for steps in [5usize, 10, 20] {
        let (m, a, p) = time(&|| {
            let _ = heads.sample(&c, steps, 0).unwrap().sum(Kind::Float).double_value(&[]);
        });
        println!("| act(), {steps} DDIM steps | {m:.1} | {a:.1} | {p:.1} |");
    }
}
