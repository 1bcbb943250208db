#!/usr/bin/env bash
# Gloo's C++ headers for csrc/dist_shim.cpp (torch.distributed's Gloo process group): the torch
# wheel ships ProcessGroupGloo.hpp and the compiled Gloo inside libtorch_cpu, but not the
# gloo/*.h headers it includes. Debian's libgloo-dev (headers only, BSD) is enough to compile
# against; it is unpacked into <venv>/gloo, where build.rs finds it. With an apt ROS 2,
# `apt-get install libgloo-dev` does the same (build.rs also looks in /usr/include).
set -euo pipefail
venv=${1:?usage: gloo_headers.sh VENV}
deb=libgloo-dev_0.0~git20220518.5b14351-3_amd64.deb
sha=80529c9fd8af452faf489e686b94bf87075965c40673803810c4f41634b1e299
dest=$venv/gloo
[ -f "$dest/usr/include/gloo/algorithm.h" ] && exit 0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
curl -sSfL --retry 3 -o "$tmp/$deb" "http://deb.debian.org/debian/pool/main/g/gloo/$deb"
echo "$sha  $tmp/$deb" | sha256sum -c --quiet -
rm -rf "$dest"
dpkg-deb -x "$tmp/$deb" "$dest"
touch "$dest/usr/include/gloo/algorithm.h"  # the Makefile's stamp
echo "Gloo headers in $dest/usr/include"
