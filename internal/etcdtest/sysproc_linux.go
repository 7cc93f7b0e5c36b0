package etcdtest

import "syscall"

// sysProcAttr has the kernel kill the server if the test binary dies without
// stopping it (a test timeout panics past every cleanup), so that no etcd
// outlives its tests.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
