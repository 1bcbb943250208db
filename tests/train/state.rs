//! Exact resume: a run saved at step k and resumed into fresh objects ends bitwise equal to the
//! uninterrupted run (dropout noise included, via per-step derived seeds).

use std::path::Path;

use crate::support::rng_lock;
use tch::{Device, Kind, Tensor};
use vla_finetune::train::optim::{Accumulation, AdamW, AdamWConfig, CosineSchedule, GroupConfig, NamedParam};
use vla_finetune::train::state::{
    derive_seed, epoch_order, load_state, read_state_meta, save_state, seed_torch, Counters, RunState,
};

const SEED: u64 = 1234;

const N: usize = 38; // not a multiple of the effective batch: the last step of an epoch is short
const EPOCHS: u64 = 3;

struct Toy {
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    opt: AdamW,
}

fn toy() -> Toy {
    tch::manual_seed(99);
    let o = (Kind::Float, Device::Cpu);
    let w1 = (Tensor::randn([6, 3], o) * 0.5).set_requires_grad(true);
    let b1 = Tensor::zeros([6], o).set_requires_grad(true);
    let w2 = (Tensor::randn([1, 6], o) * 0.5).set_requires_grad(true);
    let params = vec![
        NamedParam {
            name: "enc.weight".into(),
            group: "sensor_encoder".into(),
            tensor: w1.shallow_clone(),
            decay: true,
        },
        NamedParam { name: "enc.bias".into(), group: "sensor_encoder".into(), tensor: b1.shallow_clone(), decay: true },
        NamedParam { name: "head.weight".into(), group: "heads".into(), tensor: w2.shallow_clone(), decay: true },
    ];
    let groups = vec![
        GroupConfig { name: "sensor_encoder".into(), lr: 3e-2, weight_decay: 0.01 },
        GroupConfig { name: "heads".into(), lr: 5e-2, weight_decay: 0.01 },
    ];
    Toy { w1, b1, w2, opt: AdamW::new(AdamWConfig::default(), groups, params).unwrap() }
}

fn data() -> (Tensor, Tensor) {
    tch::manual_seed(5);
    let x = Tensor::randn([N as i64, 3], (Kind::Float, Device::Cpu));
    let y = x.sum_dim_intlist(1, true, Kind::Float).sin();
    (x, y)
}

/// Trains from `run.counters` until `stop_at` optimizer steps (or the end), saving to `save` there.
fn train(t: &mut Toy, run: &mut RunState, stop_at: Option<(u64, &Path)>) {
    let (x, y) = data();
    let plan = run.accumulation;
    let eff = plan.effective_batch();
    let steps_per_epoch = N.div_ceil(eff) as u64;
    while run.counters.epoch < EPOCHS {
        let order = epoch_order(run.run_seed, run.counters.epoch, N);
        while run.counters.step_in_epoch < steps_per_epoch {
            let s = run.counters.step_in_epoch as usize;
            let batch = &order[s * eff..((s + 1) * eff).min(N)];
            t.opt.zero_grad();
            for (mi, mb) in plan.micro_batches(batch.len()).into_iter().enumerate() {
                seed_torch(run.run_seed, run.counters.global_step, mi as u64);
                let idx = Tensor::from_slice(&batch[mb.range.clone()].iter().map(|&i| i as i64).collect::<Vec<_>>());
                let h = (x.index_select(0, &idx).matmul(&t.w1.tr()) + &t.b1).relu().dropout(0.3, true);
                let loss = (h.matmul(&t.w2.tr()) - y.index_select(0, &idx)).square().mean(Kind::Float) * mb.loss_scale;
                loss.backward();
            }
            t.opt.clip_grad_norm(1.0).unwrap();
            t.opt.step(run.schedule.factor(run.counters.global_step)).unwrap();
            run.counters.global_step += 1;
            run.counters.step_in_epoch += 1;
            run.counters.samples_seen += batch.len() as u64;
            if let Some((k, path)) = stop_at {
                if run.counters.global_step == k {
                    save_state(path, &t.opt, run).unwrap();
                    return;
                }
            }
        }
        run.counters.epoch += 1;
        run.counters.step_in_epoch = 0;
    }
}

fn fresh_run() -> RunState {
    RunState {
        run_seed: SEED,
        counters: Counters::default(),
        schedule: CosineSchedule { warmup_steps: 3, total_steps: 30, min_lr_ratio: 0.1 },
        accumulation: Accumulation::new(2, 3).unwrap(),
        world_size: 1,
        cache_state: serde_json::json!({"mode": "features", "adapter_version": 2, "epochs_since_refresh": 1}),
        extra: serde_json::json!({"best_val": 0.5}),
    }
}

fn bits_equal(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.eq_tensor(b).all().int64_value(&[]) == 1
}

#[test]
fn resume_mid_epoch_is_bitwise_identical() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.safetensors");

    let mut a = toy();
    let mut run_a = fresh_run();
    train(&mut a, &mut run_a, None);
    assert_eq!(run_a.counters.global_step, 21); // 3 epochs x ceil(38 / 6)

    let mut b = toy();
    let mut run_b = fresh_run();
    train(&mut b, &mut run_b, Some((10, &path))); // mid epoch 1 (7 steps per epoch)
    drop(b);

    let meta = read_state_meta(&path).unwrap();
    assert_eq!(meta.counters, Counters { epoch: 1, step_in_epoch: 3, global_step: 10, samples_seen: 38 + 18 });
    assert_eq!(meta.cache_state["adapter_version"], 2);
    assert_eq!(meta.adamw_steps["head.weight"], 10);

    tch::manual_seed(4242); // resume must not depend on the generator's state
    let mut c = toy(); // fresh, differently-initialized-in-principle objects
    let meta = load_state(&path, &mut c.opt).unwrap();
    let mut run_c = RunState::from(meta);
    train(&mut c, &mut run_c, None);
    assert_eq!(run_c.counters, run_a.counters);
    for (p, q) in [(&a.w1, &c.w1), (&a.b1, &c.b1), (&a.w2, &c.w2)] {
        assert!(bits_equal(p, q), "max diff {}", (p - q).abs().max().double_value(&[]));
    }
    // And the run really used randomness: another seed gives other weights.
    let mut d = toy();
    let mut run_d = RunState { run_seed: SEED + 1, ..fresh_run() };
    train(&mut d, &mut run_d, None);
    assert!(!bits_equal(&a.w1, &d.w1));
}

#[test]
fn bad_state_files_are_named_errors() {
    let _rng = rng_lock();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.safetensors");
    let mut t = toy();
    let mut run = fresh_run();
    train(&mut t, &mut run, Some((2, &path)));

    // Truncated file.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let err = load_state(&cut, &mut toy().opt).err().unwrap().to_string();
    assert!(err.contains("cut.safetensors"), "{err}");

    // A state of another model (one parameter missing).
    let mut other = toy();
    let params = vec![NamedParam {
        name: "enc.weight".into(),
        group: "g".into(),
        tensor: other.w1.shallow_clone(),
        decay: true,
    }];
    let g = vec![GroupConfig { name: "g".into(), lr: 1e-3, weight_decay: 0.0 }];
    let small = AdamW::new(AdamWConfig::default(), g, params).unwrap();
    let small_path = dir.path().join("small.safetensors");
    save_state(&small_path, &small, &run).unwrap();
    let err = load_state(&small_path, &mut other.opt).err().unwrap().to_string();
    assert!(err.contains("enc.bias") && err.contains("missing"), "{err}");
    // The reverse: the file holds a parameter the optimizer lacks.
    let mut one = toy();
    let params =
        vec![NamedParam { name: "enc.weight".into(), group: "g".into(), tensor: one.w1.shallow_clone(), decay: true }];
    let g = vec![GroupConfig { name: "g".into(), lr: 1e-3, weight_decay: 0.0 }];
    one.opt = AdamW::new(AdamWConfig::default(), g, params).unwrap();
    let err = load_state(&path, &mut one.opt).err().unwrap().to_string();
    assert!(err.contains("belongs to no parameter"), "{err}");
    // No temporary file is left beside the state.
    let names: Vec<_> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
}

#[test]
fn seeds_and_orders_are_pure_functions() {
    let o1 = epoch_order(7, 3, 100);
    assert_eq!(o1, epoch_order(7, 3, 100));
    assert_ne!(o1, epoch_order(7, 4, 100));
    assert_ne!(o1, epoch_order(8, 3, 100));
    let mut sorted = o1.clone();
    sorted.sort();
    assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    assert_ne!(derive_seed(1, &[1, 2]), derive_seed(1, &[2, 1]));
    assert_eq!(derive_seed(1, &[1, 2]), derive_seed(1, &[1, 2]));
}
