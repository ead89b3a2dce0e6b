#!/bin/sh
# Install usbip-hotplug's systemd units, udev rule and example configuration.
#
#   contrib/install.sh [--prefix DIR] [--bindir DIR] [--no-reload]
#
#   --prefix DIR   install below DIR instead of / (packaging, or a look first)
#   --bindir DIR   where the usbip-hotplug and usbipa programs are; written into
#                  the units' ExecStart. Default: found on PATH, else /usr/local/bin
#   --no-reload    do not run `systemctl daemon-reload` / `udevadm control --reload`
#
# Run it from a checkout, as root, after installing the Python package
# (`pip install .`). It installs
#   PREFIX/usr/local/lib/systemd/system/usbip-hotplug.service, usbipa.service
#   PREFIX/etc/udev/rules.d/90-usbip-hotplug.rules
#   PREFIX/etc/usbip-hotplug/policy.yaml.example, usbipa.yaml.example
#   PREFIX/usr/local/share/man/man5, man8: the man pages (when scdoc is there)
#   PREFIX/usr/local/share/bash-completion/completions/usbip-hotplug, usbipa
#   PREFIX/usr/local/share/zsh/site-functions/_usbip-hotplug, _usbipa
# Units, rule and examples are ours and are replaced on every run. Your
# configuration is never touched: /etc/usbip-hotplug/policy.yaml, policy.d/
# and usbipa.yaml are not created or overwritten (the examples exist to be
# copied; without a policy the daemon exports nothing, without a usbipa.yaml
# usbipa refuses every export). Override unit settings with
# `systemctl edit usbip-hotplug` rather than editing the installed files.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
prefix=/
bindir=
reload=yes

while [ $# -gt 0 ]; do
    case $1 in
        --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
        --bindir) bindir=${2:?--bindir needs a directory}; shift 2 ;;
        --no-reload) reload=no; shift ;;
        -h|--help) sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

if [ -z "$bindir" ]; then
    if found=$(command -v usbip-hotplug 2>/dev/null); then
        bindir=$(dirname "$found")
    else
        bindir=/usr/local/bin
    fi
fi
case $bindir in
    /home/*|/root/*)
        echo "install.sh: warning: $bindir is under /home or /root, which the units'" \
             "ProtectHome=yes hides from the services; install the package system-wide" >&2 ;;
esac

root=${prefix%/}
unitdir=$root/usr/local/lib/systemd/system
rulesdir=$root/etc/udev/rules.d
confdir=$root/etc/usbip-hotplug

put() {  # put SOURCE DEST MODE: replace DEST, say so
    install -D -m "$3" "$1" "$2"
    echo "installed $2"
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for unit in usbip-hotplug.service usbipa.service; do
    sed -e "s|/usr/bin/usbip-hotplug|$bindir/usbip-hotplug|g" \
        -e "s|/usr/bin/usbipa|$bindir/usbipa|g" \
        "$here/systemd/$unit" > "$tmp/$unit"
    put "$tmp/$unit" "$unitdir/$unit" 0644
done
put "$here/rules/90-usbip-hotplug.rules" "$rulesdir/90-usbip-hotplug.rules" 0644
put "$here/config/policy.yaml" "$confdir/policy.yaml.example" 0644
put "$here/config/usbipa.yaml" "$confdir/usbipa.yaml.example" 0644
if command -v scdoc >/dev/null 2>&1; then
    "$here/scripts/build-man" "$tmp/man" >/dev/null
    for page in "$tmp"/man/*; do
        section=${page##*.}
        put "$page" "$root/usr/local/share/man/man$section/$(basename "$page")" 0644
    done
else
    echo "install.sh: scdoc not found (apt-get install scdoc): man pages not installed" >&2
fi
for program in usbip-hotplug usbipa; do
    put "$here/completion/$program" "$root/usr/local/share/bash-completion/completions/$program" 0644
    put "$here/completion/_$program" "$root/usr/local/share/zsh/site-functions/_$program" 0644
done
for config in policy.yaml usbipa.yaml; do
    if [ -e "$confdir/$config" ]; then
        echo "kept your $confdir/$config"
    fi
done

if [ "$reload" = yes ] && [ "$root" = "" ]; then
    systemctl daemon-reload 2>/dev/null || echo "install.sh: systemctl daemon-reload failed" >&2
    udevadm control --reload 2>/dev/null || echo "install.sh: udevadm control --reload failed" >&2
fi

cat <<NEXT

Next steps:
  device side:       write $confdir/policy.yaml (see policy.yaml.example), then
                     usbip-hotplug check && systemctl enable --now usbip-hotplug
  application side:  write $confdir/usbipa.yaml (see usbipa.yaml.example), then
                     systemctl enable --now usbipa
NEXT
