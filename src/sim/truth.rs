//! The simulator's ground truth of each episode, written beside a recording (never a policy
//! input): one JSON line per simulated episode with the time span it covers on the recording's
//! clock, so a compiled sample finds its scene by its time. The oracle of `train::oracle` reads it.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Scene;

/// Name of the truth log in a recordings folder.
pub const TRUTH_FILE: &str = "sim_truth.jsonl";

/// One simulated episode's ground truth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpisodeTruth {
    /// First stamp of the episode's messages, ns.
    pub start_ns: i64,
    /// End of the episode (exclusive), ns.
    pub end_ns: i64,
    /// Simulator seed and episode index (the scene derives from them).
    pub seed: u64,
    /// Episode index.
    pub index: u64,
    /// Instruction given.
    pub instruction: String,
    /// Target centre, mm.
    pub target_mm: [f64; 3],
    /// Yaw the tool must reach, degrees.
    pub target_yaw_deg: f64,
    /// Centres of the other disks, mm: the twin (the target's colour) first, then the distractor
    /// (empty in logs written before it was recorded).
    #[serde(default)]
    pub others_mm: Vec<[f64; 3]>,
}

impl EpisodeTruth {
    /// The truth of `scene` (episode `index` of simulator `seed`) over `[start_ns, end_ns)`.
    pub fn new(scene: &Scene, seed: u64, index: u64, start_ns: i64, end_ns: i64) -> Self {
        EpisodeTruth {
            start_ns,
            end_ns,
            seed,
            index,
            instruction: scene.instruction(),
            target_mm: scene.target_mm,
            target_yaw_deg: scene.target_yaw_deg,
            others_mm: scene.others.iter().map(|d| d.mm).collect(),
        }
    }
}

/// Truth log errors, naming the file and line.
#[derive(Debug, thiserror::Error)]
pub enum TruthError {
    /// The file cannot be read or written.
    #[error("simulator truth log {path}: {source}")]
    Io {
        /// The log.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A line is not an episode's truth.
    #[error("simulator truth log {path}, line {line}: {reason} (expected one JSON object per line with start_ns, end_ns, seed, index, instruction, target_mm, target_yaw_deg)")]
    Parse {
        /// The log.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// Two episodes claim the same instants: a sample's scene would be ambiguous.
    #[error("simulator truth log {path}: episode {first} [{first_start}, {first_end}) ns and episode {second} [{second_start}, {second_end}) ns overlap (expected disjoint time spans, one scene at a time)")]
    Overlap {
        /// The log.
        path: PathBuf,
        /// Seed/index of the earlier episode, `s<seed>_e<index>`.
        first: String,
        /// Its span.
        first_start: i64,
        /// Its span's end.
        first_end: i64,
        /// Seed/index of the later one.
        second: String,
        /// Its span.
        second_start: i64,
        /// Its span's end.
        second_end: i64,
    },
}

/// Appends `truth` as one line to `path` (created when missing) and syncs it.
pub fn append(path: &Path, truth: &EpisodeTruth) -> Result<(), TruthError> {
    let io = |source| TruthError::Io { path: path.to_path_buf(), source };
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(io)?;
    let mut line = serde_json::to_string(truth).expect("truth serializes");
    line.push('\n');
    f.write_all(line.as_bytes()).map_err(io)?;
    f.sync_data().map_err(io)
}

/// Every episode's truth in `path`, in time order; spans must not overlap.
pub fn read(path: &Path) -> Result<Vec<EpisodeTruth>, TruthError> {
    let text = std::fs::read_to_string(path).map_err(|source| TruthError::Io { path: path.to_path_buf(), source })?;
    let mut truths = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| TruthError::Parse {
                path: path.to_path_buf(),
                line: i + 1,
                reason: e.to_string(),
            })
        })
        .collect::<Result<Vec<EpisodeTruth>, _>>()?;
    truths.sort_by_key(|t| t.start_ns);
    if let Some(w) = truths.windows(2).find(|w| w[1].start_ns < w[0].end_ns) {
        let name = |t: &EpisodeTruth| format!("s{}_e{}", t.seed, t.index);
        return Err(TruthError::Overlap {
            path: path.to_path_buf(),
            first: name(&w[0]),
            first_start: w[0].start_ns,
            first_end: w[0].end_ns,
            second: name(&w[1]),
            second_start: w[1].start_ns,
            second_end: w[1].end_ns,
        });
    }
    Ok(truths)
}

/// The truth whose span holds `t_ns`, if any, in `truths` as [`read`] returns them.
pub fn at(truths: &[EpisodeTruth], t_ns: i64) -> Option<&EpisodeTruth> {
    let i = truths.partition_point(|t| t.start_ns <= t_ns);
    i.checked_sub(1).map(|i| &truths[i]).filter(|t| t_ns < t.end_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_round_trips_and_finds_episodes_by_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TRUTH_FILE);
        let sim = super::super::SimConfig { seed: 3, ..Default::default() };
        for i in 0..2 {
            append(&path, &EpisodeTruth::new(&sim.scene(i), 3, i, 100 * i as i64, 100 * i as i64 + 100)).unwrap();
        }
        let t = read(&path).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].target_mm, sim.scene(1).target_mm);
        let others: Vec<[f64; 3]> = sim.scene(1).others.iter().map(|d| d.mm).collect();
        assert_eq!((t[1].others_mm.len(), &t[1].others_mm), (2, &others));
        assert_eq!(at(&t, 150).map(|t| t.index), Some(1));
        assert_eq!(at(&t, 99).map(|t| t.index), Some(0));
        assert!(at(&t, 200).is_none());
        assert!(at(&t, -1).is_none());
        // Two episodes over the same instants: which scene a sample shows would be a guess.
        append(&path, &EpisodeTruth::new(&sim.scene(2), 3, 2, 150, 250)).unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("episode s3_e1 [100, 200) ns and episode s3_e2 [150, 250) ns overlap"), "{e}");
        std::fs::write(&path, "{\"start_ns\": 1}\n").unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("missing field"), "{e}");
    }
}
