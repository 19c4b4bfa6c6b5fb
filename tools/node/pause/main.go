// Command pause is the sandbox ("pause") container of every pod on the test node.
//
// No registry can be reached from the test machines, so containerd's sandbox image
// (registry.k8s.io/pause) cannot be pulled; this stands in for it. Like the upstream
// pause binary it holds the pod's namespaces open, reaps zombies (it is PID 1 of the
// pod when the pod shares its process namespace) and exits on SIGINT/SIGTERM.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
