# Shared by scripts/install-*.sh (sourced, not run): root or sudo, then Debian's apt-get.
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib/apt.sh"
#   apt_use_root NAME "what is missing" "what to install by hand"   # sets SUDO=() or (sudo)
#   apt_install NAME "why the packages are needed" PACKAGE...       # update, then install
#
# Each failure is one line on stderr naming the script and what the tests or build need, and
# exits 1.

# SUDO=() as root, (sudo) when sudo exists; otherwise say what to install by hand and exit 1.
apt_use_root() {
    local name=$1 missing=$2 by_hand=$3
    if [[ "$(id -u)" -eq 0 ]]; then
        SUDO=()
    elif command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        echo "$name: $missing and this is not root (no sudo either); install $by_hand by hand" >&2
        exit 1
    fi
}

# apt-get update, then install PACKAGE... without recommends (nothing interactive).
apt_install() {
    local name=$1 need=$2
    shift 2
    # Through env: sudo would drop an exported DEBIAN_FRONTEND.
    if ! "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q; then
        echo "$name: 'apt-get update' failed; $need" >&2
        exit 1
    fi
    if ! "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends "$@"; then
        echo "$name: 'apt-get install $*' failed; $need" >&2
        exit 1
    fi
}
