package main

import "fmt"

// shutdownCmd sends core.shutdown: the agent ends every session and, as PID 1, powers off.
func shutdownCmd(args []string) error {
	fs, level := newFlags("shutdown", "[--connect SOCK | --port SPEC]")
	relay, port := connectFlags(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return usageError{fmt.Errorf("shutdown takes no arguments")}
	}
	c, _, err := connect(*level, *relay, *port)
	if err != nil {
		return err
	}
	defer c.Close()
	return c.Shutdown()
}
