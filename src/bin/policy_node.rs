//! ROS 2 node entry point (feature `ros`); the node lives in `vla_finetune::ros::policy`.

fn main() -> anyhow::Result<()> {
    vla_finetune::ros::policy::main()
}
