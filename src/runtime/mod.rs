//! The policy runtime (ROS-free): control loop at a fixed rate, latest inputs with staleness guards, background VL refresh, verified hot-swap with roll-back.
