#!/usr/bin/env bash
# Downloads the Vulkan loader (and the GL dispatch libraries beside it) as
# amd64 .deb files into .gl/, for a GPU machine that has the NVIDIA driver
# but no loader. scripts/gpu-check.sh unpacks them there; carry .gl with the
# working tree. Run once, on the build machine (it needs the network).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gl/' .git/info/exclude 2>/dev/null || echo /.gl/ >>.git/info/exclude
mkdir -p .gl /tmp/granary-apt-amd64/partial
apt_opts=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64
    -oDir::State::Lists=/tmp/granary-apt-amd64)
apt-get "${apt_opts[@]}" update -qq
(cd .gl && apt-get "${apt_opts[@]}" download -qq libvulkan1 libegl1 libglvnd0 libopengl0 \
    libgl1 libglx0 libgles2)
ls .gl
