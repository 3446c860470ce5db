# Sourced by the install scripts (scripts/install_ffmpeg.sh, scripts/slurm/install_deps.sh).
#
#   apt_install_locked NAME PACKAGE...
#
# installs the packages with apt-get under an exclusive lock named NAME (several processes, e.g.
# parallel test sessions, may get here together), after checking once more, with the lock held,
# that the caller's own `missing` function still says so. Returns apt-get's status.
apt_install_locked() {
    local name=$1 lockdir=/var/lock
    shift
    export DEBIAN_FRONTEND=noninteractive
    [[ -d "$lockdir" && -w "$lockdir" ]] || lockdir=/tmp
    exec 9>"$lockdir/videoflash-$name-install.lock"
    flock -w 900 9
    missing || return 0
    echo "installing $* with apt-get ..."
    { apt-get update -qq || apt-get update; } >/dev/null 2>&1
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 \
        || apt-get install -y --no-install-recommends "$@"
}
