# Source it (bash): the ROS 2 environment for this package, the wheels' counterpart of
# `source /opt/ros/jazzy/setup.bash && source install/setup.bash`.
#   source scripts/ros_env.sh
# With a ROS 2 already sourced (ROS_DISTRO set, e.g. an apt install) it only adds the venv
# (libtorch, colcon) and this workspace's install/. Otherwise ROS 2 Jazzy comes from the venv's
# ros-jazzy-* wheels, installed and repaired by scripts/ros_install.sh (`make ros`).
_vla_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_vla_venv=${VLA_VENV:-$_vla_root/.venv}
if [ -z "${ROS_DISTRO:-}" ] || [ "${VLA_ROS_FROM_WHEELS:-}" = 1 ]; then
  export VLA_ROS_FROM_WHEELS=1 ROS_DISTRO=jazzy ROS_VERSION=2 ROS_PYTHON_VERSION=3
  case ":${AMENT_PREFIX_PATH:-}:" in *":$_vla_venv:"*) ;; *) export AMENT_PREFIX_PATH=$_vla_venv${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH} ;; esac
  case ":${CMAKE_PREFIX_PATH:-}:" in *":$_vla_venv:"*) ;; *) export CMAKE_PREFIX_PATH=$_vla_venv${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH} ;; esac
  # The wheels' libraries sit in <venv>/lib, the libraries they bundle in site-packages/ros_*.libs
  # (their rpath $ORIGIN/../../../ros_*.libs only resolves from site-packages), and the
  # generator_py libraries need libpython (scripts/ros_install.sh): all three on the path.
  _vla_libs=$_vla_venv/lib
  for _d in "$_vla_venv"/lib/python3*/site-packages/ros_*.libs; do _vla_libs=$_vla_libs:$_d; done
  _vla_libs=$_vla_libs:$("$_vla_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
  case ":${LD_LIBRARY_PATH:-}:" in *":$_vla_venv/lib:"*) ;; *) export LD_LIBRARY_PATH=$_vla_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ;; esac
  unset _d _vla_libs
fi
case ":$PATH:" in *":$_vla_venv/bin:"*) ;; *) export PATH=$_vla_venv/bin:$PATH ;; esac
# r2r generates Rust types for these interface packages only (and the ones r2r itself needs;
# action_msgs and unique_identifier_msgs for the FineTune action).
export IDL_PACKAGE_FILTER=${IDL_PACKAGE_FILTER:-std_msgs;std_srvs;sensor_msgs;geometry_msgs;rosgraph_msgs;action_msgs;unique_identifier_msgs;vla_finetune_msgs}
# libtorch for tch comes from the venv's torch wheel.
export LIBTORCH_USE_PYTORCH=1
# Camera images are larger than Fast DDS's default shared-memory segment (512 KB) and get lost
# best effort; the package's profile enlarges it (config/fastdds.xml). Set your own to override.
export FASTRTPS_DEFAULT_PROFILES_FILE=${FASTRTPS_DEFAULT_PROFILES_FILE:-$_vla_root/config/fastdds.xml}
# colcon's setup.sh reads unset variables: source it without `set -u`.
if [ -f "$_vla_root/install/setup.sh" ]; then
  case $- in *u*) set +u; . "$_vla_root/install/setup.sh"; set -u ;; *) . "$_vla_root/install/setup.sh" ;; esac
fi
unset _vla_root _vla_venv
