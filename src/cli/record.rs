//! `vla_finetune record --sim`: record episodes from the simulated robot through the recorder core.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::dataset::mcap_episode::{Compression, WriterOptions};
use crate::dataset::recorder::{now_ns, EpisodeInfo, PushOutcome, Recorder, RecorderConfig};
use crate::sim::truth::{self, EpisodeTruth};
use crate::sim::{SimConfig, SimEpisode};

/// Arguments of `record`.
#[derive(clap::Args, Debug)]
pub struct RecordArgs {
    /// Record from the simulated robot (live topics are recorded by the ROS collector node).
    #[arg(long)]
    pub sim: bool,
    /// Number of episodes.
    #[arg(long, default_value_t = 1)]
    pub episodes: u64,
    /// Seconds per episode (simulated time).
    #[arg(long, default_value_t = 8.0)]
    pub seconds: f64,
    /// Dataset root.
    #[arg(long)]
    pub out: PathBuf,
    /// Simulator seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Camera views.
    #[arg(long, default_value_t = 2)]
    pub cameras: usize,
    /// Image width.
    #[arg(long, default_value_t = 640)]
    pub width: u32,
    /// Image height.
    #[arg(long, default_value_t = 360)]
    pub height: u32,
    /// Camera rate, Hz.
    #[arg(long, default_value_t = 10.0)]
    pub camera_hz: f64,
    /// Sensor rate, Hz.
    #[arg(long, default_value_t = 650.0)]
    pub sensor_hz: f64,
    /// Pose rate, Hz.
    #[arg(long, default_value_t = 100.0)]
    pub pose_hz: f64,
    /// Publish at the simulated clock's pace (otherwise as fast as the writer takes them).
    #[arg(long)]
    pub realtime: bool,
    /// Recorder queue capacity (messages).
    #[arg(long, default_value_t = 4096)]
    pub queue: usize,
    /// Recorder queue budget in MiB of message payload.
    #[arg(long, default_value_t = 256)]
    pub queue_mb: usize,
    /// Chunk compression.
    #[arg(long, value_enum, default_value = "zstd")]
    pub compression: Compression,
    /// Operator name stored with each episode.
    #[arg(long, default_value = "sim")]
    pub operator: String,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Id of simulated episode `index` of simulator `seed`.
pub fn episode_id(seed: u64, index: u64) -> String {
    format!("sim_s{seed}_e{index:04}")
}

/// Runs `record`.
pub fn run(a: RecordArgs) -> anyhow::Result<()> {
    check_args(&a)?;
    let sim = SimConfig {
        seed: a.seed,
        cameras: a.cameras,
        width: a.width,
        height: a.height,
        camera_hz: a.camera_hz,
        sensor_hz: a.sensor_hz,
        pose_hz: a.pose_hz,
        ..Default::default()
    };
    let rec = open_recorder(&a, &sim)?;
    let started = Instant::now();
    let mut summaries = Vec::new();
    // Faster than real time, simulated episodes would overlap in time: each starts where the last
    // one (of this run or of an earlier run into the same folder) ended.
    let truth_file = a.out.join(truth::TRUTH_FILE);
    let mut free_from_ns = if truth_file.exists() {
        truth::read(&truth_file)?.iter().map(|t| t.end_ns).max().unwrap_or(i64::MIN)
    } else {
        i64::MIN
    };
    for index in 0..a.episodes {
        let start_ns = now_ns().max(free_from_ns);
        let (summary, stop_ns) = record_episode(&rec, &a, sim.episode(index, start_ns, a.seconds), index, start_ns)?;
        free_from_ns = stop_ns;
        summaries.push(summary);
    }
    let status = rec.status();
    drop(rec);
    let secs = started.elapsed().as_secs_f64();
    let simulated = a.seconds * a.episodes as f64;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "episodes": summaries, "status": status, "wall_seconds": secs, "simulated_seconds": simulated,
            }))?
        );
    } else {
        println!(
            "recorded {} episodes ({simulated:.1} s simulated) in {secs:.2} s into {}",
            a.episodes,
            a.out.display()
        );
    }
    Ok(())
}

/// Refuses a run without `--sim` or with a non-positive length, size, camera count or rate.
fn check_args(a: &RecordArgs) -> anyhow::Result<()> {
    if !a.sim {
        bail!("`record` needs --sim: live ROS topics are recorded by the collector node (feature `ros`)");
    }
    if !(a.seconds > 0.0 && a.seconds.is_finite()) {
        bail!("--seconds must be a positive number, got {}", a.seconds);
    }
    if a.width == 0 || a.height == 0 || a.cameras == 0 || !(a.camera_hz > 0.0 && a.sensor_hz > 0.0 && a.pose_hz > 0.0) {
        bail!("--width, --height, --cameras and the rates must be positive");
    }
    Ok(())
}

/// Opens the recorder on `a.out` for `sim`'s streams, reporting the unfinished episodes it
/// recovered.
fn open_recorder(a: &RecordArgs, sim: &SimConfig) -> anyhow::Result<Recorder> {
    let cfg = RecorderConfig {
        root: a.out.clone(),
        streams: sim.streams(),
        queue_capacity: a.queue,
        queue_bytes: a.queue_mb << 20,
        writer: WriterOptions { compression: a.compression, ..Default::default() },
    };
    let (rec, recovered) = Recorder::open(cfg).with_context(|| format!("opening dataset {}", a.out.display()))?;
    for r in &recovered {
        match r {
            Ok(r) => eprintln!("recovered unfinished episode {} ({} messages)", r.id, r.messages),
            Err(e) => eprintln!("could not recover an unfinished episode: {e}"),
        }
    }
    Ok(rec)
}

/// Records simulated episode `index` (`ep`, starting at `start_ns`) with its ground truth beside
/// it; returns its summary and its stop time.
fn record_episode(
    rec: &Recorder,
    a: &RecordArgs,
    mut ep: SimEpisode,
    index: u64,
    start_ns: i64,
) -> anyhow::Result<(serde_json::Value, i64)> {
    let scene = ep.scene().clone();
    let id = episode_id(a.seed, index);
    rec.start(
        EpisodeInfo {
            id: Some(id),
            instruction: scene.instruction(),
            task: "needle_insertion".into(),
            operator: a.operator.clone(),
        },
        start_ns,
    )?;
    let dropped = push_messages(rec, &mut ep, a.realtime, start_ns)?;
    let tool = ep.tool();
    let inserted = tool.position_mm[2] < scene.target_mm[2]
        && (tool.position_mm[0] - scene.target_mm[0]).hypot(tool.position_mm[1] - scene.target_mm[1]) < 2.0;
    let stop_ns = start_ns + (a.seconds * 1e9) as i64;
    let meta = rec.stop_at(if inserted { "success" } else { "failure" }, stop_ns)?;
    // The ground truth beside the recording, for the oracle (never a policy input).
    truth::append(&a.out.join(truth::TRUTH_FILE), &EpisodeTruth::new(&scene, a.seed, index, start_ns, stop_ns))?;
    let summary = serde_json::json!({
        "id": meta.id, "instruction": meta.instruction, "outcome": meta.outcome,
        "drops": meta.drops, "dropped_at_push": dropped,
    });
    if !a.json {
        eprintln!(
            "episode {} ({}): {}, {} drops",
            meta.id,
            meta.instruction,
            meta.outcome,
            meta.drops.values().sum::<u64>()
        );
    }
    Ok((summary, stop_ns))
}

/// Hands every message of `ep` to the recorder (at the simulated clock's pace when `realtime`,
/// else waiting for queue room); returns how many it dropped.
fn push_messages(rec: &Recorder, ep: &mut SimEpisode, realtime: bool, start_ns: i64) -> anyhow::Result<u64> {
    let wall0 = Instant::now();
    let mut dropped = 0u64;
    for m in ep.by_ref() {
        let outcome = if realtime {
            let due = Duration::from_nanos((m.recv_ns - start_ns).max(0) as u64);
            if let Some(wait) = due.checked_sub(wall0.elapsed()) {
                std::thread::sleep(wait);
            }
            rec.push(&m.topic, m.type_name, m.cdr, m.stamp_ns, m.recv_ns)
        } else {
            rec.push_wait(&m.topic, m.type_name, m.cdr, m.stamp_ns, m.recv_ns)
        };
        match outcome {
            PushOutcome::Queued => {}
            PushOutcome::Dropped => dropped += 1,
            PushOutcome::NotRecording | PushOutcome::UnknownTopic => {
                let st = rec.status();
                bail!("recording stopped: {}", st.error.unwrap_or_else(|| "episode no longer recording".into()));
            }
        }
    }
    Ok(dropped)
}
