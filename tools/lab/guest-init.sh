#!/bin/sh
# PID 1 of the lab guest (started by the initramfs's /init from the 9p-shared checkout at /src).
# Brings up the mounts and the user-mode network (10.0.2.15, the host at 10.0.2.2), then serves
# commands from the host on the second serial port (ttyS1), one at a time:
#   host:  <id> <timeout-seconds> <base64 of a sh script>\n        ("poweroff" ends the guest)
#   guest: @@LAB <id> <exit code> <base64 of stdout+stderr>\n
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t configfs configfs /sys/kernel/config 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
hostname lab
modprobe virtio_net 2>/dev/null
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
modprobe nvme_tcp
echo "lab: $(uname -r) up, serving commands on ttyS1"

stty -F /dev/ttyS1 raw -echo -ixon -ixoff
exec 3<>/dev/ttyS1
echo "@@LAB-READY $(uname -r)" >&3
while IFS= read -r line <&3; do
    [ "$line" = poweroff ] && break
    id=${line%% *}
    rest=${line#* }
    limit=${rest%% *}
    printf '%s' "${rest#* }" | base64 -d > /tmp/lab-cmd.sh
    timeout -s KILL "$limit" sh /tmp/lab-cmd.sh > /tmp/lab-out 2>&1 < /dev/null
    rc=$?
    printf '@@LAB %s %s ' "$id" "$rc" >&3
    base64 -w0 /tmp/lab-out >&3
    printf '\n' >&3
done
echo "lab: powering off"
sync
echo o > /proc/sysrq-trigger
sleep 10
