package initfs

import (
	"log/slog"
	"os"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultGrace is how long processes get between SIGTERM and SIGKILL at power-off: short
// enough that a core.shutdown powers off well within the 2 s a host waits (contract 10.6).
const DefaultGrace = time.Second

// PowerOff stops the machine as PID 1: SIGTERM to every process, a grace period (ending early
// once none is left), SIGKILL, sync, remount / read-only, then reboot(POWER_OFF). Data written
// before it is on disk (sync) before the power goes. It returns only if the reboot call fails.
func PowerOff(log *slog.Logger, grace time.Duration) error {
	unix.Kill(-1, unix.SIGTERM)
	deadline := time.Now().Add(grace)
	for time.Now().Before(deadline) && othersAlive() {
		time.Sleep(20 * time.Millisecond) // polling /proc: processes dying send no event to PID 1 but SIGCHLD, which the reaper takes
	}
	unix.Kill(-1, unix.SIGKILL)
	unix.Sync()
	if err := unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		log.Debug("remount / read-only", "error", err) // an initramfs root cannot be; sync suffices
	}
	unix.Sync()
	log.Info("powering off")
	return unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
}

// othersAlive reports whether any process other than this one (and kernel threads) exists.
func othersAlive() bool {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return false
	}
	self := os.Getpid()
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		if cmd, err := os.ReadFile("/proc/" + e.Name() + "/cmdline"); err == nil && len(cmd) > 0 {
			return true // kernel threads have an empty cmdline
		}
	}
	return false
}
