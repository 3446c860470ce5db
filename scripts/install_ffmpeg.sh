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
    local l
    for l in "${libs[@]}"; do
        ldconfig -p 2>/dev/null | grep -q "${l}\.so\.[0-9]" || return 0
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

export DEBIAN_FRONTEND=noninteractive
# Several processes (parallel sessions) may get here together: serialize on a lock.
lockdir=/var/lock
[[ -d "$lockdir" && -w "$lockdir" ]] || lockdir=/tmp
exec 9>"$lockdir/videoflash-ffmpeg-install.lock"
flock -w 900 9
if missing; then
    echo "installing FFmpeg's libraries with apt-get (for torchcodec) ..."
    { apt-get update -qq || apt-get update; } >/dev/null 2>&1
    apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null 2>&1 \
        || apt-get install -y --no-install-recommends ffmpeg || notice "apt-get install ffmpeg failed"
fi
missing && notice "the install finished but FFmpeg libraries are still missing"
echo "FFmpeg libraries installed ($(ldconfig -p | grep -o 'libavcodec\.so\.[0-9]*' | head -1))"
