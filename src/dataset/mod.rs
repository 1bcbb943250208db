//! Recording (MCAP episodes), rosbag2 import, alignment into training samples, statistics and the reader.

pub mod episode;
pub mod align;
pub mod compile;
pub mod reader;
pub mod rng;
pub mod stats;
pub mod store;
