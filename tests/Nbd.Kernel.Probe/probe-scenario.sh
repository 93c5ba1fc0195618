# VM scenario for tests/Nbd.Kernel.Probe (busybox sh inside tests/vm/run-vm.sh; the app is at /opt/probe).
. /usr/local/lib/nbdvm.sh
truncate -s 64M /tmp/probe.img
truncate -s $((10 * 1048576 + 1000)) /tmp/odd.img
start_nbd_server 10809 probe /tmp/probe.img odd /tmp/odd.img || { result probe error=nbd-server-start; exit 1; }
/opt/probe/Nbd.Kernel.Probe
rc=$?
dmesg | grep -i nbd | tail -40 | sed 's/^/DMESG /'
exit $rc
