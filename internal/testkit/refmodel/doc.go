// Package refmodel is the differential test of agentd against a model of the reference agent
// (microsandbox-agentd 0.5.7). Everything is in its tests: the model, written from the
// reference's documented behaviour (not from its code, and not from agentd's), with the
// deliberate differences docs/parity.md lists switched on; a generator of host frames over
// exec, fs, tcp and malformed payloads; and a driver that sends the same frames to agentd (an
// in-process agent.Agent on a socket pair) and to the model and compares what comes back,
// after normalizing what may legitimately differ (pids, times, chunk boundaries, order across
// ids, handle numbers).
//
//	go test ./internal/refmodel                          # the fixed seed, as in make test
//	go test ./internal/refmodel -args -cases 5000 -seed 7 # make diff-ref N=5000 SEED=7
package refmodel
