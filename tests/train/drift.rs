//! Drift numbers against hand-computed values and the refresh decision.

use tch::Tensor;
use vla_finetune::train::drift::{
    feature_drift, DriftError, DriftMetric, DriftStats, RefreshDecision, RefreshPolicy, RefreshReason,
};

#[test]
fn drift_hand_values() {
    // Sample 0: cached (3, 4), fresh (3, 4) -> 0 drift.
    // Sample 1: cached (1, 0), fresh (0, 1) -> rel L2 sqrt(2), cosine distance 1.
    // Sample 2: cached (2, 0), fresh (-2, 0) -> rel L2 2, cosine distance 2.
    let cached = Tensor::from_slice(&[3.0f32, 4.0, 1.0, 0.0, 2.0, 0.0]).view([3, 2]);
    let fresh = Tensor::from_slice(&[3.0f32, 4.0, 0.0, 1.0, -2.0, 0.0]).view([3, 2]);
    let d = feature_drift(&fresh, &cached).unwrap();
    let expect_mean = (0.0 + 2f64.sqrt() + 2.0) / 3.0;
    assert!((d.rel_l2_mean - expect_mean).abs() < 1e-12, "{d:?}");
    assert!((d.rel_l2_max - 2.0).abs() < 1e-12);
    assert!((d.cosine_distance_mean - 1.0).abs() < 1e-12);
    assert_eq!(d.samples, 3);
    // Scaling both by the same factor keeps both relative measures.
    let d2 = feature_drift(&(&fresh * 10.0), &(&cached * 10.0)).unwrap();
    assert!((d2.rel_l2_mean - expect_mean).abs() < 1e-9);
}

#[test]
fn drift_bad_inputs() {
    let a = Tensor::zeros([2, 3], (tch::Kind::Float, tch::Device::Cpu));
    let b = Tensor::zeros([3, 3], (tch::Kind::Float, tch::Device::Cpu));
    assert!(matches!(feature_drift(&a, &b), Err(DriftError::Shape { .. })));
    let nan = Tensor::from_slice(&[f32::NAN, 1.0, 1.0]).view([1, 3]);
    let ok = Tensor::ones([1, 3], (tch::Kind::Float, tch::Device::Cpu));
    let err = feature_drift(&ok, &nan).unwrap_err();
    assert!(matches!(err, DriftError::NonFinite { which: "cached" }), "{err}");
}

#[test]
fn refresh_policy() {
    let stats = |v: f64| DriftStats { rel_l2_mean: v, rel_l2_max: 2.0 * v, cosine_distance_mean: v / 10.0, samples: 8 };
    let every5 = RefreshPolicy { interval_epochs: Some(5), drift_threshold: None, metric: DriftMetric::RelL2Mean };
    assert_eq!(every5.decide(4, Some(&stats(9.0))), RefreshDecision::UseCache);
    assert_eq!(every5.decide(5, None), RefreshDecision::Refresh(RefreshReason::Interval { cached_epochs: 5 }));

    let adaptive =
        RefreshPolicy { interval_epochs: Some(10), drift_threshold: Some(0.05), metric: DriftMetric::RelL2Max };
    assert_eq!(adaptive.decide(1, Some(&stats(0.02))), RefreshDecision::UseCache); // max 0.04
    assert_eq!(
        adaptive.decide(1, Some(&stats(0.03))),
        RefreshDecision::Refresh(RefreshReason::Drift { value: 0.06, threshold: 0.05 })
    );
    assert_eq!(adaptive.decide(2, None), RefreshDecision::UseCache);
    let cosine =
        RefreshPolicy { interval_epochs: None, drift_threshold: Some(0.05), metric: DriftMetric::CosineDistance };
    assert_eq!(cosine.decide(100, Some(&stats(0.4))), RefreshDecision::UseCache);
    assert!(matches!(cosine.decide(0, Some(&stats(0.6))), RefreshDecision::Refresh(RefreshReason::Drift { .. })));
}
