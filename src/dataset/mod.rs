//! Recording (MCAP episodes), rosbag2 import, alignment into training samples, statistics, the
//! reader, and LeRobot v3.0 export and import.

pub mod align;
pub mod cdr;
pub mod compile;
pub mod episode;
pub mod gaps;
pub mod import;
pub mod incremental;
pub mod lerobot;
pub mod mcap_episode;
pub mod reader;
pub mod recorder;
pub mod recovery;
pub mod rng;
pub mod selection;
pub mod stats;
pub mod store;
pub mod streams;
