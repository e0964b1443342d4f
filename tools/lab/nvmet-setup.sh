#!/bin/sh
# Configures the guest kernel's NVMe/TCP target (nvmet-tcp) through configfs:
#   nvmet-setup.sh NQN PORT [SIZE_MB]   one subsystem (any host), namespace 1 on a memory-backed
#                                       null_blk device, listening on 0.0.0.0:PORT (discovery too)
#   nvmet-setup.sh --clear              remove what the above made
set -eu
CFG=/sys/kernel/config/nvmet
if [ "${1:-}" = "--clear" ]; then
    for link in "$CFG"/ports/*/subsystems/*; do [ -L "$link" ] && rm "$link"; done
    for ns in "$CFG"/subsystems/*/namespaces/*; do [ -d "$ns" ] && echo 0 > "$ns/enable" && rmdir "$ns"; done
    for s in "$CFG"/subsystems/*; do [ -d "$s" ] && rmdir "$s"; done
    for p in "$CFG"/ports/*; do [ -d "$p" ] && rmdir "$p"; done
    exit 0
fi
nqn=$1
port=$2
size_mb=${3:-64}
modprobe null_blk nr_devices=1 memory_backed=1 gb=1 bs=512
modprobe nvmet
modprobe nvmet_tcp
[ -d "$CFG" ] || mount -t configfs configfs /sys/kernel/config
sub="$CFG/subsystems/$nqn"
mkdir "$sub"
echo 1 > "$sub/attr_allow_any_host"
mkdir "$sub/namespaces/1"
echo /dev/nullb0 > "$sub/namespaces/1/device_path"
echo 1 > "$sub/namespaces/1/enable"
p="$CFG/ports/1"
mkdir "$p"
echo tcp > "$p/addr_trtype"
echo ipv4 > "$p/addr_adrfam"
echo 0.0.0.0 > "$p/addr_traddr"
echo "$port" > "$p/addr_trsvcid"
ln -s "$sub" "$p/subsystems/$nqn"
echo "nvmet: $nqn on tcp port $port, namespace 1 = /dev/nullb0 ($size_mb MiB used by tests)"
