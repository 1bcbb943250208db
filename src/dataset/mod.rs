//! Recording (MCAP episodes), rosbag2 import, alignment into training samples, statistics and the reader.

pub mod episode;
pub mod cdr;
pub mod import;
pub mod mcap_episode;
pub mod recorder;
pub mod recovery;
pub mod streams;
