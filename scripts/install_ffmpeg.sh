#!/usr/bin/env bash
# Install the FFmpeg shared libraries that torchcodec (the default video decoder) loads.
#
#   scripts/install_ffmpeg.sh          # installs when missing; a no-op when present
#   scripts/install_ffmpeg.sh --check  # exit 0 when present, 1 when not (installs nothing)
#
# torchcodec's wheels carry no FFmpeg: they load the system's libavcodec/libavformat/libavutil/
# libswscale/libavfilter/libavdevice (FFmpeg 4 to 8). Without them videoflash decodes with decord
# (data.video_backend=auto falls back, about half the frames per second; docs/PERFORMANCE.md).
# Needs root (apt-get) only when something is missing. Idempotent: `make venv` calls it on every
# install when it runs as root; never fails the build (exit 0 with a one-line notice instead), except
# with --check.
set -uo pipefail

libs=(libavcodec libavformat libavutil libswscale libavfilter libavdevice libswresample)

missing() {
    # the linker cache read once (grep -q on a pipe may end it early: with pipefail, a false "missing")
    local l cache
    cache=$(ldconfig -p 2>/dev/null)
    for l in "${libs[@]}"; do
        grep -q "${l}\.so\.[0-9]" <<<"$cache" || return 0
    done
    return 1
}

if ! missing; then
    echo "FFmpeg libraries present ($(ldconfig -p | grep -o 'libavcodec\.so\.[0-9]*' | head -1))"
    exit 0
fi
if [[ "${1:-}" == "--check" ]]; then
    echo "FFmpeg libraries missing" >&2
    exit 1
fi
notice() { echo "notice: $1; videos will decode with decord (slower): install FFmpeg's libraries (apt-get install ffmpeg) for torchcodec" >&2; exit 0; }
[[ "$(id -u)" == 0 ]] || notice "the FFmpeg libraries are missing and this is not root"
command -v apt-get >/dev/null 2>&1 || notice "the FFmpeg libraries are missing and there is no apt-get"

source "$(dirname "$0")/apt_install.sh"
apt_install_locked ffmpeg ffmpeg || notice "apt-get install ffmpeg failed"
missing && notice "the install finished but FFmpeg libraries are still missing"
echo "FFmpeg libraries installed ($(ldconfig -p | grep -o 'libavcodec\.so\.[0-9]*' | head -1))"
