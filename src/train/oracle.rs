//! The oracle floor of a simulated dataset: the stage-1 heads trained, on the same samples, with
//! the simulator's ground truth as their conditioning instead of VL features (`heads_job::
//! run_oracle`). The conditioning is what the camera images show, as numbers: the target's
//! position and yaw (from the truth log written beside the recording, [`crate::sim::truth`]) and
//! the tool's pose at the sample time (the recorded pose state). No VL pathway can extract more
//! from the images, so its error is the floor a VL policy can approach but not beat.

use tch::Tensor;

use crate::dataset::reader::Dataset;
use crate::sim::truth::{self, EpisodeTruth};
use crate::train::error::TrainError;

/// Values of the oracle conditioning: target x, y, z, cos/sin yaw; tool x, y, z, cos/sin yaw.
pub const ORACLE_DIM: usize = 10;
/// Positions are divided by this (mm) to be of order one.
const POSITION_SCALE_MM: f64 = 50.0;

/// The oracle conditioning `[1, ORACLE_DIM]` of every sample of `ds`, from the truth log
/// `truths` (matched by sample time) and the samples' pose state (`x`, `y`, `z` mm, `yaw` deg).
pub fn conditioning(ds: &Dataset, truths: &[EpisodeTruth]) -> Result<Vec<Tensor>, TrainError> {
    let names = &ds.index.state_names;
    let pos = |n: &str| names.iter().position(|s| s == n);
    let (Some(x), Some(y), Some(z), Some(yaw)) = (pos("x"), pos("y"), pos("z"), pos("yaw")) else {
        return Err(TrainError::invalid(
            "oracle",
            format!("the dataset's state {names:?} is not a tool pose (needs x, y, z, yaw)"),
        ));
    };
    (0..ds.len())
        .map(|i| {
            let s = ds.sample(i)?;
            let t = truth::at(truths, s.t_ns).ok_or_else(|| {
                TrainError::invalid("oracle", format!("sample {i} of episode `{}` at {} ns is in no episode of the simulator truth log", s.episode, s.t_ns))
            })?;
            if t.instruction != s.instruction {
                return Err(TrainError::invalid(
                    "oracle",
                    format!(
                        "sample {i} of episode `{}` at {} ns was recorded with instruction {:?}, but the simulator truth log's scene then (seed {}, episode {}) was {:?}: the log does not belong to this recording",
                        s.episode, s.t_ns, s.instruction, t.seed, t.index, t.instruction
                    ),
                ));
            }
            let st = |k: usize| s.state[k] as f64;
            let (ty, sy) = (t.target_yaw_deg.to_radians(), st(yaw).to_radians());
            let v = [
                t.target_mm[0] / POSITION_SCALE_MM,
                t.target_mm[1] / POSITION_SCALE_MM,
                t.target_mm[2] / POSITION_SCALE_MM,
                ty.cos(),
                ty.sin(),
                st(x) / POSITION_SCALE_MM,
                st(y) / POSITION_SCALE_MM,
                st(z) / POSITION_SCALE_MM,
                sy.cos(),
                sy.sin(),
            ];
            Ok(Tensor::from_slice(&v.map(|v| v as f32)).reshape([1, ORACLE_DIM as i64]))
        })
        .collect()
}

/// Reads the truth log at `path`.
pub fn read_truth(path: &std::path::Path) -> Result<Vec<EpisodeTruth>, TrainError> {
    truth::read(path).map_err(|e| TrainError::invalid("oracle", e.to_string()))
}
