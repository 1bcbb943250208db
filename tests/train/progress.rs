//! Progress events: throttle, hub, JSON-lines log, bar rendering, ETA and host memory.

use std::time::{Duration, Instant};

use indicatif::ProgressDrawTarget;
use vla_finetune::train::progress::{
    eta_seconds, host_memory_bytes, peak_host_memory_bytes, render_message, spawn_sink, BarRenderer, JsonlLog, Phase,
    ProgressEvent, ProgressHub, Throttle,
};

fn ev(phase: Phase, step: u64) -> ProgressEvent {
    let mut e = ProgressEvent::new("job-7", phase);
    e.step = step;
    e.total_steps = 100;
    e.epoch = 1;
    e.total_epochs = 4;
    e
}

#[test]
fn throttle_limits_rate_but_passes_phase_changes_ends_and_compile_reports() {
    let t0 = Instant::now();
    let ms = |m| t0 + Duration::from_millis(m);
    let mut th = Throttle::new(2.0);
    let seq = [
        (0, Phase::Training, true),    // first
        (100, Phase::Training, false), // 0.1 s later: over 2 Hz
        (499, Phase::Training, false),
        (500, Phase::Training, true),   // 0.5 s after the last passed one
        (510, Phase::Validating, true), // phase change
        (520, Phase::Validating, false),
        (530, Phase::Training, true),  // phase change back
        (540, Phase::Done, true),      // terminal
        (545, Phase::Done, true),      // terminal events always pass
        (550, Phase::Compiling, true), // the compile reports always pass
        (560, Phase::Compiling, true),
    ];
    for (i, (t, phase, expected)) in seq.into_iter().enumerate() {
        assert_eq!(th.admit(&ev(phase, i as u64), ms(t)), expected, "event {i} at {t} ms ({phase:?})");
    }
    let mut all = Throttle::new(0.0);
    assert!(all.admit(&ev(Phase::Training, 0), t0) && all.admit(&ev(Phase::Training, 1), t0));
}

#[test]
fn hub_fans_out_in_order_and_keeps_latest() {
    let hub = ProgressHub::new(16);
    let mut a = hub.subscribe();
    let mut b = hub.subscribe();
    let w = hub.watch();
    assert!(hub.latest().is_none());
    for s in 0..3 {
        hub.publish(ev(Phase::Training, s));
    }
    for rx in [&mut a, &mut b] {
        let steps: Vec<u64> = (0..3).map(|_| rx.try_recv().unwrap().step).collect();
        assert_eq!(steps, [0, 1, 2]);
        assert!(rx.try_recv().is_err());
    }
    assert_eq!(hub.latest().unwrap().step, 2);
    assert_eq!(w.borrow().as_ref().unwrap().step, 2);
    // A slow subscriber loses the oldest events, and is told.
    let small = ProgressHub::new(2);
    let mut slow = small.subscribe();
    for s in 0..5 {
        small.publish(ev(Phase::Training, s));
    }
    assert!(matches!(slow.try_recv(), Err(tokio::sync::broadcast::error::TryRecvError::Lagged(3))));
    assert_eq!(slow.try_recv().unwrap().step, 3);
}

#[test]
fn jsonl_log_round_trips_one_event_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("logs/progress.jsonl");
    let mut log = JsonlLog::open(&path).unwrap();
    let mut e1 = ev(Phase::Training, 5);
    e1.loss = Some(0.25);
    e1.cache.mode = "features".into();
    e1.cache.drift = Some(0.01);
    let e2 = ev(Phase::Done, 100);
    log.append(&e1).unwrap();
    log.append(&e2).unwrap();
    drop(log);
    let mut log = JsonlLog::open(&path).unwrap(); // reopening appends
    log.append(&e2).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3);
    let back: ProgressEvent = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(back, e1);
    let raw: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(raw["phase"], "done");
    assert_eq!(raw["job_id"], "job-7");
    assert!(raw["loss"].is_null());
}

#[test]
fn bar_shows_steps_phase_and_numbers() {
    let r = BarRenderer::with_target(ProgressDrawTarget::hidden());
    let mut e = ev(Phase::RefreshingCache, 42);
    e.loss = Some(0.123456);
    e.lr = Some(1e-4);
    e.samples_per_s = Some(12.34);
    e.cache.mode = "features".into();
    e.cache.hit_rate = 0.5;
    e.cache.drift = Some(0.0312);
    e.eta_s = Some(3725.0);
    r.update(&e);
    assert_eq!(r.bar().position(), 42);
    assert_eq!(r.bar().length(), Some(100));
    assert_eq!(r.bar().prefix(), "refreshing_cache");
    assert_eq!(
        r.bar().message(),
        "epoch 2/4 | loss 0.1235 | lr 1.00e-4 | 12.3 samples/s | cache features hit 50% drift 0.031 | eta 1h02m"
    );
    assert!(!r.bar().is_finished());
    r.update(&ev(Phase::Done, 100));
    assert!(r.bar().is_finished());
    assert_eq!(render_message(&ev(Phase::Training, 0)), "epoch 2/4");
}

#[test]
fn eta_and_memory() {
    assert_eq!(eta_seconds(0, 10, Duration::from_secs(5)), None);
    assert_eq!(eta_seconds(4, 10, Duration::from_secs(8)), Some(12.0));
    assert_eq!(eta_seconds(10, 10, Duration::from_secs(8)), Some(0.0));
    // Current first: the peak read after it can only be as large or larger.
    let now = host_memory_bytes().unwrap();
    let peak = peak_host_memory_bytes().expect("Linux /proc");
    assert!(peak >= now && now > 1 << 20, "peak {peak} now {now}");
}

#[test]
fn sink_logs_every_event_of_the_job_until_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("progress.jsonl");
    let hub = ProgressHub::new(64);
    let bar = BarRenderer::with_target(ProgressDrawTarget::hidden());
    let sink = spawn_sink(
        hub.subscribe(),
        "job-7".into(),
        Some(JsonlLog::open(&path).unwrap()),
        Some((bar, Throttle::new(2.0))),
    );
    for s in 1..=5 {
        hub.publish(ev(Phase::Training, s));
    }
    let mut other = ev(Phase::Training, 99);
    other.job_id = "job-8".into();
    hub.publish(other);
    hub.publish(ev(Phase::Done, 5));
    hub.publish(ev(Phase::Training, 6)); // after the end: not consumed
    assert_eq!(sink.join().unwrap().unwrap(), 6);
    let steps: Vec<u64> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<ProgressEvent>(l).unwrap().step)
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 5]);
}
