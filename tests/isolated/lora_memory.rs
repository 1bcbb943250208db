//! Peak memory probes: host RSS high-water mark against a known allocation, and the
//! accelerator allocator statistics (`None` without an accelerator; on a CUDA machine checked
//! against a known device allocation).

use crate::support::serial;
use tch::{Device, Kind, Tensor};
use vla_finetune::memory::{
    accelerator_capacity, accelerator_memory, host_memory, max_memory_allocated, peaks,
    release_cached_accelerator_memory, reset_host_peak, reset_peak_memory_stats, reset_peaks,
};

const MB: u64 = 1 << 20;

#[test]
fn host_peak_follows_a_known_allocation_and_resets() {
    let _serial = serial();
    let _ = reset_host_peak().unwrap();
    let before = host_memory().unwrap();
    assert!(before.rss > 0 && before.peak_rss >= before.rss);
    {
        // 256 MiB written through, so every page is resident.
        let t = Tensor::ones([64 * MB as i64], (Kind::Float, Device::Cpu));
        assert_eq!(f64::try_from(t.sum(Kind::Double)).unwrap(), (64 * MB) as f64);
        let during = host_memory().unwrap();
        assert!(during.rss >= before.rss + 250 * MB, "rss {} -> {}", before.rss, during.rss);
    }
    let after = host_memory().unwrap();
    assert!(
        after.peak_rss >= before.rss + 250 * MB,
        "peak {} after a 256 MiB tensor (rss before {})",
        after.peak_rss,
        before.rss
    );
    if reset_host_peak().unwrap() {
        let reset = host_memory().unwrap();
        assert!(
            reset.peak_rss + 200 * MB < after.peak_rss,
            "peak after reset {} vs {}",
            reset.peak_rss,
            after.peak_rss
        );
    }
    assert!(peaks(0).unwrap().host_peak > 0);
}

#[test]
fn accelerator_statistics_are_none_without_cuda_and_exact_with_it() {
    let _serial = serial();
    if !tch::Cuda::is_available() {
        assert_eq!(accelerator_memory(0).unwrap(), None);
        assert_eq!(max_memory_allocated(0).unwrap(), None);
        assert!(!reset_peak_memory_stats(0).unwrap());
        assert!(!release_cached_accelerator_memory().unwrap());
        assert_eq!(peaks(0).unwrap().accelerator_peak, None);
        reset_peaks(0).unwrap();
        return;
    }
    assert_eq!(accelerator_memory(usize::MAX).unwrap(), None, "no such device");
    let cuda = Device::Cuda(0);
    tch::Cuda::synchronize(0);
    assert!(reset_peak_memory_stats(0).unwrap());
    let base = accelerator_memory(0).unwrap().unwrap();
    assert_eq!(base.peak_allocated, base.allocated, "peak right after reset");
    {
        let t = Tensor::ones([16 * MB as i64], (Kind::Float, cuda)); // 64 MiB
        tch::Cuda::synchronize(0);
        let during = accelerator_memory(0).unwrap().unwrap();
        assert!(during.allocated >= base.allocated + 64 * MB);
        assert!(during.reserved >= during.allocated);
        drop(t);
    }
    let after = accelerator_memory(0).unwrap().unwrap();
    assert!(after.peak_allocated >= base.allocated + 64 * MB);
    assert!(after.allocated < base.allocated + 64 * MB);
    assert!(after.reserved >= after.allocated + 64 * MB, "the freed block stays cached: {after:?}");
    assert!(release_cached_accelerator_memory().unwrap());
    let released = accelerator_memory(0).unwrap().unwrap();
    assert!(released.reserved + 64 * MB <= after.reserved, "empty_cache returns it: {after:?} -> {released:?}");
    assert!(reset_peak_memory_stats(0).unwrap());
    assert!(max_memory_allocated(0).unwrap().unwrap() < base.allocated + 64 * MB);
}

#[test]
fn accelerator_capacity_is_none_without_cuda_and_sees_an_allocation_with_it() {
    let _serial = serial();
    if !tch::Cuda::is_available() {
        assert_eq!(accelerator_capacity(0).unwrap(), None);
        return;
    }
    assert_eq!(accelerator_capacity(usize::MAX).unwrap(), None, "no such device");
    let before = accelerator_capacity(0).unwrap().unwrap();
    assert!(before.free <= before.total && before.total >= 1 << 30, "{before:?}");
    let t = Tensor::ones([64 * MB as i64], (Kind::Float, Device::Cuda(0))); // 256 MiB, more than any cached block
    tch::Cuda::synchronize(0);
    let during = accelerator_capacity(0).unwrap().unwrap();
    assert_eq!(during.total, before.total);
    assert!(during.free + 250 * MB <= before.free, "free {} -> {} with 256 MiB allocated", before.free, during.free);
    drop(t);
}
