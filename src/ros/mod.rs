//! ROS 2 adapters (r2r): message <-> core type conversion and the nodes. No logic lives here.
pub fn _probe() -> r2r::std_msgs::msg::String { r2r::std_msgs::msg::String::default() }
