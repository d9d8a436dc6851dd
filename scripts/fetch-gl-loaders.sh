#!/usr/bin/env bash
# Downloads the Vulkan loader (and the GL dispatch libraries beside it) as
# amd64 .deb files into .gl/, for a GPU machine that has the NVIDIA driver
# but no loader. scripts/gpu-check.sh unpacks them there; carry .gl with the
# working tree. Run once, as root, on the build machine (it needs the
# network; the packages are this machine's distribution's, Debian 12 here,
# whose glibc the GPU machine must have at least).
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.gl/' "$exclude" 2>/dev/null || echo /.gl/ >>"$exclude"
mkdir -p .gl /tmp/granary-apt-amd64/partial
apt_opts=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64
    -oDir::State::Lists=/tmp/granary-apt-amd64)
apt-get "${apt_opts[@]}" update -qq
(cd .gl && apt-get "${apt_opts[@]}" download -qq libvulkan1 libegl1 libglvnd0 libopengl0 \
    libgl1 libglx0 libgles2)
ls .gl
