//! Compiling episodes incrementally: each episode is compiled once into a *part* (a one-episode
//! dataset under `<parts_root>/<key>/`, the key covering the episode's recorded files and the
//! settings that shape its samples), and the dataset is assembled from the parts. Only new or
//! changed episodes are opened, aligned and encoded, one at a time; the others cost a hard link
//! per shard (a copy across file systems) and a pass over their sensor, state and action rows
//! for the statistics.
//!
//! The assembled dataset equals a whole [`compile`](super::compile::compile) of the same episodes
//! in its samples, split, statistics and report (test: `dataset_compile`), with shards cut per
//! episode. One difference: an episode whose first frame size differs from the dataset's loses
//! all its samples (`camera_size_changed:<camera>`), where the whole compile keeps those of its
//! frames that happen to match.
//!
//! One process compiles into a parts folder at a time (the trainer runs one job at a time).

use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::compile::{
    add_totals, check_unique, compile_one, dataset_index, finish, split_episodes, write_outputs, CompileConfig,
    CompileError, CompileOutput, CompileReport, FailedEpisode, Shapes,
};
use super::episode::OpenEpisode;
use super::stats::DatasetStats;
use super::store::{
    CameraInfo, DatasetIndex, EpisodeEntry, SampleEntry, ShardInfo, ShardReader, Split, Staging, StoreError,
    INDEX_FILE, REPORT_FILE,
};

/// Version of the parts' layout, in their keys.
const PARTS_FORMAT: &str = "vla_finetune.part/1";

/// An episode to compile: its id, the fingerprint of its recorded files (equal while unchanged)
/// and how to open it, called only when its part has to be compiled.
pub struct FingerprintedEpisode<'a> {
    /// Its id (the `meta().id` of what `open` gives).
    pub id: String,
    /// Its fingerprint.
    pub fingerprint: String,
    /// Opens it.
    pub open: OpenEpisode<'a>,
}

/// What an incremental compile wrote, and how much of it was new.
#[derive(Debug, Clone)]
pub struct IncrementalOutput {
    /// The assembled dataset.
    pub output: CompileOutput,
    /// Episodes read and compiled now.
    pub compiled: usize,
    /// Episodes whose part from an earlier compile was reused.
    pub reused: usize,
}

/// One episode's compiled part, or why the episode was left out.
struct Part {
    id: String,
    compiled: Result<(PathBuf, DatasetIndex, CompileReport), FailedEpisode>,
}

/// Compiles `episodes` into the new dataset folder `out` (replacing one there), compiling into
/// `parts_root` only the episodes without a part for their fingerprint and these settings.
pub fn compile_incremental(
    episodes: &[FingerprintedEpisode<'_>],
    cfg: &CompileConfig,
    parts_root: &Path,
    out: &Path,
) -> Result<IncrementalOutput, CompileError> {
    cfg.validate()?;
    let mut order: Vec<&FingerprintedEpisode<'_>> = episodes.iter().collect();
    order.sort_by(|a, b| a.id.cmp(&b.id));
    let ids: Vec<String> = order.iter().map(|e| e.id.clone()).collect();
    check_unique(&ids)?;
    std::fs::create_dir_all(parts_root).map_err(|source| StoreError::Io { path: parts_root.to_path_buf(), source })?;
    let (mut compiled, mut reused) = (0, 0);
    let mut parts = Vec::with_capacity(order.len());
    for (ep, id) in order.iter().zip(&ids) {
        let dir = parts_root.join(part_key(&ep.fingerprint, cfg));
        let part = match load_part(&dir)? {
            Some(p) => {
                reused += 1;
                Ok(p)
            }
            None => {
                compiled += 1;
                compile_one((ep.open)().as_ref(), cfg, &dir)?.map(|o| (dir, o.index, o.report))
            }
        };
        parts.push(Part { id: id.clone(), compiled: part });
    }
    let splits = split_episodes(&ids, &cfg.split);
    let staging = Staging::create(out, true)?;
    let result = assemble(&parts, &splits, cfg, &staging.dir, &staging.removed);
    let output = finish(staging, result, out, episodes.len())?;
    Ok(IncrementalOutput { output, compiled, reused })
}

/// 32 hex digits over the episode's fingerprint and the settings its samples depend on.
fn part_key(fingerprint: &str, cfg: &CompileConfig) -> String {
    #[derive(Serialize)]
    struct Key<'a> {
        format: &'a str,
        fingerprint: &'a str,
        align: &'a super::align::AlignConfig,
        jpeg_quality: u8,
        shard_max_mb: f64,
    }
    let key = Key {
        format: PARTS_FORMAT,
        fingerprint,
        align: &cfg.align,
        jpeg_quality: cfg.store.jpeg_quality,
        shard_max_mb: cfg.store.shard_max_mb,
    };
    let digest = Sha256::digest(serde_json::to_vec(&key).expect("part key serializes"));
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// The part compiled into `dir` earlier, or `None` when there is none.
fn load_part(dir: &Path) -> Result<Option<(PathBuf, DatasetIndex, CompileReport)>, CompileError> {
    if !dir.join(INDEX_FILE).is_file() {
        return Ok(None);
    }
    let index = DatasetIndex::load(dir)?;
    let report: CompileReport = super::store::read_json(&dir.join(REPORT_FILE))?;
    if index.episodes.len() != 1 || report.episodes.len() != 1 {
        return Err(StoreError::Invalid {
            path: dir.to_path_buf(),
            what: "a compiled part holds one episode; remove the folder to compile it again".into(),
        }
        .into());
    }
    Ok(Some((dir.to_path_buf(), index, report)))
}

/// The shapes of most parts with sample times (ties: the first by id), as a whole compile
/// chooses them.
fn majority(parts: &[Part]) -> Option<Shapes> {
    let mut votes: Vec<(Shapes, usize)> = Vec::new();
    for (_, index, report) in parts.iter().filter_map(|p| p.compiled.as_ref().ok()) {
        if report.candidates == 0 {
            continue;
        }
        let s = Shapes::of_index(index);
        match votes.iter_mut().find(|(v, _)| *v == s) {
            Some((_, n)) => *n += 1,
            None => votes.push((s, 1)),
        }
    }
    let best = votes.iter().map(|(_, n)| *n).max()?;
    votes.into_iter().find(|(_, n)| *n == best).map(|(s, _)| s)
}

/// The dataset of `parts` (in id order, `splits` theirs) written into `dir`.
fn assemble(
    parts: &[Part],
    splits: &[Split],
    cfg: &CompileConfig,
    dir: &Path,
    removed: &[PathBuf],
) -> Result<CompileOutput, CompileError> {
    let shapes = majority(parts);
    let mut report = CompileReport { removed_leftovers: removed.to_vec(), ..Default::default() };
    let mut sizes: Vec<Option<(u32, u32)>> = vec![None; shapes.as_ref().map_or(0, |s| s.cameras.len())];
    let mut shards: Vec<ShardInfo> = Vec::new();
    let mut samples: Vec<SampleEntry> = Vec::new();
    let mut entries = Vec::new();
    for (part, &split) in parts.iter().zip(splits) {
        let (pdir, index, preport) = match &part.compiled {
            Ok(p) => p,
            Err(f) => {
                report.failed_episodes.push(f.clone());
                continue;
            }
        };
        let mut rep = preport.episodes[0].clone();
        rep.split = split;
        let own = Shapes::of_index(index);
        if let Some(want) = shapes.as_ref().filter(|w| **w != own) {
            let error = match &rep.damage {
                Some(d) => format!("{} (the recording is damaged: {})", own.mismatch(want), d.reasons.join("; ")),
                None => own.mismatch(want),
            };
            report.failed_episodes.push(FailedEpisode { id: part.id.clone(), error });
            continue;
        }
        if rep.samples > 0 {
            if let Some(camera) = size_mismatch(&mut sizes, &index.cameras) {
                *rep.drops.entry(format!("camera_size_changed:{camera}")).or_default() += rep.samples;
                rep.samples = 0;
            } else {
                let first_shard = shards.len();
                for sh in &index.shards {
                    let file = format!("shard-{:05}.safetensors", shards.len());
                    link_or_copy(&pdir.join(&sh.file), &dir.join(&file))?;
                    shards.push(ShardInfo { file, samples: sh.samples });
                }
                samples.extend(index.samples.iter().map(|s| SampleEntry {
                    episode: entries.len(),
                    split,
                    shard: first_shard + s.shard,
                    ..s.clone()
                }));
            }
        }
        entries.push(EpisodeEntry { split, samples: rep.samples as usize, ..index.episodes[0].clone() });
        report.episodes.push(rep);
    }
    add_totals(&mut report);
    let shapes = shapes.unwrap_or_else(Shapes::empty);
    let index = dataset_index(cfg, &shapes, &sizes, shards, entries, samples);
    let stats = training_stats(&index, &shapes, cfg, dir)?;
    write_outputs(dir, cfg, &index, &stats, &report)?;
    Ok(CompileOutput { index, stats, report })
}

/// The first camera whose size in `cameras` differs from the dataset's `sizes` (setting those
/// not known yet when none differs).
fn size_mismatch(sizes: &mut [Option<(u32, u32)>], cameras: &[CameraInfo]) -> Option<String> {
    for (known, c) in sizes.iter().zip(cameras) {
        if known.is_some_and(|k| k != (c.width, c.height)) {
            return Some(c.name.clone());
        }
    }
    for (known, c) in sizes.iter_mut().zip(cameras) {
        known.get_or_insert((c.width, c.height));
    }
    None
}

/// Hard-links `from` to `to`, copying where a link cannot be made.
fn link_or_copy(from: &Path, to: &Path) -> Result<(), StoreError> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to).map(|_| ()).map_err(|source| StoreError::Io { path: from.to_path_buf(), source })
}

/// Statistics of the training samples, read from the shards in `dir` in sample order (the order
/// and seeds of a whole compile, so the values are the same).
fn training_stats(
    index: &DatasetIndex,
    shapes: &Shapes,
    cfg: &CompileConfig,
    dir: &Path,
) -> Result<DatasetStats, StoreError> {
    if index.samples.is_empty() {
        return Ok(DatasetStats::default());
    }
    let mut acc = shapes.stats_accumulators(cfg);
    let lens = [
        index.sensor_shape[0] * index.sensor_shape[1],
        index.state_names.len(),
        index.action_shape[0] * index.action_shape[1],
    ];
    let mut shard: Option<(usize, ShardReader)> = None;
    let mut row = Vec::new();
    for s in index.samples.iter().filter(|s| s.split == Split::Train) {
        if shard.as_ref().is_none_or(|(i, _)| *i != s.shard) {
            shard = Some((s.shard, ShardReader::open(&dir.join(&index.shards[s.shard].file))?));
        }
        let reader = &shard.as_ref().expect("opened above").1;
        for ((name, len), a) in ["sensor", "state", "action"].iter().zip(lens).zip(acc.iter_mut()) {
            row.clear();
            reader.f32_row(name, s.row, len, &mut row)?;
            a.add_rows(&row);
        }
    }
    let [a, s, c] = &acc;
    Ok(DatasetStats { sensor: a.finish(), state: s.finish(), action: c.finish() })
}
