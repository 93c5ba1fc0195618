# VM scenario for tests/Nbd.Kernel.Probe (busybox sh inside tests/vm/run-vm.sh).
. /usr/local/lib/nbdvm.sh
truncate -s 64M /tmp/probe.img
start_nbd_server 10809 probe /tmp/probe.img || { result probe error=nbd-server-start; exit 1; }
/opt/probe/Nbd.Kernel.Probe
rc=$?
dmesg | grep -i nbd | tail -40 | sed 's/^/DMESG /'
exit $rc
