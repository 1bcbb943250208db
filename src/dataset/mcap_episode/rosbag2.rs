//! The rosbag2 `metadata.yaml` beside an episode's MCAP file, so `ros2 bag info/play` open it.

use std::path::Path;

use serde::Serialize;

use super::*;

#[derive(Serialize)]
struct Nanos {
    nanoseconds: i64,
}
#[derive(Serialize)]
struct SinceEpoch {
    nanoseconds_since_epoch: i64,
}
#[derive(Serialize)]
struct TopicMetadata {
    name: String,
    #[serde(rename = "type")]
    type_name: String,
    serialization_format: String,
    offered_qos_profiles: String,
}
#[derive(Serialize)]
struct TopicWithCount {
    topic_metadata: TopicMetadata,
    message_count: u64,
}
#[derive(Serialize)]
struct FileInfo {
    path: String,
    starting_time: SinceEpoch,
    duration: Nanos,
    message_count: u64,
}
#[derive(Serialize)]
struct BagInfo {
    version: u32,
    storage_identifier: String,
    duration: Nanos,
    starting_time: SinceEpoch,
    message_count: u64,
    topics_with_message_count: Vec<TopicWithCount>,
    compression_format: String,
    compression_mode: String,
    relative_file_paths: Vec<String>,
    files: Vec<FileInfo>,
}
#[derive(Serialize)]
struct MetadataFile {
    rosbag2_bagfile_information: BagInfo,
}

/// Writes a rosbag2 (version 5) `metadata.yaml` describing one MCAP file in `dir`.
pub fn write_rosbag2_metadata(
    dir: &Path,
    file_name: &str,
    counts: &[TopicCount],
    start_ns: i64,
    end_ns: i64,
) -> Result<(), EpisodeError> {
    let total: u64 = counts.iter().map(|c| c.count).sum();
    let duration = (end_ns - start_ns).max(0);
    let info = MetadataFile {
        rosbag2_bagfile_information: BagInfo {
            version: 5,
            storage_identifier: "mcap".into(),
            duration: Nanos { nanoseconds: duration },
            starting_time: SinceEpoch { nanoseconds_since_epoch: start_ns },
            message_count: total,
            topics_with_message_count: counts
                .iter()
                .map(|c| TopicWithCount {
                    topic_metadata: TopicMetadata {
                        name: c.topic.clone(),
                        type_name: c.type_name.clone(),
                        serialization_format: "cdr".into(),
                        offered_qos_profiles: QOS_PROFILE.into(),
                    },
                    message_count: c.count,
                })
                .collect(),
            compression_format: String::new(),
            compression_mode: String::new(),
            relative_file_paths: vec![file_name.into()],
            files: vec![FileInfo {
                path: file_name.into(),
                starting_time: SinceEpoch { nanoseconds_since_epoch: start_ns },
                duration: Nanos { nanoseconds: duration },
                message_count: total,
            }],
        },
    };
    write_atomic(&dir.join(ROSBAG2_METADATA), serde_yaml::to_string(&info).expect("metadata serializes").as_bytes())
}
