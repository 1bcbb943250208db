//! Hot-swap, roll-back, operator controls (safety gate, pin, roll back), deadline accounting,
//! background VL refresh and the stale-input guard of the policy runtime, on a virtual clock (deterministic under any CPU load): the test drives the
//! control loop tick by tick while the real hot-swap and refresh threads run.
//!
//! Expected actions are hand-computed: the fake checkpoints output `gain * mean(sensor ch 0) +
//! offset` (or camera 0's mean red / 255) for every action value.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::runtime::*;
use vla_finetune::runtime::*;

const MS: Duration = Duration::from_millis(1);
const CAMS: [&str; 2] = ["wrist", "top"];

struct Rig {
    clock: Arc<ManualClock>,
    core: ControlCore,
    handle: RuntimeHandle,
    sched: TickScheduler,
    knobs: Arc<Knobs>,
    root: tempfile::TempDir,
    sensor: [f32; 3],
    red: u8,
    feed_sensor: bool,
    stamp: i64,
}

impl Rig {
    fn new(stale: StaleBehavior) -> Rig {
        Self::with(stale, true)
    }

    fn with(stale: StaleBehavior, start_enabled: bool) -> Rig {
        let clock = Arc::new(ManualClock::new());
        let knobs = Arc::new(Knobs::default());
        knobs.act_cost_us.store(2000, Ordering::SeqCst);
        let loader = Arc::new(FakeLoader { knobs: knobs.clone(), manual: Some(clock.clone()) });
        let cfg = RuntimeConfig {
            inputs: InputConfig {
                cameras: CAMS.iter().map(|c| CameraInput { name: c.to_string(), max_age: 500 * MS }).collect(),
                sensor: SensorInput { name: "oct".into(), channels: 3, window: 8, max_age: 100 * MS },
                state: Some(StateInput { name: "pose".into(), dim: 2, max_age: 500 * MS }),
                instruction: "insert the needle".into(),
            },
            control: ControlConfig {
                period: 50 * MS,
                tick_budget: 50 * MS,
                vl_refresh_ticks: 4,
                stale_behavior: stale,
                start_enabled,
            },
            horizon: 4,
            action_dim: 3,
            base_model_id: Some("tiny-qwen2.5-vl@sha256:feed".into()),
            watch: None,
        };
        let (core, handle) = build(cfg, loader, clock.clone()).unwrap();
        let sched = core.scheduler();
        let mut rig = Rig {
            clock,
            core,
            handle,
            sched,
            knobs,
            root: tempfile::tempdir().unwrap(),
            sensor: [0.5, 0.0, 0.0],
            red: 51,
            feed_sensor: true,
            stamp: 0,
        };
        rig.feed();
        rig
    }

    fn config(&self, version: &str) -> FakeConfig {
        base_config(version, &CAMS, 3, 8, 2)
    }

    /// Pushes fresh inputs: both frames, a full sensor window of the current values, the state.
    fn feed(&mut self) {
        let inputs = &self.handle.inputs;
        for c in CAMS {
            inputs.push_frame(c, solid(4, 4, [self.red, 10, 20]), self.stamp).unwrap();
        }
        if self.feed_sensor {
            let values: Vec<f32> = (0..8).flat_map(|_| self.sensor).collect();
            let stamps: Vec<i64> = (0..8).map(|i| self.stamp + i).collect();
            inputs.push_sensor(&values, &stamps).unwrap();
        }
        inputs.push_state(vec![1.0, -1.0], self.stamp).unwrap();
        self.stamp += 100;
    }

    /// One control tick on schedule; returns what it published.
    fn step(&mut self) -> Vec<ActionEvent> {
        self.feed();
        self.clock.sleep_until(self.sched.next_start());
        let slot = self.sched.begin(self.clock.now());
        self.core.tick(slot);
        let mut out = Vec::new();
        while let Ok(e) = self.handle.events.try_recv() {
            out.push(e);
        }
        out
    }

    /// Ticks until `cond` holds (the hot-swap thread works in real time meanwhile).
    fn step_until(&mut self, what: &str, cond: impl Fn(&PolicyStatus) -> bool) -> Vec<ActionEvent> {
        let t0 = Instant::now();
        let mut events = Vec::new();
        while !cond(self.core.status()) {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "timed out waiting for {what}; status {:?}",
                self.core.status()
            );
            events.extend(self.step());
            std::thread::sleep(Duration::from_millis(2));
        }
        events
    }

    fn publish(&self, cfg: &FakeConfig, w: &[f32], b: &[f32]) -> std::path::PathBuf {
        write_checkpoint(self.root.path(), cfg, w, b)
    }

    /// Announces a sensor model `gain * mean + offset` as `version`.
    fn announce(&self, version: &str, offset: f32) {
        let c = self.config(version);
        let (w, b) = sensor_model(&c, 1.0, offset);
        let d = self.publish(&c, &w, &b);
        self.handle.announcer.announce(version, &d).unwrap();
    }

    /// Sends an operator command and ticks until the loop has answered it.
    fn command(&mut self, command: OperatorCommand) -> (OperatorReply, Vec<ActionEvent>) {
        let mut answer = self.handle.operator.send(command);
        let mut events = Vec::new();
        loop {
            events.extend(self.step());
            if let Ok(reply) = answer.try_recv() {
                return (reply, events);
            }
        }
    }
}

fn all_values(events: &[ActionEvent], version: &str, value: f32) {
    for e in events {
        assert_eq!(e.chunk.version, version, "tick {}", e.tick);
        assert_eq!((e.chunk.horizon, e.chunk.action_dim), (4, 3));
        assert!(
            e.chunk.values.iter().all(|v| *v == value),
            "tick {}: {:?}, expected all {value}",
            e.tick,
            e.chunk.values
        );
    }
}

#[test]
fn hot_swap_rejects_bad_checkpoints_and_rolls_back_non_finite_actions() {
    let mut rig = Rig::new(StaleBehavior::Nothing);
    // Before any checkpoint: ticks run, nothing is published.
    assert!(rig.step().is_empty());
    assert_eq!(rig.core.status().message, "waiting for a checkpoint");

    let c1 = rig.config("v0001");
    let (w, b) = sensor_model(&c1, 1.0, 100.0);
    let d1 = rig.publish(&c1, &w, &b);
    let announced = rig.clock.now();
    rig.handle.announcer.announce("v0001", &d1).unwrap();
    let ev = rig.step_until("v0001 active", |s| s.active_version == "v0001");
    assert_eq!(ev.len(), 1, "the activation tick acts (features came with the validation)");
    // Hand-computed: 1.0 * mean(0.5) + 100.
    all_values(&ev, "v0001", 100.5);
    let st = rig.core.status().clone();
    let expect_ms = (ev[0].published_at - announced).as_secs_f64() * 1e3;
    assert_eq!(st.hotswap_latency_ms, Some(expect_ms));
    assert!(st.acting && st.previous_version.is_empty() && st.swaps == 1);
    assert!(st.message.contains("activated v0001 (validated on live input)"), "{}", st.message);

    swaps_to_a_good_version(&mut rig);
    rejects_bad_checkpoints(&mut rig);
    rolls_back_non_finite_actions(&mut rig);

    // Through all of it: every tick on time, and one chunk per tick once a model was active.
    let st = rig.core.status().clone();
    assert_eq!(st.missed_ticks, 0);
    assert_eq!((st.swaps, st.rejected), (3, 5));
    rig.handle.shutdown();
}

/// A good new version (after v0001 at 100.5): actions switch between two ticks, the old one is kept.
fn swaps_to_a_good_version(rig: &mut Rig) {
    let c2 = rig.config("v0002");
    let (w, b) = sensor_model(&c2, 1.0, 200.0);
    let d2 = rig.publish(&c2, &w, &b);
    rig.handle.announcer.announce("v0002", &d2).unwrap();
    let mut ev = rig.step_until("v0002 active", |s| s.active_version == "v0002");
    ev.extend(rig.step());
    let first_new = ev.iter().position(|e| e.chunk.version == "v0002").expect("an action from v0002");
    all_values(&ev[..first_new], "v0001", 100.5);
    all_values(&ev[first_new..], "v0002", 200.5);
    assert_eq!(rig.core.status().previous_version, "v0001");
}

/// Five bad versions in turn are rejected, each named with its reason; v0002 keeps acting.
fn rejects_bad_checkpoints(rig: &mut Rig) {
    // Corrupted file (same size, one byte flipped): sha256 mismatch, rejected, v0002 keeps acting.
    let c3 = rig.config("v0003");
    let (w, b) = sensor_model(&c3, 1.0, 300.0);
    let d3 = rig.publish(&c3, &w, &b);
    let wpath = d3.join("weights.safetensors");
    let mut bytes = std::fs::read(&wpath).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x40;
    std::fs::write(&wpath, bytes).unwrap();
    rig.handle.announcer.announce("v0003", &d3).unwrap();
    let ev = rig.step_until("v0003 rejected", |s| s.rejected == 1);
    all_values(&ev, "v0002", 200.5);
    let msg = rig.core.status().message.clone();
    assert!(
        msg.starts_with("rejected v0003") && msg.contains("weights.safetensors") && msg.contains("manifest says"),
        "{msg}"
    );

    // Declared shape the runtime cannot use.
    let mut c4 = rig.config("v0004");
    c4.action_dim = 2;
    let (w, b) = sensor_model(&c4, 1.0, 400.0);
    let d4 = rig.publish(&c4, &w, &b);
    rig.handle.announcer.announce("v0004", &d4).unwrap();
    let ev = rig.step_until("v0004 rejected", |s| s.rejected == 2);
    all_values(&ev, "v0002", 200.5);
    let msg = rig.core.status().message.clone();
    assert!(msg.contains("incompatible action_dim: runtime expects 3, checkpoint has 2"), "{msg}");

    // Config fine, weight tensor of the wrong shape: the load fails naming the tensor.
    let c5 = rig.config("v0005");
    let mut small = c5.clone();
    small.horizon = 3;
    let (w, b) = sensor_model(&small, 1.0, 500.0);
    let d5 = rig.publish(&c5, &w, &b);
    rig.handle.announcer.announce("v0005", &d5).unwrap();
    rig.step_until("v0005 rejected", |s| s.rejected == 3);
    let msg = rig.core.status().message.clone();
    assert!(msg.contains("tensor `weight`") && msg.contains("expected F32 [12, 11]"), "{msg}");

    // Another base model.
    let mut c6 = rig.config("v0006");
    c6.base_model_id = "other-model".into();
    let (w, b) = sensor_model(&c6, 1.0, 600.0);
    let d6 = rig.publish(&c6, &w, &b);
    rig.handle.announcer.announce("v0006", &d6).unwrap();
    rig.step_until("v0006 rejected", |s| s.rejected == 4);
    assert!(rig.core.status().message.contains("incompatible base_model_id"), "{}", rig.core.status().message);

    // NaN output: caught by the validation on live input, never acts.
    let c7 = rig.config("v0007");
    let (w, b) = sensor_model(&c7, 1.0, f32::NAN);
    let d7 = rig.publish(&c7, &w, &b);
    rig.handle.announcer.announce("v0007", &d7).unwrap();
    let ev = rig.step_until("v0007 rejected", |s| s.rejected == 5);
    all_values(&ev, "v0002", 200.5);
    let msg = rig.core.status().message.clone();
    assert!(msg.contains("v0007") && msg.contains("non-finite action value NaN at step 0, dimension 0"), "{msg}");
}

fn rolls_back_non_finite_actions(rig: &mut Rig) {
    // Finite on the validation input, overflows once sensor channel 1 moves: activated, then
    // rolled back to v0002 within the tick where it goes non-finite.
    let c8 = rig.config("v0008");
    let (mut w, b) = sensor_model(&c8, 1.0, 800.0);
    let f = c8.features();
    w[7] = 1e38; // row 0 (step 0, dimension 0), sensor channel 1 (6 VL features + 1)
    let d8 = rig.publish(&c8, &w, &b);
    rig.handle.announcer.announce("v0008", &d8).unwrap();
    rig.step_until("v0008 active", |s| s.active_version == "v0008");
    assert_eq!(f, 6 + 3 + 2);
    all_values(&rig.step(), "v0008", 800.5);
    assert_eq!(rig.core.status().previous_version, "v0002");
    rig.sensor[1] = 10.0;
    let ev = rig.step();
    all_values(&ev, "v0002", 200.5);
    let st = rig.core.status().clone();
    assert_eq!((st.active_version.as_str(), st.previous_version.as_str(), st.rollbacks), ("v0002", "", 1));
    assert!(
        st.message.starts_with("rolled back v0008 -> v0002") && st.message.contains("non-finite action value inf"),
        "{}",
        st.message
    );
    all_values(&rig.step(), "v0002", 200.5);
}

#[test]
fn deadline_accounting_counts_late_and_skipped_ticks() {
    let mut rig = Rig::new(StaleBehavior::Nothing);
    let c1 = rig.config("v0001");
    let (w, b) = sensor_model(&c1, 1.0, 100.0);
    let d1 = rig.publish(&c1, &w, &b);
    rig.handle.announcer.announce("v0001", &d1).unwrap();
    rig.step_until("v0001 active", |s| s.active_version == "v0001");
    for _ in 0..5 {
        assert_eq!(rig.step().len(), 1);
    }
    assert_eq!(rig.core.status().missed_ticks, 0);
    assert_eq!(rig.core.status().last_tick_ms, 2.0);

    // 60 ms of work against a 50 ms budget: late, still published, counted missed.
    rig.knobs.act_cost_us.store(60_000, Ordering::SeqCst);
    let ticks_before = rig.core.status().ticks;
    assert_eq!(rig.step().len(), 1);
    assert_eq!(rig.core.status().missed_ticks, 1);
    assert_eq!(rig.core.status().last_tick_ms, 60.0);
    // Back to 2 ms: the next tick starts 10 ms late but meets its deadline.
    rig.knobs.act_cost_us.store(2000, Ordering::SeqCst);
    assert_eq!(rig.step().len(), 1);
    assert_eq!(rig.core.status().missed_ticks, 1);
    assert_eq!(rig.core.status().ticks, ticks_before + 2);

    // A 170 ms stall: this tick is late and the two whose deadlines pass during it are skipped.
    rig.knobs.act_cost_us.store(170_000, Ordering::SeqCst);
    rig.step();
    rig.knobs.act_cost_us.store(2000, Ordering::SeqCst);
    assert_eq!(rig.step().len(), 1);
    let st = rig.core.status();
    assert_eq!(st.missed_ticks, 1 + 1 + 2);
    assert_eq!(st.ticks, ticks_before + 2 + 1 + 2 + 1);
    rig.handle.shutdown();
}

#[test]
fn vl_refresh_runs_in_the_background_and_the_loop_uses_the_latest_features() {
    let mut rig = Rig::new(StaleBehavior::Nothing);
    let c1 = rig.config("v0001");
    let (w, b) = vision_model(&c1);
    let d1 = rig.publish(&c1, &w, &b);
    rig.handle.announcer.announce("v0001", &d1).unwrap();
    rig.step_until("v0001 active", |s| s.active_version == "v0001");
    let old = (51.0f64 / 255.0) as f32;
    all_values(&rig.step(), "v0001", old);

    // The VL encoder hangs (a slow backbone); the scene changes. The loop keeps acting on time on
    // the features it has.
    rig.knobs.close_gate();
    rig.red = 102;
    for _ in 0..12 {
        let ev = rig.step();
        assert_eq!(ev.len(), 1);
        all_values(&ev, "v0001", old);
    }
    assert_eq!(rig.core.status().missed_ticks, 0);
    let refreshes = rig.core.status().vl_refreshes;

    // The encoder finishes: the new scene reaches the actions.
    rig.knobs.open_gate();
    let new = (102.0f64 / 255.0) as f32;
    let t0 = Instant::now();
    loop {
        let ev = rig.step();
        assert_eq!(ev.len(), 1);
        if ev[0].chunk.values[0] == new {
            all_values(&ev, "v0001", new);
            break;
        }
        all_values(&ev, "v0001", old);
        assert!(t0.elapsed() < Duration::from_secs(60), "features never refreshed");
        std::thread::sleep(Duration::from_millis(2));
    }
    let st = rig.core.status();
    assert!(st.vl_refreshes > refreshes);
    assert_eq!(st.missed_ticks, 0);
    rig.handle.shutdown();
}

#[test]
fn stale_input_guard_publishes_nothing_or_holds_and_clears() {
    for behavior in [StaleBehavior::Nothing, StaleBehavior::Hold] {
        let mut rig = Rig::new(behavior);
        let c1 = rig.config("v0001");
        let (w, b) = sensor_model(&c1, 2.0, 1.0);
        let d1 = rig.publish(&c1, &w, &b);
        rig.handle.announcer.announce("v0001", &d1).unwrap();
        rig.step_until("v0001 active", |s| s.active_version == "v0001");
        let last = rig.step();
        all_values(&last, "v0001", 2.0);

        // The sensor goes silent: its last window (pushed 2 ms after the previous tick) is 98 ms
        // old at the next tick (fresh, max age 100 ms), 148 ms at the one after (stale).
        rig.feed_sensor = false;
        let fresh_last = rig.step();
        all_values(&fresh_last, "v0001", 2.0);
        for _ in 0..3 {
            let ev = rig.step();
            let st = rig.core.status();
            assert!(!st.acting);
            assert_eq!(st.stale_inputs, vec!["oct".to_string()]);
            match behavior {
                StaleBehavior::Nothing => {
                    assert!(ev.is_empty());
                    assert!(
                        st.message.starts_with("stale input: oct (0.") && st.message.ends_with("publishing no action"),
                        "{}",
                        st.message
                    );
                }
                StaleBehavior::Hold => {
                    assert_eq!(ev.len(), 1);
                    assert!(ev[0].held);
                    assert_eq!(ev[0].chunk, fresh_last[0].chunk);
                    assert!(st.message.ends_with("holding the last action"), "{}", st.message);
                }
            }
        }
        // Data resumes: the guard clears and the new reading is acted on (2 * 3 + 1).
        rig.sensor[0] = 3.0;
        rig.feed_sensor = true;
        let ev = rig.step();
        all_values(&ev, "v0001", 7.0);
        assert!(!ev[0].held);
        let st = rig.core.status();
        assert!(st.acting && st.stale_inputs.is_empty());
        assert_eq!(st.missed_ticks, 0);
        rig.handle.shutdown();
    }
}

#[test]
fn operator_gate_pin_and_roll_back() {
    let mut rig = Rig::with(StaleBehavior::Hold, false);
    rig.announce("v0001", 100.0);
    let ev = rig.step_until("v0001 active", |s| s.active_version == "v0001");
    // Disabled from the start: loaded, fresh inputs, yet nothing is published (not even held).
    assert!(ev.is_empty() && rig.step().is_empty());
    let st = rig.core.status().clone();
    assert!(!st.enabled && !st.acting && st.message.starts_with("disabled"), "{st:?}");

    let (reply, _) = rig.command(OperatorCommand::Enable(true));
    assert_eq!(reply.unwrap(), "enabled: publishing actions");
    let ev = rig.step();
    all_values(&ev, "v0001", 100.5);
    assert_eq!(ev.len(), 1);
    rig.announce("v0002", 200.0);
    rig.step_until("v0002 active", |s| s.active_version == "v0002");
    all_values(&rig.step(), "v0002", 200.5);

    // Roll back: v0001 acts again and is pinned; an announced v0003 waits.
    let (reply, _) = rig.command(OperatorCommand::RollBack);
    assert_eq!(reply.unwrap(), "rolled back to v0001 (pinned; v0002 kept as previous)");
    let st = rig.core.status().clone();
    assert_eq!(
        (st.active_version.as_str(), st.previous_version.as_str(), st.pinned_version.as_str()),
        ("v0001", "v0002", "v0001")
    );
    all_values(&rig.step(), "v0001", 100.5);
    rig.announce("v0003", 300.0);
    let ev = rig.step_until("v0003 prepared", |s| s.message.contains("v0003 is ready and waits"));
    all_values(&ev, "v0001", 100.5);
    for _ in 0..3 {
        all_values(&rig.step(), "v0001", 100.5);
    }
    assert_eq!(rig.core.status().active_version, "v0001");

    // A version that is not loaded cannot be pinned; nothing changes.
    let (reply, _) = rig.command(OperatorCommand::Pin(Some("v0099".into())));
    let err = reply.unwrap_err().to_string();
    assert_eq!(err, "operator command `pin v0099`: version `v0099` is not loaded (active `v0001`, previous `v0002`)");
    // Pinning the previous version makes it active.
    let (reply, _) = rig.command(OperatorCommand::Pin(Some("v0002".into())));
    assert!(reply.unwrap().starts_with("pinned v0002 (was previous)"));
    all_values(&rig.step(), "v0002", 200.5);

    // Unpin: the waiting v0003 is activated at once, v0002 kept as previous.
    let (reply, ev) = rig.command(OperatorCommand::Pin(None));
    assert!(reply.unwrap().starts_with("unpinned; activated v0003"), "{:?}", rig.core.status());
    all_values(&ev, "v0003", 300.5);
    all_values(&rig.step(), "v0003", 300.5);
    let st = rig.core.status().clone();
    assert_eq!(
        (st.active_version.as_str(), st.previous_version.as_str(), st.pinned_version.as_str()),
        ("v0003", "v0002", "")
    );

    // Disable: nothing is published, not even the held last action while inputs are stale.
    let (reply, _) = rig.command(OperatorCommand::Enable(false));
    assert!(reply.unwrap().starts_with("disabled"));
    assert!(rig.step().is_empty());
    rig.feed_sensor = false;
    rig.clock.advance(200 * MS);
    for _ in 0..3 {
        assert!(rig.step().is_empty(), "disabled, stale, stale_behavior hold: still nothing");
    }
    // Nothing to roll back to is refused with the reason.
    let mut lone = Rig::with(StaleBehavior::Nothing, true);
    let (reply, _) = lone.command(OperatorCommand::RollBack);
    assert_eq!(
        reply.unwrap_err().to_string(),
        "operator command `roll back`: no previous version to roll back to (active ``, previous ``)"
    );
}
