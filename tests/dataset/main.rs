//! Recording, rosbag2 and LeRobot import, alignment, compile and episode selection; the simulated robot.

mod align;
mod compile;
mod import_rosbag;
mod lerobot_interop;
mod recorder_bad_input;
mod recorder_crash;
mod recorder_roundtrip;
mod selection;
mod sim_robot;
