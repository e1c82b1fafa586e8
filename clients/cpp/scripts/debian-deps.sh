#!/bin/sh
# Installs the packages of a lock file (lines PACKAGE=VERSION) that are not installed yet,
# at the locked versions. Checks with dpkg-query first, so a warm run costs milliseconds and
# never touches apt. A package installed at another version is kept, with a note.
set -eu
lock=${1:?usage: debian-deps.sh LOCKFILE}
missing=""
for spec in $(grep -v '^[[:space:]]*#' "$lock"); do
  pkg=${spec%%=*}
  want=${spec#*=}
  have=$(dpkg-query -W -f='${db:Status-Status} ${Version}' "$pkg" 2>/dev/null || true)
  case "$have" in
    "installed $want") ;;
    installed\ *) echo "note: $pkg ${have#installed } is installed; $lock pins $want" >&2 ;;
    *) missing="$missing $spec" ;;
  esac
done
[ -z "$missing" ] && exit 0
echo "installing Debian packages:$missing"
sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo
# Other builds may be running apt at the same time: wait for the dpkg lock, not fail.
$sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
$sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
  --no-install-recommends $missing
