//! Checkpoint publication: atomic versions, `latest`, manifest verification, crash safety.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use vla_finetune::checkpoint::publish::{
    rfc3339, verify, PublishError, PublishItem, PublishRequest, Publisher, Source, LATEST_NAME, MANIFEST_NAME,
};

fn request(root: &Path, tag: &str) -> PublishRequest {
    let adapter = root.join(format!("src-adapter-{tag}"));
    fs::create_dir_all(adapter.join("nested")).unwrap();
    fs::write(adapter.join("adapter_config.json"), format!("{{\"r\": 8, \"tag\": \"{tag}\"}}")).unwrap();
    fs::write(adapter.join("adapter_model.safetensors"), vec![7u8; 1000]).unwrap();
    fs::write(adapter.join("nested/extra.txt"), "x").unwrap();
    let heads = root.join(format!("src-heads-{tag}.safetensors"));
    fs::write(&heads, format!("heads {tag}").repeat(100)).unwrap();
    PublishRequest {
        base_model_id: "Qwen/Qwen2.5-VL-3B-Instruct@abc123".into(),
        metrics: BTreeMap::from([("val_action_error_mm".to_string(), 1.25)]),
        info: serde_json::json!({"job_id": "job-1", "epoch": 3}),
        items: vec![
            PublishItem { dest: "heads.safetensors".into(), source: Source::File(heads) },
            PublishItem { dest: "adapter".into(), source: Source::Dir(adapter) },
            PublishItem { dest: "norm_stats.json".into(), source: Source::Bytes(b"{\"mean\": [0.0]}".to_vec()) },
            PublishItem {
                dest: "config/train.yaml".into(),
                source: Source::Bytes(format!("tag: {tag}\n").into_bytes()),
            },
        ],
    }
}

fn sha256sum(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum").arg(path).output().expect("sha256sum (coreutils)");
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

#[test]
fn publish_verify_and_manifest_hashes_match_coreutils() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("checkpoints");
    let p = Publisher::new(&root).unwrap();
    assert_eq!(p.latest().unwrap(), None);
    let published = p.publish(&request(tmp.path(), "a")).unwrap();
    assert_eq!(published.version, "v0001");
    assert_eq!(published.dir, root.join("v0001"));
    assert_eq!(p.latest().unwrap().as_deref(), Some("v0001"));
    assert_eq!(fs::read_to_string(root.join(LATEST_NAME)).unwrap(), "v0001\n");
    assert_eq!(published.manifest_sha256, sha256sum(&published.dir.join(MANIFEST_NAME)));

    let m = verify(&published.dir).unwrap();
    assert_eq!(m, published.manifest);
    let paths: Vec<_> = m.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors",
            "adapter/nested/extra.txt",
            "config/train.yaml",
            "heads.safetensors",
            "norm_stats.json"
        ]
    );
    for f in &m.files {
        let path = published.dir.join(&f.path);
        assert_eq!(f.sha256, sha256sum(&path), "{}", f.path);
        assert_eq!(f.size, fs::metadata(&path).unwrap().len());
    }
    assert_eq!(m.base_model_id, "Qwen/Qwen2.5-VL-3B-Instruct@abc123");
    assert_eq!(m.metrics["val_action_error_mm"], 1.25);
    // The manifest on disk is plain JSON others can read.
    let raw: serde_json::Value = serde_json::from_slice(&fs::read(published.dir.join(MANIFEST_NAME)).unwrap()).unwrap();
    assert_eq!(raw["version"], "v0001");
    assert_eq!(raw["format_version"], 1);

    let second = p.publish(&request(tmp.path(), "b")).unwrap();
    assert_eq!(second.version, "v0002");
    assert_eq!(p.versions().unwrap(), ["v0001", "v0002"]);
    assert_eq!(p.latest().unwrap().as_deref(), Some("v0002"));
}

#[test]
fn crash_before_rename_keeps_previous_latest_and_is_cleaned_later() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("checkpoints");
    let p = Publisher::new(&root).unwrap();
    p.publish(&request(tmp.path(), "a")).unwrap();

    // "Crash": the files are written and fsynced, the process dies before the rename.
    let staged = p.stage(&request(tmp.path(), "b")).unwrap();
    assert_eq!(staged.version, "v0002");
    let tmp_dir = staged.tmp_dir.clone();
    drop(staged);
    // A crash while writing the pointer leaves its temporary file too (named by the writer's
    // pid, here one of a process that has exited).
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let pointer_tmp = root.join(format!(".latest.{}.tmp", gone.id()));
    fs::write(&pointer_tmp, "v0002\n").unwrap();
    assert!(tmp_dir.is_dir());

    // Readers still see v0001, whole.
    assert_eq!(p.latest().unwrap().as_deref(), Some("v0001"));
    assert_eq!(p.versions().unwrap(), ["v0001"]);
    verify(&p.latest_dir().unwrap().unwrap()).unwrap();

    // The next publication removes the leftovers and takes the next version.
    let again = Publisher::new(&root).unwrap().publish(&request(tmp.path(), "c")).unwrap();
    assert_eq!(again.version, "v0002");
    assert!(!tmp_dir.exists());
    assert!(!pointer_tmp.exists());
    let names: Vec<String> =
        fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, ["latest", "v0001", "v0002"]);
    assert_eq!(fs::read_to_string(again.dir.join("config/train.yaml")).unwrap(), "tag: c\n");
}

#[test]
fn verification_names_the_bad_file() {
    let tmp = tempfile::tempdir().unwrap();
    let p = Publisher::new(tmp.path().join("checkpoints")).unwrap();
    let dir = p.publish(&request(tmp.path(), "a")).unwrap().dir;
    let heads = dir.join("heads.safetensors");
    let original = fs::read(&heads).unwrap();

    // One flipped byte, same size.
    let mut bad = original.clone();
    bad[10] ^= 1;
    fs::write(&heads, &bad).unwrap();
    match verify(&dir) {
        Err(PublishError::HashMismatch { file, .. }) => assert_eq!(file, "heads.safetensors"),
        other => panic!("expected a hash mismatch, got {other:?}"),
    }
    // Truncated.
    fs::write(&heads, &original[..original.len() / 2]).unwrap();
    let err = verify(&dir).unwrap_err();
    assert!(matches!(&err, PublishError::SizeMismatch { file, .. } if file == "heads.safetensors"), "{err}");
    assert!(err.to_string().contains("heads.safetensors"));
    fs::write(&heads, &original).unwrap();
    verify(&dir).unwrap();

    // Missing.
    let cfg = dir.join("adapter/adapter_config.json");
    let cfg_bytes = fs::read(&cfg).unwrap();
    fs::remove_file(&cfg).unwrap();
    let err = verify(&dir).unwrap_err();
    assert!(matches!(&err, PublishError::MissingFile { file, .. } if file == "adapter/adapter_config.json"), "{err}");
    fs::write(&cfg, cfg_bytes).unwrap();

    // Extra.
    fs::write(dir.join("adapter/surprise.bin"), b"!").unwrap();
    let err = verify(&dir).unwrap_err();
    assert!(matches!(&err, PublishError::ExtraFile { file, .. } if file == "adapter/surprise.bin"), "{err}");
    fs::remove_file(dir.join("adapter/surprise.bin")).unwrap();
    verify(&dir).unwrap();

    // Manifest itself corrupted or missing.
    fs::write(dir.join(MANIFEST_NAME), b"{ not json").unwrap();
    let err = verify(&dir).unwrap_err();
    assert!(matches!(err, PublishError::Manifest { .. }) && err.to_string().contains(MANIFEST_NAME), "{err}");
    fs::remove_file(dir.join(MANIFEST_NAME)).unwrap();
    assert!(matches!(verify(&dir), Err(PublishError::Manifest { .. })));
}

#[test]
fn bad_requests_and_pointer_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("checkpoints");
    let p = Publisher::new(&root).unwrap();
    for dest in ["../escape", "/abs", "manifest.json", ""] {
        let req = PublishRequest {
            base_model_id: "m".into(),
            metrics: BTreeMap::new(),
            info: serde_json::Value::Null,
            items: vec![PublishItem { dest: dest.into(), source: Source::Bytes(vec![1]) }],
        };
        assert!(matches!(p.publish(&req), Err(PublishError::Request(_))), "{dest}");
    }
    let dup = PublishRequest {
        base_model_id: "m".into(),
        metrics: BTreeMap::new(),
        info: serde_json::Value::Null,
        items: vec![
            PublishItem { dest: "a".into(), source: Source::Bytes(vec![1]) },
            PublishItem { dest: "a".into(), source: Source::Bytes(vec![2]) },
        ],
    };
    assert!(p.publish(&dup).unwrap_err().to_string().contains("`a`"));
    assert_eq!(p.latest().unwrap(), None, "failed publications publish nothing");
    fs::write(root.join(LATEST_NAME), "v0042\n").unwrap();
    assert!(matches!(p.latest(), Err(PublishError::Latest { .. })));
}

#[test]
fn prune_keeps_latest_and_protected() {
    let tmp = tempfile::tempdir().unwrap();
    let p = Publisher::new(tmp.path().join("checkpoints")).unwrap();
    for tag in ["a", "b", "c", "d", "e"] {
        p.publish(&request(tmp.path(), tag)).unwrap();
    }
    let removed = p.prune(2, &["v0002"]).unwrap();
    assert_eq!(removed.len(), 2);
    assert_eq!(p.versions().unwrap(), ["v0002", "v0004", "v0005"]);
    assert_eq!(p.publish(&request(tmp.path(), "f")).unwrap().version, "v0006");
}

#[test]
fn rfc3339_hand_values() {
    // Expected values from Python's datetime.
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    assert_eq!(rfc3339(1_795_741_323), "2026-11-27T01:02:03Z");
}
