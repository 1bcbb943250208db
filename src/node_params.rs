//! The parameters each ROS node declares, with types and defaults, kept ROS-free so launch and
//! config files can be checked against them without ROS (tests/cli/launch_config.rs) and the nodes
//! declare exactly these.

use serde_json::{json, Value};

/// The type of a ROS parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// `string`
    String,
    /// `integer`
    Integer,
    /// `double`
    Double,
    /// `bool`
    Bool,
}

impl ParamKind {
    /// The ROS name of the type (as `ros2 param describe` says it).
    pub fn ros_name(self) -> &'static str {
        match self {
            ParamKind::String => "string",
            ParamKind::Integer => "integer",
            ParamKind::Double => "double",
            ParamKind::Bool => "bool",
        }
    }

    /// Whether a YAML/launch value of this JSON shape fits the type.
    pub fn accepts(self, v: &Value) -> bool {
        match self {
            ParamKind::String => v.is_string(),
            ParamKind::Integer => v.is_i64() || v.is_u64(),
            ParamKind::Double => v.is_number(),
            ParamKind::Bool => v.is_boolean(),
        }
    }
}

/// One declared parameter.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    /// Parameter name.
    pub name: &'static str,
    /// Its type.
    pub kind: ParamKind,
    /// Default value.
    pub default: Value,
    /// What it does.
    pub description: &'static str,
}

fn p(name: &'static str, kind: ParamKind, default: Value, description: &'static str) -> ParamSpec {
    ParamSpec { name, kind, default, description }
}

/// Executables of the ROS nodes (cargo binaries of this package).
pub const NODE_EXECUTABLES: [&str; 4] = ["collector_node", "trainer_node", "policy_node", "sim_robot_node"];

/// Declared parameters of the node run by `executable`, or None for an unknown executable. Every
/// node also has rcl's `use_sim_time`, as every rclcpp node does.
pub fn declared(executable: &str) -> Option<Vec<ParamSpec>> {
    use ParamKind::*;
    let mut params = match executable {
        "collector_node" => vec![
            p("dataset_root", String, json!("vla_data"), "Folder where episodes are recorded (episodes/<id>/)."),
            p("streams_config", String, json!("config/streams_sim.yaml"), "Stream mapping YAML: topics -> cameras, sensors, state, command (relative: the package's share folder first)."),
            p("queue_capacity", Integer, json!(4096), "Messages buffered before drops are counted."),
            p("status_rate_hz", Double, json!(1.0), "Rate of ~/status."),
            p("stop_drain_s", Double, json!(1.0), "On StopEpisode, wait up to this long for messages stamped before the stop that are still in flight."),
        ],
        "trainer_node" => vec![
            p("base_model", String, json!(""), "Default base VL model folder (Hugging Face layout)."),
            p("runs_root", String, json!("vla_runs"), "Folder for job state, logs and plots."),
            p("checkpoints_root", String, json!("vla_checkpoints"), "Folder of published checkpoints."),
            p("train_config", String, json!(""), "Stage 2 training config YAML (relative: the package's share folder first); empty = built-in config/train.yaml."),
            p("compile_config", String, json!(""), "How StartFineTune compiles an episodes root: a compile config YAML like config/compile.yaml (relative: the package's share folder first); empty = its defaults."),
            p("vram_preset", String, json!("auto"), "Stage 2 memory.preset: 12gb, 24gb, 40gb, 80gb, manual or auto (free accelerator memory; CPU-sized on a CPU)."),
            p("device", String, json!("auto"), "Stage 2 run.device: auto, cpu, cuda or cuda:N."),
            p("progress_rate_hz", Double, json!(2.0), "Maximum rate of ~/progress."),
            p("nproc_per_node", Integer, json!(1), "Stage 2 as this many data-parallel ranks on this computer (torchrun on loopback, one per GPU on CUDA; rank 0's progress relayed); 1 = in the node's process."),
            p("job_nice", Integer, json!(10), "Nice value added to the training thread, so that the policy node's control loop on the same computer keeps the CPU (0 = unchanged)."),
            p("shutdown_grace_s", Double, json!(4.0), "On SIGINT/SIGTERM, how long a cancelled job may take to save its state."),
        ],
        "policy_node" => vec![
            p("checkpoint", String, json!(""), "Checkpoint folder to start with (a checkpoints root or its `latest`: the version it names); empty = wait for ~/checkpoint."),
            p("checkpoints_dir", String, json!(""), "Also watch this folder's `latest` for new checkpoints."),
            p("base_model", String, json!(""), "Base VL model folder the checkpoints' adapters belong to."),
            p("streams_config", String, json!("config/streams_sim.yaml"), "Stream mapping YAML, same as the collector's (relative: the package's share folder first)."),
            p("control_rate_hz", Double, json!(10.0), "Control loop rate."),
            p("vl_refresh_ticks", Integer, json!(4), "Recompute VL features every N control ticks."),
            p("ddim_steps", Integer, json!(10), "DDIM sampling steps per action chunk."),
            p("max_camera_age_s", Double, json!(0.5), "Older camera input counts as stale."),
            p("max_sensor_age_s", Double, json!(0.1), "Older sensor input counts as stale."),
            p("stale_behavior", String, json!("none"), "On stale input: none (publish nothing) or hold."),
            p("sensor_window", Integer, json!(0), "Sensor samples per window; 0 = from the checkpoint (a set value rejects checkpoints that differ)."),
            p("horizon", Integer, json!(0), "Action steps per chunk; 0 = from the checkpoint."),
            p("action_dim", Integer, json!(0), "Values per action step; 0 = from the checkpoint."),
            p("instruction", String, json!(""), "Language instruction given to the policy (settable at run time)."),
            p("start_enabled", Bool, json!(false), "Publish actions from the start; false = none until ~/enable is called with true."),
            p("pinned_version", String, json!(""), "Set at run time to a loaded version (active or previous) to keep it active; empty = follow announcements."),
            p("target_output", String, json!("none"), "Also publish the first action as: none, twist or pose."),
            p("device", String, json!("auto"), "auto, cpu, cuda or cuda:N."),
            p("dtype", String, json!("auto"), "VL model dtype: auto (bf16 on CUDA, f32 on the CPU), f32 or bf16."),
        ],
        "sim_robot_node" => vec![
            p("seed", Integer, json!(0), "Scene and noise seed."),
            p("cameras", Integer, json!(2), "Number of camera views."),
            p("image_width", Integer, json!(640), "Camera image width."),
            p("image_height", Integer, json!(360), "Camera image height."),
            p("camera_rate_hz", Double, json!(10.0), "Camera frame rate."),
            p("sensor_rate_hz", Double, json!(650.0), "Tactile/OCT sensor sample rate."),
            p("pose_rate_hz", Double, json!(100.0), "Robot pose rate."),
            p("episode_seconds", Double, json!(10.0), "Length of each simulated episode (scene redrawn after it)."),
            p("published_log", String, json!(""), "Append `<topic> <stamp_ns>` per published message to this file (tests); empty = off."),
            p("truth_log", String, json!(""), "Append the simulator's ground truth (sim::truth::EpisodeTruth, JSON) per published episode to this file, its span on the node clock (tests, oracle; never a policy input); empty = off."),
        ],
        _ => return None,
    };
    params.push(p(
        "use_sim_time",
        Bool,
        json!(false),
        "Node clock from the /clock topic (simulated time) for stamps, schedules and staleness.",
    ));
    Some(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_have_their_declared_type_and_names_are_unique() {
        for exe in NODE_EXECUTABLES {
            let params = declared(exe).unwrap();
            let mut names: Vec<_> = params.iter().map(|p| p.name).collect();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), params.len(), "{exe}: duplicate parameter");
            for p in params {
                assert!(p.kind.accepts(&p.default), "{exe}.{}: default {:?} is not {:?}", p.name, p.default, p.kind);
            }
        }
        assert!(declared("nope").is_none());
    }
}
