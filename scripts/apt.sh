# Sourced by setup.sh and fuzz.sh: apt_install_missing <who> <package>...: installs, with apt,
# those of the Debian packages that are not installed yet (nothing when all are), saying so as
# "<who>: installing ...".
apt_install_missing() {
  local who=$1 package sudo=""
  shift
  local missing=()
  for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
      missing+=("$package")
  done
  ((${#missing[@]})) || return 0
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  echo "$who: installing ${missing[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}" >/dev/null
}
