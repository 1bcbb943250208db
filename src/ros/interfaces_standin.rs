//! Compile-only stand-ins for `vla_finetune_msgs` under r2r's `doc-only` feature (no ROS 2, so
//! nothing here is ever linked into a running node). Field names and types mirror `msg/msg/*.msg`
//! and `msg/srv/*.srv` exactly as r2r would generate them; `tests/ros_interfaces.rs` checks it.

/// Why every stand-in trait body is unreachable.
macro_rules! not_linked {
    () => {
        unreachable!("vla_finetune_msgs stand-in: only compiled under r2r doc-only, never run")
    };
}

/// Implements r2r's message trait for stand-ins; every body is unreachable by construction.
macro_rules! standin_message {
    ($($t:ty),* $(,)?) => {$(
        impl r2r::WrappedTypesupport for $t {
            type CStruct = ();
            fn get_ts() -> &'static r2r_rcl::rosidl_message_type_support_t { not_linked!() }
            fn create_msg() -> *mut () { not_linked!() }
            fn destroy_msg(_msg: *mut ()) { not_linked!() }
            fn from_native(_msg: &()) -> Self { not_linked!() }
            fn copy_to_native(&self, _msg: &mut ()) { not_linked!() }
        }
    )*};
}

/// Implements r2r's service trait for the `Service` of a stand-in service module and the
/// message trait for its `Request` and `Response`.
macro_rules! standin_service {
    () => {
        /// The service type r2r servers and clients are parameterized with.
        #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        pub struct Service();
        impl r2r::WrappedServiceTypeSupport for Service {
            type Request = Request;
            type Response = Response;
            fn get_ts() -> &'static r2r_rcl::rosidl_service_type_support_t { not_linked!() }
        }
        standin_message!(Request, Response);
    };
}

/// Message stand-ins.
pub mod msg {
    use r2r::builtin_interfaces::msg::Time;
    use r2r::std_msgs::msg::Header;
    use serde::{Deserialize, Serialize};

    /// See msg/msg/TrainingProgress.msg.
    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default)]
    pub struct TrainingProgress {
        pub stamp: Time,
        pub job_id: String,
        pub phase: String,
        pub epoch: u32,
        pub total_epochs: u32,
        pub step: u64,
        pub total_steps: u64,
        pub loss: f32,
        pub lr: f32,
        pub samples_per_second: f32,
        pub data_time_s: f32,
        pub compute_time_s: f32,
        pub peak_accel_bytes: u64,
        pub peak_host_bytes: u64,
        pub cache_mode: String,
        pub cache_state: String,
        pub cache_hit_rate: f32,
        pub cache_drift: f32,
        pub eta_s: f32,
        pub message: String,
    }

    /// See msg/msg/CheckpointInfo.msg.
    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default)]
    pub struct CheckpointInfo {
        pub stamp: Time,
        pub version: String,
        pub path: String,
        pub manifest_sha256: String,
        pub base_model_id: String,
        pub job_id: String,
        pub epoch: u32,
        pub step: u64,
        pub val_loss: f32,
        pub val_action_error: Vec<f32>,
        pub val_action_error_names: Vec<String>,
    }

    /// See msg/msg/SensorFrame.msg.
    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default)]
    pub struct SensorFrame {
        pub header: Header,
        pub values: Vec<f32>,
        pub channels: u32,
        pub layout: String,
    }

    /// See msg/msg/ActionChunk.msg.
    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default)]
    pub struct ActionChunk {
        pub header: Header,
        pub checkpoint_version: String,
        pub horizon: u32,
        pub action_dim: u32,
        pub step_period_s: f32,
        pub values: Vec<f32>,
    }

    /// See msg/msg/PolicyStatus.msg.
    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default)]
    pub struct PolicyStatus {
        pub stamp: Time,
        pub active_version: String,
        pub previous_version: String,
        pub acting: bool,
        pub stale_inputs: Vec<String>,
        pub ticks: u64,
        pub missed_ticks: u64,
        pub last_tick_ms: f32,
        pub message: String,
    }

    /// See msg/msg/CollectorStatus.msg.
    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default)]
    pub struct CollectorStatus {
        pub stamp: Time,
        pub recording: bool,
        pub episode_id: String,
        pub topics: Vec<String>,
        pub received: Vec<u64>,
        pub written: Vec<u64>,
        pub dropped: Vec<u64>,
        pub bytes_written: u64,
        pub error: String,
    }

    standin_message!(TrainingProgress, CheckpointInfo, SensorFrame, ActionChunk, PolicyStatus, CollectorStatus);
}

/// Service stand-ins.
pub mod srv {
    /// See msg/srv/StartFineTune.srv.
    #[allow(non_snake_case)]
    pub mod StartFineTune {
        use serde::{Deserialize, Serialize};
        #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
        #[serde(default)]
        pub struct Request {
            pub dataset: String,
            pub stage1_checkpoint: String,
            pub base_model: String,
            pub overrides: String,
        }
        #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
        #[serde(default)]
        pub struct Response {
            pub accepted: bool,
            pub job_id: String,
            pub reason: String,
        }
        standin_service!();
    }

    /// See msg/srv/CancelFineTune.srv.
    #[allow(non_snake_case)]
    pub mod CancelFineTune {
        use serde::{Deserialize, Serialize};
        #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
        #[serde(default)]
        pub struct Request {
            pub job_id: String,
        }
        #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
        #[serde(default)]
        pub struct Response {
            pub cancelled: bool,
            pub reason: String,
        }
        standin_service!();
    }

    /// See msg/srv/StartEpisode.srv.
    #[allow(non_snake_case)]
    pub mod StartEpisode {
        use serde::{Deserialize, Serialize};
        #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
        #[serde(default)]
        pub struct Request {
            pub instruction: String,
            pub task: String,
            pub operator: String,
        }
        #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
        #[serde(default)]
        pub struct Response {
            pub started: bool,
            pub episode_id: String,
            pub reason: String,
        }
        standin_service!();
    }

    /// See msg/srv/StopEpisode.srv.
    #[allow(non_snake_case)]
    pub mod StopEpisode {
        use serde::{Deserialize, Serialize};
        #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
        #[serde(default)]
        pub struct Request {
            pub outcome: String,
        }
        #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
        #[serde(default)]
        pub struct Response {
            pub stopped: bool,
            pub episode_id: String,
            pub messages: u64,
            pub reason: String,
        }
        standin_service!();
    }
}
