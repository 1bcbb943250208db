//! Feature cache: key sensitivity, disk + RAM layers, pinned eviction, corrupt files.

use std::fs;

use serde_json::json;
use tch::{Device, Kind, Tensor};
use vla_finetune::train::cache::{cache_key, CacheConfig, CacheKey, FeatureCache, KeyInput};

fn key(adapter: &str, processor: &serde_json::Value, prompt: &str, images: &[&[u8]]) -> CacheKey {
    cache_key(&KeyInput {
        kind: "features",
        base_model: "sha256:base",
        dtype: "bf16",
        adapter,
        processor,
        prompt,
        images,
    })
}

fn feat(seed: i64, n: i64) -> Vec<(String, Tensor)> {
    let t = Tensor::arange(n, (Kind::Float, Device::Cpu)) + seed as f64;
    vec![("feature".to_string(), t), ("mask".to_string(), Tensor::ones([3], (Kind::Int64, Device::Cpu)))]
}

fn same(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((na, ta), (nb, tb))| {
            na == nb && ta.size() == tb.size() && ta.eq_tensor(tb).all().int64_value(&[]) == 1
        })
}

#[test]
fn every_input_changes_the_key() {
    let proc = json!({"min_pixels": 3136, "max_pixels": 50176, "patch": 14});
    let img1: &[u8] = b"\x89PNG image one";
    let img2: &[u8] = b"\x89PNG image two";
    let base = key("v3", &proc, "In: insert the needle", &[img1, img2]);
    assert_eq!(base, key("v3", &proc, "In: insert the needle", &[img1, img2]), "deterministic");
    // Key order inside the processor settings does not matter.
    let reordered: serde_json::Value =
        serde_json::from_str(r#"{"patch": 14, "max_pixels": 50176, "min_pixels": 3136}"#).unwrap();
    assert_eq!(base, key("v3", &reordered, "In: insert the needle", &[img1, img2]));
    let changed = [
        key("v4", &proc, "In: insert the needle", &[img1, img2]),
        key(
            "v3",
            &json!({"min_pixels": 3136, "max_pixels": 65536, "patch": 14}),
            "In: insert the needle",
            &[img1, img2],
        ),
        key("v3", &proc, "In: retract the needle", &[img1, img2]),
        key("v3", &proc, "In: insert the needle", &[img2, img1]),
        key("v3", &proc, "In: insert the needle", &[img1]),
        key("v3", &proc, "In: insert the needle", &[img1, b"\x89PNG image twO"]),
        // Field boundaries are unambiguous.
        key("v3", &proc, "In: insert the needle", &[b"\x89PNG image onex", b"\x89PNG image two"]),
        cache_key(&KeyInput {
            kind: "vision",
            base_model: "sha256:base",
            dtype: "bf16",
            adapter: "v3",
            processor: &proc,
            prompt: "In: insert the needle",
            images: &[img1, img2],
        }),
        cache_key(&KeyInput {
            kind: "features",
            base_model: "sha256:other",
            dtype: "bf16",
            adapter: "v3",
            processor: &proc,
            prompt: "In: insert the needle",
            images: &[img1, img2],
        }),
        cache_key(&KeyInput {
            kind: "features",
            base_model: "sha256:base",
            dtype: "f32",
            adapter: "v3",
            processor: &proc,
            prompt: "In: insert the needle",
            images: &[img1, img2],
        }),
    ];
    for (i, k) in changed.iter().enumerate() {
        assert_ne!(*k, base, "variant {i} must miss");
    }
    assert_ne!(key("v3", &proc, "ab", &[b"c"]), key("v3", &proc, "a", &[b"bc"]));
    assert_eq!(CacheKey::from_hex(&base.hex()), Some(base));
}

#[test]
fn disk_and_ram_layers_and_stale_miss() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = CacheConfig { ram_budget_bytes: 1 << 20, disk_budget_bytes: None };
    let proc = json!({"max_pixels": 50176});
    let k_old = key("v1", &proc, "p", &[b"img"]);
    let k_new = key("v2", &proc, "p", &[b"img"]);
    let mut c = FeatureCache::open(dir.path(), cfg).unwrap();
    assert!(c.get(&k_old).is_none());
    c.put(k_old, &feat(1, 16)).unwrap();
    assert!(same(&c.get(&k_old).unwrap(), &feat(1, 16)));
    assert!(c.get(&k_new).is_none(), "a new adapter must not see the old adapter's features");
    let s = c.stats();
    assert_eq!((s.ram_hits, s.disk_hits, s.misses, s.entries), (1, 0, 2, 1));
    assert!(s.disk_bytes > 64 && s.ram_bytes == 16 * 4 + 3 * 8);
    assert!((s.hit_rate() - 1.0 / 3.0).abs() < 1e-12);
    drop(c);

    // Reopened: the entry is found on disk, then served from RAM.
    let mut c = FeatureCache::open(dir.path(), cfg).unwrap();
    assert_eq!(c.stats().entries, 1);
    assert!(same(&c.get(&k_old).unwrap(), &feat(1, 16)));
    assert!(same(&c.get(&k_old).unwrap(), &feat(1, 16)));
    let s = c.stats();
    assert_eq!((s.disk_hits, s.ram_hits), (1, 1));
    // The stored file is ordinary safetensors carrying its key.
    let loaded = vla_finetune::train::tensor_io::read_safetensors(&c.entry_path(&k_old)).unwrap();
    assert_eq!(loaded.metadata["cache_key"], k_old.hex());
}

#[test]
fn ram_budget_keeps_disk_copy() {
    let dir = tempfile::tempdir().unwrap();
    // Each entry holds 100 f32 + 3 i64 = 424 bytes; RAM fits two.
    let mut c = FeatureCache::open(dir.path(), CacheConfig { ram_budget_bytes: 900, disk_budget_bytes: None }).unwrap();
    let keys: Vec<CacheKey> = (0..4).map(|i| key("v1", &json!({}), "p", &[&[i as u8]])).collect();
    for (i, k) in keys.iter().enumerate() {
        c.put(*k, &feat(i as i64, 100)).unwrap();
    }
    assert!(c.stats().ram_bytes <= 900);
    assert_eq!(c.stats().entries, 4);
    assert!(same(&c.get(&keys[0]).unwrap(), &feat(0, 100)));
    assert_eq!(c.stats().disk_hits, 1, "the oldest entry left RAM but not the disk");
}

#[test]
fn eviction_never_removes_pinned_entries() {
    let dir = tempfile::tempdir().unwrap();
    let mut probe =
        FeatureCache::open(dir.path().join("probe"), CacheConfig { ram_budget_bytes: 0, disk_budget_bytes: None })
            .unwrap();
    probe.put(key("x", &json!({}), "", &[]), &feat(0, 100)).unwrap();
    let entry = probe.stats().disk_bytes;

    let cfg = CacheConfig { ram_budget_bytes: 0, disk_budget_bytes: Some(3 * entry) };
    let mut c = FeatureCache::open(dir.path().join("c"), cfg).unwrap();
    let keys: Vec<CacheKey> = (0..6).map(|i| key("v1", &json!({}), "p", &[&[i as u8]])).collect();
    c.pin(keys[0]);
    c.pin(keys[1]);
    for (i, k) in keys.iter().enumerate() {
        c.put(*k, &feat(i as i64, 100)).unwrap();
    }
    // Budget 3: pinned 0 and 1 stay; of the unpinned, only the most recent (5) fits.
    let present: Vec<bool> = keys.iter().map(|k| c.contains(k)).collect();
    assert_eq!(present, [true, true, false, false, false, true]);
    assert_eq!(c.stats().evictions, 3);
    assert!(c.stats().disk_bytes <= 3 * entry);

    // Everything pinned: the cache goes over budget rather than drop a needed entry.
    c.pin(keys[5]);
    for k in &keys[2..5] {
        c.pin(*k);
        c.put(*k, &feat(9, 100)).unwrap();
    }
    assert!(keys.iter().all(|k| c.contains(k)));
    assert_eq!(c.stats().entries, 6);
    // A job's rebuild removes the unpinned entries it owns, never unowned ones (0, 1: vision
    // embeddings are shared) nor another job's, whose owner is read back from the files.
    let (job_a, job_b) = ("features@/runs/a/state", "features@/runs/b/state");
    for k in &keys[2..5] {
        c.put_owned(*k, &feat(9, 100), job_a).unwrap();
    }
    let other = key("v1", &json!({}), "p", &[b"another job's sample"]);
    c.pin(other); // (the disk budget would evict it before the rebuild otherwise)
    c.put_owned(other, &feat(1, 100), job_b).unwrap();
    c.put_owned(keys[5], &feat(5, 100), job_a).unwrap();
    c.unpin_all();
    c.pin(keys[5]);
    assert_eq!(c.remove_unpinned_owned_by(job_a).unwrap(), 3);
    let present: Vec<bool> = keys.iter().map(|k| c.contains(k)).collect();
    assert_eq!(present, [true, true, false, false, false, true]);
    assert!(c.contains(&other));
    let mut reopened = FeatureCache::open(dir.path().join("c"), cfg).unwrap();
    assert_eq!(reopened.remove_unpinned_owned_by(job_b).unwrap(), 1);
    assert_eq!(reopened.remove_unpinned_owned_by(job_a).unwrap(), 1, "keys[5] is not pinned in this instance");
    assert_eq!(reopened.stats().entries, 2);
}

#[test]
fn corrupt_or_foreign_files_are_misses() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = CacheConfig { ram_budget_bytes: 1 << 20, disk_budget_bytes: None };
    let (ka, kb, kc) =
        (key("v1", &json!({}), "a", &[]), key("v1", &json!({}), "b", &[]), key("v1", &json!({}), "c", &[]));
    {
        let mut c = FeatureCache::open(dir.path(), cfg).unwrap();
        c.put(ka, &feat(1, 50)).unwrap();
        c.put(kb, &feat(2, 50)).unwrap();
    }
    let probe = FeatureCache::open(dir.path(), cfg).unwrap();
    let (pa, pb, pc) = (probe.entry_path(&ka), probe.entry_path(&kb), probe.entry_path(&kc));
    drop(probe);
    // Truncate A; put A's (valid) file where C's would be; leave a temp leftover.
    let bytes = fs::read(&pa).unwrap();
    fs::write(&pa, &bytes[..bytes.len() / 2]).unwrap();
    fs::create_dir_all(pc.parent().unwrap()).unwrap();
    fs::copy(&pb, &pc).unwrap();
    let leftover = pb.with_file_name(".x.safetensors.tmp");
    fs::write(&leftover, b"partial").unwrap();

    let mut c = FeatureCache::open(dir.path(), cfg).unwrap();
    assert!(!leftover.exists());
    assert!(c.get(&ka).is_none(), "truncated file");
    assert!(c.get(&kc).is_none(), "file holding another key");
    assert!(same(&c.get(&kb).unwrap(), &feat(2, 50)));
    let s = c.stats();
    assert_eq!((s.corrupt, s.misses, s.disk_hits, s.entries), (2, 2, 1, 1));
    assert!(!pa.exists() && !pc.exists(), "bad files are removed");
    // And the slot can be filled again.
    c.put(ka, &feat(1, 50)).unwrap();
    assert!(same(&c.get(&ka).unwrap(), &feat(1, 50)));
}
