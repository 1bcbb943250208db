//! The policy runtime in real time at 20 Hz with sensor-sized inputs (650 samples x 1026
//! channels, two cameras): checkpoints are published into a watched folder the way the trainer
//! publishes them (`<root>/<version>/` + `latest`) while the loop runs. The deadline budget is
//! generous (500 ms after each tick's start) so a loaded CI machine cannot fail it by scheduling
//! jitter; exact deadline accounting is tested on a virtual clock in tests/runtime/hotswap.rs.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::runtime::*;
use crate::support::serial;
use vla_finetune::runtime::*;

const MS: Duration = Duration::from_millis(1);
const CAMS: [&str; 2] = ["wrist", "top"];
const CH: usize = 1026;
const WINDOW: usize = 650;

fn wait_for(
    handle: &mut RuntimeHandle,
    events: &mut Vec<ActionEvent>,
    what: &str,
    cond: impl Fn(&PolicyStatus) -> bool,
) {
    let t0 = Instant::now();
    loop {
        while let Ok(e) = handle.events.try_recv() {
            events.push(e);
        }
        if cond(&handle.status.borrow()) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}; status {:?}",
            *handle.status.borrow()
        );
        std::thread::sleep(10 * MS);
    }
}

/// 20 Hz, a 500 ms tick budget, inputs of the real sizes, `root` watched for checkpoints.
fn realtime_config(root: &Path) -> RuntimeConfig {
    RuntimeConfig {
        inputs: InputConfig {
            cameras: CAMS.iter().map(|c| CameraInput { name: c.to_string(), max_age: 2000 * MS }).collect(),
            sensor: SensorInput { name: "oct".into(), channels: CH, window: WINDOW, max_age: 2000 * MS },
            state: Some(StateInput { name: "pose".into(), dim: 6, max_age: 2000 * MS }),
            instruction: "insert the needle".into(),
        },
        control: ControlConfig {
            period: 50 * MS,
            tick_budget: 500 * MS,
            vl_refresh_ticks: 4,
            stale_behavior: StaleBehavior::Nothing,
            start_enabled: true,
        },
        horizon: 4,
        action_dim: 3,
        base_model_id: None,
        watch: Some(WatchConfig { root: root.to_path_buf(), poll: 20 * MS }),
    }
}

/// Feeds inputs at their real rates until `stop`: sensor 650 Hz in 13-sample messages (every
/// 20 ms), cameras and pose every 50 ms.
fn spawn_feeder(inputs: Arc<InputBuffers>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut sample = vec![0.0f32; CH];
        sample[0] = 0.25;
        let mut n: i64 = 0;
        let mut k = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let values: Vec<f32> = (0..13).flat_map(|_| sample.iter().copied()).collect();
            let stamps: Vec<i64> = (0..13).map(|i| (n + i) * 1_538_462).collect();
            inputs.push_sensor(&values, &stamps).unwrap();
            n += 13;
            if k % 2 == 0 {
                for c in CAMS {
                    inputs.push_frame(c, solid(64, 48, [90, 60, 30]), n * 1_538_462).unwrap();
                }
                inputs.push_state(vec![0.0; 6], n * 1_538_462).unwrap();
            }
            k += 1;
            std::thread::sleep(20 * MS);
        }
    })
}

#[test]
fn twenty_hz_loop_hot_swaps_from_a_watched_folder_without_missing_ticks() {
    let _serial = serial();
    let root = tempfile::tempdir().unwrap();
    let knobs = Arc::new(Knobs::default());
    // A VL pass slower than two control periods: the loop must not wait for it.
    knobs.vl_sleep_ms.store(120, Ordering::SeqCst);
    let loader = Arc::new(FakeLoader { knobs: knobs.clone(), manual: None });
    let cfg = realtime_config(root.path());
    let mut handle = start(cfg, loader, Arc::new(SystemClock::new())).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let feeder = spawn_feeder(handle.inputs.clone(), stop.clone());

    let mut events = Vec::new();
    let config = |v: &str| base_config(v, &CAMS, CH, WINDOW, 6);
    let publish = |cfg: &FakeConfig, offset: f32| {
        let (w, b) = sensor_model(cfg, 1.0, offset);
        write_checkpoint(root.path(), cfg, &w, &b);
    };

    publish(&config("v0001"), 100.0);
    set_latest(root.path(), "v0001");
    wait_for(&mut handle, &mut events, "v0001 acting", |s| s.active_version == "v0001" && s.acting);

    publish(&config("v0002"), 200.0);
    set_latest(root.path(), "v0002");
    wait_for(&mut handle, &mut events, "v0002 acting", |s| s.active_version == "v0002" && s.acting);
    let latency = handle.status.borrow().hotswap_latency_ms;
    assert!(latency.is_some_and(|ms| ms > 0.0), "{latency:?}");

    // Corrupted: one byte of config.json replaced after the manifest was written.
    let c3 = config("v0003");
    publish(&c3, 300.0);
    let p = root.path().join("v0003/config.json");
    let text = std::fs::read_to_string(&p).unwrap().replacen("0.1", "0.2", 1);
    std::fs::write(&p, text).unwrap();
    set_latest(root.path(), "v0003");
    wait_for(&mut handle, &mut events, "v0003 rejected", |s| s.rejected == 1);

    // Shape-incompatible: another sensor window length.
    let mut c4 = config("v0004");
    c4.sensor_window = 65;
    publish(&c4, 400.0);
    set_latest(root.path(), "v0004");
    wait_for(&mut handle, &mut events, "v0004 rejected", |s| s.rejected == 2);
    assert!(handle
        .status
        .borrow()
        .message
        .contains("incompatible sensor_window: runtime expects 650, checkpoint has 65"));

    // Let the loop run on v0002 for a while (VL refreshes happen meanwhile).
    let until = Instant::now() + Duration::from_millis(600);
    wait_for(&mut handle, &mut events, "0.6 s more", |_| Instant::now() > until);

    stop.store(true, Ordering::Relaxed);
    feeder.join().unwrap();
    let status = handle.status.borrow().clone();
    handle.shutdown();

    assert_eq!(status.missed_ticks, 0, "{status:?}");
    assert_eq!(status.active_version, "v0002");
    assert_eq!(status.previous_version, "v0001");
    assert!(status.vl_refreshes >= 2, "{status:?}");
    // Actions switch once, from v0001 to v0002, with the hand-computed values.
    let first_v2 = events.iter().position(|e| e.chunk.version == "v0002").unwrap();
    assert!(first_v2 > 0);
    for (i, e) in events.iter().enumerate() {
        let (v, value) = if i < first_v2 { ("v0001", 100.25) } else { ("v0002", 200.25) };
        assert_eq!(e.chunk.version, v, "event {i}");
        assert!(e.chunk.values.iter().all(|x| *x == value), "event {i}: {:?}", e.chunk.values);
        assert!(!e.held);
    }
    // One chunk per tick while acting, ticks in order.
    assert!(events.windows(2).all(|w| w[1].tick == w[0].tick + 1), "a tick without an action");
}
