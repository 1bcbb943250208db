//! Recording (MCAP episodes), rosbag2 import, alignment into training samples, statistics and the reader.

pub mod episode;
