//! Which recorded episodes train: selection by outcome and task, discard and restore (service
//! core and CLI), episodes being recorded, and the compiled set of an episodes root reused while
//! its selected episodes are unchanged.

use std::path::{Path, PathBuf};
use std::process::Command;

use vla_finetune::dataset::compile::CompileConfig;
use vla_finetune::dataset::mcap_episode::{read_episode_json, write_episode_json, RECORDING_MARKER};
use vla_finetune::dataset::selection::{select, set_discarded, EpisodeSelection, LeftOut, SelectionError};
use vla_finetune::dataset::store::DatasetIndex;
use vla_finetune::train::training_set::{prepare, DatasetSource};

const BIN: &str = env!("CARGO_BIN_EXE_vla_finetune");

/// Four simulated episodes, outcomes and tasks set as given (id order).
fn recorded(dir: &Path, labels: &[(&str, &str)]) -> (PathBuf, Vec<String>) {
    let rec = dir.join("rec");
    let o = Command::new(BIN)
        .args([
            "record",
            "--sim",
            "--episodes",
            &labels.len().to_string(),
            "--seconds",
            "1.2",
            "--cameras",
            "1",
            "--width",
            "56",
            "--height",
            "56",
            "--out",
        ])
        .arg(&rec)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut ids: Vec<String> = std::fs::read_dir(rec.join("episodes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    ids.sort();
    for (id, (outcome, task)) in ids.iter().zip(labels) {
        let ep = rec.join("episodes").join(id);
        let mut meta = read_episode_json(&ep).unwrap();
        meta.outcome = outcome.to_string();
        meta.task = task.to_string();
        write_episode_json(&ep, &meta).unwrap();
    }
    (rec, ids)
}

fn compile_config() -> CompileConfig {
    let mut cc = CompileConfig::default();
    cc.align.sensor_window_s = 0.05;
    cc.align.sensor_samples = 16;
    cc.split.val_fraction = 0.34;
    cc.store.encode_threads = 1;
    cc
}

fn names(dirs: &[PathBuf]) -> Vec<String> {
    dirs.iter().map(|d| d.file_name().unwrap().to_string_lossy().into_owned()).collect()
}

#[test]
fn success_only_by_default_discarded_and_recording_episodes_left_out_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let (rec, ids) = recorded(
        dir.path(),
        &[("success", "insert"), ("failure", "insert"), ("success", "wipe"), ("success", "insert")],
    );
    let all = select(&rec, &EpisodeSelection::default()).unwrap();
    assert_eq!(names(&all.dirs), [ids[0].clone(), ids[2].clone(), ids[3].clone()]);
    assert_eq!(all.left_out, [LeftOut { id: ids[1].clone(), reason: "outcome `failure` (selected: success)".into() }]);

    let by_task = EpisodeSelection { outcomes: vec!["success".into(), "failure".into()], tasks: vec!["insert".into()] };
    let s = select(&rec, &by_task).unwrap();
    assert_eq!(names(&s.dirs), [ids[0].clone(), ids[1].clone(), ids[3].clone()]);
    assert_eq!(s.left_out, [LeftOut { id: ids[2].clone(), reason: "task `wipe` (selected: insert)".into() }]);
    let any = EpisodeSelection { outcomes: vec!["any".into()], tasks: vec![] };
    assert_eq!(select(&rec, &any).unwrap().dirs.len(), 4);

    // Discard keeps the files and records why; restore takes it back.
    let files_before: Vec<_> =
        std::fs::read_dir(rec.join("episodes").join(&ids[3])).unwrap().map(|e| e.unwrap().file_name()).collect();
    let meta = set_discarded(&rec, &ids[3], "camera occluded", false).unwrap();
    assert_eq!(meta.discarded.as_ref().unwrap().reason, "camera occluded");
    let files_after: Vec<_> =
        std::fs::read_dir(rec.join("episodes").join(&ids[3])).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(files_before.len(), files_after.len(), "nothing deleted");
    let s = select(&rec, &EpisodeSelection::default()).unwrap();
    assert_eq!(names(&s.dirs), [ids[0].clone(), ids[2].clone()]);
    assert!(
        s.left_out.contains(&LeftOut { id: ids[3].clone(), reason: "discarded: camera occluded".into() }),
        "{:?}",
        s.left_out
    );
    assert_eq!(set_discarded(&rec, &ids[3], "", true).unwrap().discarded, None);
    assert_eq!(select(&rec, &EpisodeSelection::default()).unwrap().dirs.len(), 3);

    // An episode being recorded (a live recorder's marker) is neither selected nor discarded.
    std::fs::write(rec.join("episodes").join(&ids[0]).join(RECORDING_MARKER), format!("pid {}\n", std::process::id()))
        .unwrap();
    let s = select(&rec, &EpisodeSelection::default()).unwrap();
    assert_eq!(
        s.left_out[0],
        LeftOut { id: ids[0].clone(), reason: format!("being recorded (pid {})", std::process::id()) }
    );
    let e = set_discarded(&rec, &ids[0], "", false).unwrap_err();
    assert!(matches!(e, SelectionError::Recording { .. }), "{e}");
    std::fs::remove_file(rec.join("episodes").join(&ids[0]).join(RECORDING_MARKER)).unwrap();

    let e = set_discarded(&rec, "nope", "", false).unwrap_err().to_string();
    assert_eq!(e, format!("no episode `nope` under {0} (expected a folder {0}/episodes/nope)", rec.display()));
    let e =
        select(&rec, &EpisodeSelection { outcomes: vec!["aborted".into()], tasks: vec![] }).unwrap_err().to_string();
    assert_eq!(e, format!("{}: no usable episode: 4 episode(s) found, all left out: 1 outcome `failure` (selected: aborted); 3 outcome `success` (selected: aborted)", rec.display()));
    let e = select(&dir.path().join("elsewhere"), &EpisodeSelection::default()).unwrap_err().to_string();
    assert!(e.ends_with("elsewhere: not an episodes root (expected an `episodes/` folder of recorded episodes, as the collector writes)"), "{e}");
}

#[test]
fn an_episodes_root_compiles_once_while_its_selected_episodes_are_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let (rec, ids) = recorded(dir.path(), &[("success", ""), ("success", ""), ("failure", ""), ("success", "")]);
    let datasets = dir.path().join("datasets");
    let sel = EpisodeSelection::default();
    let first = prepare(&DatasetSource::resolve(&rec, &sel).unwrap(), &compile_config(), &datasets).unwrap();
    assert!(!first.reused && first.episodes_compiled == 3);
    let idx = DatasetIndex::load(&first.dir).unwrap();
    assert_eq!(
        idx.episodes.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        [ids[0].clone(), ids[1].clone(), ids[3].clone()]
    );
    assert_eq!(first.report.as_ref().unwrap().episodes.len(), 3);

    let again = prepare(&DatasetSource::resolve(&rec, &sel).unwrap(), &compile_config(), &datasets).unwrap();
    assert!(again.reused && again.report.is_none());
    assert_eq!(again.dir, first.dir);

    // A discard (or any change of a selected episode) makes a new set; restoring finds the old one.
    set_discarded(&rec, &ids[1], "", false).unwrap();
    let fewer = prepare(&DatasetSource::resolve(&rec, &sel).unwrap(), &compile_config(), &datasets).unwrap();
    assert!(!fewer.reused && fewer.dir != first.dir);
    assert_eq!(fewer.episodes_compiled, 0, "the remaining episodes' parts are reused");
    assert_eq!(DatasetIndex::load(&fewer.dir).unwrap().episodes.len(), 2);
    set_discarded(&rec, &ids[1], "", true).unwrap();
    let back = prepare(&DatasetSource::resolve(&rec, &sel).unwrap(), &compile_config(), &datasets).unwrap();
    assert!(back.reused && back.dir == first.dir, "restoring the discard gives back the first set");
    // Other compile settings: another set.
    let mut cc = compile_config();
    cc.split.val_fraction = 0.5;
    let resplit = prepare(&DatasetSource::resolve(&rec, &sel).unwrap(), &cc, &datasets).unwrap();
    assert!(!resplit.reused && resplit.episodes_compiled == 0);
    // A new episode (recorded into the same root): only it is compiled.
    let o = Command::new(BIN)
        .args([
            "record",
            "--sim",
            "--seed",
            "7",
            "--episodes",
            "1",
            "--seconds",
            "1.2",
            "--cameras",
            "1",
            "--width",
            "56",
            "--height",
            "56",
            "--out",
        ])
        .arg(&rec)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let new = rec.join("episodes").join("sim_s7_e0000");
    let mut meta = read_episode_json(&new).unwrap();
    meta.outcome = "success".into();
    write_episode_json(&new, &meta).unwrap();
    let grown = prepare(&DatasetSource::resolve(&rec, &sel).unwrap(), &compile_config(), &datasets).unwrap();
    assert_eq!((grown.reused, grown.episodes_compiled), (false, 1));
    assert_eq!(DatasetIndex::load(&grown.dir).unwrap().episodes.len(), 4);
    // A compiled dataset is used as it is.
    assert_eq!(DatasetSource::resolve(&first.dir, &sel).unwrap(), DatasetSource::Compiled(first.dir.clone()));
}

#[test]
fn cli_discards_restores_and_compiles_by_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let (rec, ids) = recorded(dir.path(), &[("success", ""), ("failure", ""), ("success", "")]);
    let run = |args: &[&str]| Command::new(BIN).args(args).output().unwrap();
    let cfg = dir.path().join("compile.yaml");
    std::fs::write(&cfg, "align:\n  sensor_window_s: 0.05\n  sensor_samples: 16\n").unwrap();
    let o = run(&["dataset", "discard", "--root", rec.to_str().unwrap(), "--id", &ids[2], "--reason", "bad grasp"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), format!("{}: episode `{}` discarded", rec.display(), ids[2]));
    let o = run(&[
        "dataset",
        "compile",
        "--episodes",
        rec.to_str().unwrap(),
        "--out",
        dir.path().join("ds").to_str().unwrap(),
        "--outcome",
        "success",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!("episode `{}` not compiled: outcome `failure` (selected: success)", ids[1])),
        "{out}"
    );
    assert!(out.contains(&format!("episode `{}` not compiled: discarded: bad grasp", ids[2])), "{out}");
    assert_eq!(DatasetIndex::load(&dir.path().join("ds")).unwrap().episodes.len(), 1);
    let o = run(&["dataset", "discard", "--root", rec.to_str().unwrap(), "--id", &ids[2], "--restore"]);
    assert!(o.status.success());
    assert_eq!(read_episode_json(&rec.join("episodes").join(&ids[2])).unwrap().discarded, None);
    let o = run(&["dataset", "discard", "--root", rec.to_str().unwrap(), "--id", "missing"]);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no episode `missing`"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
