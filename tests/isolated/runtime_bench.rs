//! Benchmark of the policy runtime's own overhead with the fake linear model (not run by default):
//! `cargo test --release --test runtime_bench -- --ignored --nocapture`
//! Prints control-tick latency (VL refresh in the background, i.e. excluded), the cost of a tick
//! that computes VL features inline (included), and hot-swap latency (announcement -> first action
//! of the new version) at 20 Hz with 2 cameras 640x360 and a 650 x 1026 sensor window.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::runtime::*;
use crate::support::serial;
use vla_finetune::runtime::*;

const MS: Duration = Duration::from_millis(1);
const CAMS: [&str; 2] = ["wrist", "top"];

fn stats(name: &str, mut v: Vec<f64>) {
    v.sort_by(f64::total_cmp);
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    println!("{name}: n={} p50={:.3} ms p99={:.3} ms max={:.3} ms", v.len(), p(0.5), p(0.99), p(1.0));
}

#[test]
#[ignore]
fn bench_runtime() {
    let _serial = serial();
    let root = tempfile::tempdir().unwrap();
    let knobs = Arc::new(Knobs::default());
    let loader = Arc::new(FakeLoader { knobs, manual: None });
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let (mut core, mut handle) = build(bench_config(), loader.clone(), clock.clone()).unwrap();
    let mut stamp = 0i64;
    for _ in 0..20 {
        feed(&handle, &mut stamp);
    }
    let mut sched = core.scheduler();
    let mut tick = |core: &mut ControlCore, h: &RuntimeHandle, stamp: &mut i64| {
        feed(h, stamp);
        clock.sleep_until(sched.next_start());
        let slot = sched.begin(clock.now());
        let t = Instant::now();
        core.tick(slot);
        t.elapsed().as_secs_f64() * 1e3
    };
    let mut swaps = Vec::new();
    let mut ticks = Vec::new();
    for k in 1..=6u32 {
        let c = base_config(&format!("v{k:04}"), &CAMS, 1026, 650, 6);
        let c = FakeConfig { horizon: 8, action_dim: 7, ..c };
        let (w, b) = sensor_model(&c, 1.0, k as f32);
        let dir = write_checkpoint(root.path(), &c, &w, &b);
        handle.announcer.announce(c.version.clone(), dir).unwrap();
        loop {
            ticks.push(tick(&mut core, &handle, &mut stamp));
            while handle.events.try_recv().is_ok() {}
            if core.status().active_version == c.version && core.status().acting {
                break;
            }
        }
        swaps.push(core.status().hotswap_latency_ms.unwrap());
        for _ in 0..40 {
            ticks.push(tick(&mut core, &handle, &mut stamp));
        }
    }
    let st = core.status().clone();
    println!("missed ticks: {} of {}", st.missed_ticks, st.ticks);
    stats("control tick (VL refresh in background)", ticks);
    // Inline VL: what a tick costs when it also computes the VL features itself.
    let dir = root.path().join("v0006");
    let inline = inline_vl_ms(&loader, &dir, &handle, &mut stamp);
    stats("snapshot + VL features + head step inline (VL refresh included)", inline);
    stats("hot-swap (announcement -> first action of the new version)", swaps);
    handle.shutdown();
}

/// The benchmarked runtime: 2 cameras, a 650 x 1026 sensor window, a 6-d state, 20 Hz ticks.
fn bench_config() -> RuntimeConfig {
    RuntimeConfig {
        inputs: InputConfig {
            cameras: CAMS.iter().map(|c| CameraInput { name: c.to_string(), max_age: 1000 * MS }).collect(),
            sensor: SensorInput { name: "oct".into(), channels: 1026, window: 650, max_age: 1000 * MS },
            state: Some(StateInput { name: "pose".into(), dim: 6, max_age: 1000 * MS }),
            instruction: "insert the needle".into(),
        },
        control: ControlConfig {
            period: 50 * MS,
            tick_budget: 50 * MS,
            vl_refresh_ticks: 4,
            stale_behavior: StaleBehavior::Nothing,
            start_enabled: true,
        },
        horizon: 8,
        action_dim: 7,
        base_model_id: None,
        watch: None,
    }
}

/// Pushes a frame per camera, 33 sensor samples and a state at `stamp`, then advances it by 33.
fn feed(h: &RuntimeHandle, stamp: &mut i64) {
    for c in CAMS {
        h.inputs.push_frame(c, solid(640, 360, [90, 60, 30]), *stamp).unwrap();
    }
    let values = vec![0.25f32; 33 * 1026];
    let stamps: Vec<i64> = (0..33).map(|i| *stamp + i).collect();
    h.inputs.push_sensor(&values, &stamps).unwrap();
    h.inputs.push_state(vec![0.0; 6], *stamp).unwrap();
    *stamp += 33;
}

/// Milliseconds of 100 fed ticks that snapshot, compute VL features and step the head of `dir` inline.
fn inline_vl_ms(loader: &FakeLoader, dir: &Path, handle: &RuntimeHandle, stamp: &mut i64) -> Vec<f64> {
    let meta = loader.verify(dir).unwrap();
    let mut m = loader.load(dir, &meta).unwrap();
    let mut inline = Vec::new();
    for _ in 0..100 {
        feed(handle, stamp);
        let t = Instant::now();
        let Snapshot::Fresh(obs) = handle.inputs.snapshot() else { panic!("stale") };
        let f = m.encoder.features(&obs).unwrap();
        m.model.act_with(&f, &obs).unwrap();
        inline.push(t.elapsed().as_secs_f64() * 1e3);
    }
    inline
}
