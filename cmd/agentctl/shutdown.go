package main

// shutdownCmd sends core.shutdown: the agent ends every session and, as PID 1, powers off.
func shutdownCmd(args []string) error {
	c := newCommand("shutdown", "[options]", "Asks the agent to shut down (core.shutdown): it ends every session and, as the guest's\ninit, syncs and powers the guest off.")
	var to target
	to.register(c)
	pos, err := c.parse(args, false)
	if err != nil {
		return err
	}
	if err := c.nargs(pos, 0, 0); err != nil {
		return err
	}
	log, err := c.logger()
	if err != nil {
		return err
	}
	cl, err := to.dial(log)
	if err != nil {
		return err
	}
	defer cl.Close()
	return cl.Shutdown()
}
