package policy

import (
	"fmt"
	"os"
)

// ReadFile reads and parses a policy file (JSON or YAML). Errors name the file and the field.
// The file's bytes are returned too, for a caller that passes the document on.
func ReadFile(path string) (*Policy, []byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, err
	}
	p, err := Parse(data)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", path, err)
	}
	return p, data, nil
}

// Load is the policy agentd enforces: the floor (DefaultFloor, or the rules of floorFile) in
// front of policyFile's rules; with no policy file, everything the floor does not deny is
// allowed. Either path may be "".
func Load(policyFile, floorFile string) (*Policy, error) {
	floor := DefaultFloor
	if floorFile != "" {
		f, _, err := ReadFile(floorFile)
		if err != nil {
			return nil, fmt.Errorf("floor: %w", err)
		}
		floor = f.Rules
	}
	p := &Policy{DefaultEgress: Allow, DefaultIngress: Allow}
	if policyFile != "" {
		var err error
		if p, _, err = ReadFile(policyFile); err != nil {
			return nil, err
		}
	}
	return WithFloor(floor, p)
}
