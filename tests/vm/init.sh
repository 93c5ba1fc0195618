#!/bin/busybox sh
# /init of the fast-tier VM (busybox initramfs). Runs /scenario.sh and powers off.
/bin/busybox --install -s /bin
export PATH=/opt/nbd-daemon:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
mkdir -p /proc /sys /dev /tmp /run /root /etc /var
ln -sfn /run /var/run; ln -sfn /tmp /var/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o size=1200m tmpfs /tmp
mount -t tmpfs tmpfs /run
ln -sf /proc/self/fd /dev/fd 2>/dev/null
hostname nbdvm
echo "127.0.0.1 localhost nbdvm" > /etc/hosts
echo "::1 localhost ip6-localhost" >> /etc/hosts
echo "root:x:0:0:root:/root:/bin/sh" > /etc/passwd
echo "nobody:x:65534:65534:nobody:/nonexistent:/bin/false" >> /etc/passwd
echo "root:x:0:" > /etc/group
echo "nogroup:x:65534:" >> /etc/group
ip link set lo up
insmod /lib/modules/nbd.ko nbds_max=16 || echo "@@NBDVM-INSMOD-FAILED"
echo "@@NBDVM-BEGIN kernel=$(uname -r) cpus=$(nproc)"
cd /tmp
sh /scenario.sh </dev/null
rc=$?
echo "@@NBDVM-END rc=$rc"
sync
sleep 0.2
poweroff -f
